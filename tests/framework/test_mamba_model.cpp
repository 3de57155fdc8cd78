// MambaWeights::random builds in memory exactly the weights that write_random_mamba followed by
// MambaWeights::load gives: every buffer equal byte for byte, on the fp32 and the fp64 CPU backend.
// The same comparison shows that a model loads as its values whatever the file dtype (F32, BF16, F16)
// and however it is sharded, and that a bitsandbytes NF4 checkpoint written by `ssmtune quantize`
// loads as exactly the weights of quantizing its source on load.
#include <cstring>
#include <memory>
#include <vector>

#include "framework/cpu_backend.h"
#include "framework/mamba_model.h"
#include "framework/model_sizes.h"
#include "framework/quantize_model.h"
#include "kernels/cpu/nf4.h"
#include "tests/catch.h"
#include "tests/framework/model_rewrite.h"
#include "tests/framework/same_weights.h"
#include "tests/framework/scratch_dir.h"

using namespace ssmtune;

using test::download;
using test::require_same_weights;

TEST_CASE("MambaWeights::random equals load of write_random_mamba") {
  MambaConfig untied = model_size("demo");  // also an lm_head of its own and no conv bias
  untied.tie_word_embeddings = false;
  untied.use_conv_bias = false;
  for (const MambaConfig& config : {model_size("demo"), untied}) {
    for (const DType scalar : {DType::F32, DType::F64}) {
      INFO("tied " << config.tie_word_embeddings << ", " << dtype_name(scalar));
      test::ScratchDir dir("random-model");
      const uint64_t seed = 11;
      write_random_mamba(dir / "model", config, seed);
      const std::unique_ptr<Backend> backend = make_cpu_backend(scalar);
      const MambaWeights loaded = MambaWeights::load(dir / "model", *backend);
      const MambaWeights random = MambaWeights::random(config, *backend, seed);
      require_same_weights(*backend, loaded, random);

      // The seed matters: another one gives another embedding.
      const MambaWeights other = MambaWeights::random(config, *backend, seed + 1);
      const size_t bytes = static_cast<size_t>(config.vocab_size * config.d_model) * dtype_size(scalar);
      CHECK(download(*backend, random.embedding(), bytes) != download(*backend, other.embedding(), bytes));
    }
  }
}

namespace {

// demo with shapes that leave partial NF4 blocks (x_proj 37 x 144, dt_proj 144 x 5) and two nested
// blocks in in_proj (324 blocks of 64).
MambaConfig odd_sizes() {
  MambaConfig c = model_size("demo");
  c.d_model = 72;
  c.d_inner = c.expand * c.d_model;
  c.dt_rank = (c.d_model + 15) / 16;
  return c;
}

MambaConfig untied_without_conv_bias() {
  MambaConfig c = model_size("demo");
  c.tie_word_embeddings = false;
  c.use_conv_bias = false;
  return c;
}

}  // namespace

TEST_CASE("a model stored in BF16, F16 or F32, whole or sharded, loads as its values") {
  for (const DType stored : {DType::BF16, DType::F16}) {
    INFO(dtype_name(stored));
    test::ScratchDir dir("stored-dtype");
    write_random_mamba(dir / "f32", model_size("demo"), 5);
    test::rewrite_model(dir / "f32", dir / "low", test::convert_floats_to(stored));
    // The same values stored in F32 (exact: F32 holds every BF16 and F16 value), and the low-precision
    // file split into shards of at most 4 KiB.
    test::rewrite_model(dir / "low", dir / "low_as_f32", test::convert_floats_to(DType::F32));
    test::rewrite_model(dir / "low", dir / "low_sharded", test::keep, 4096);
    REQUIRE(std::filesystem::exists(dir / "low_sharded/model.safetensors.index.json"));
    for (const DType scalar : {DType::F32, DType::F64}) {
      INFO("backend " << dtype_name(scalar));
      const std::unique_ptr<Backend> backend = make_cpu_backend(scalar);
      const MambaWeights low = MambaWeights::load(dir / "low", *backend);
      require_same_weights(*backend, low, MambaWeights::load(dir / "low_as_f32", *backend));
      require_same_weights(*backend, low, MambaWeights::load(dir / "low_sharded", *backend));
      // Rounding did change the values: the loads are not simply of the F32 original.
      const size_t bytes = static_cast<size_t>(64 * 64) * dtype_size(scalar);
      CHECK(download(*backend, low.embedding(), bytes) !=
            download(*backend, MambaWeights::load(dir / "f32", *backend).embedding(), bytes));
    }
  }
}

TEST_CASE("a bitsandbytes NF4 checkpoint from ssmtune quantize loads bit for bit as its source") {
  for (const MambaConfig& config : {model_size("demo"), odd_sizes(), untied_without_conv_bias(),
                                    model_size("falcon-demo")}) {
    for (const DType stored : {DType::F32, DType::BF16}) {
      for (const uint64_t max_shard : {kDefaultMaxShardBytes, uint64_t{3000}}) {
        INFO(config.model_type << " d_model " << config.d_model << " tied " << config.tie_word_embeddings << ", "
                               << dtype_name(stored) << ", max shard " << max_shard);
        test::ScratchDir dir("prequantized");
        write_random_mamba(dir / "f32", config, 9);
        test::rewrite_model(dir / "f32", dir / "source", test::convert_floats_to(stored));
        write_quantized_model(dir / "source", dir / "nf4", max_shard);
        CHECK(std::filesystem::exists(dir / "nf4/model.safetensors.index.json") == (max_shard == 3000));
        for (const DType scalar : {DType::F32, DType::F64}) {
          const std::unique_ptr<Backend> backend = make_cpu_backend(scalar);
          require_same_weights(*backend, MambaWeights::load(dir / "source", *backend),
                               MambaWeights::load(dir / "nf4", *backend));
        }
      }
    }
  }
}
