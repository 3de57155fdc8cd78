// `ssmtune info`'s numbers against the real thing: parameter counts against the tensors of a written
// model and the adapters' own layout, byte counts against what the memory plans of MambaWeights,
// LoraAdapters and TrainStep actually take on the CPU backend (equal, not close: info sizes the same
// plans), and the FLOPs' GEMM part against the parameter counts (each weight is one multiply-add per
// token).
#include "distributed/sharding.h"
#include "framework/cpu_backend.h"
#include "framework/lora.h"
#include "framework/mamba_model.h"
#include "framework/model_info.h"
#include "framework/model_sizes.h"
#include "framework/safetensors.h"
#include "framework/train_step.h"
#include "tests/catch.h"
#include "tests/framework/scratch_dir.h"

using namespace ssmtune;

namespace {

LoraConfig lora_on(std::vector<Projection> targets, int64_t rank) {
  LoraConfig lora;
  lora.rank = rank;
  lora.targets = std::move(targets);
  return lora;
}

}  // namespace

TEST_CASE("info's parameter counts, bytes and FLOPs match the model, adapters and plans") {
  test::ScratchDir dir("info");
  const std::unique_ptr<Backend> backend = make_cpu_backend();
  for (const std::string size : {"demo", "falcon-demo"}) {
    write_random_mamba(dir / size, model_size(size), 0);
    const MambaConfig c = load_mamba_config(dir / size / "config.json");
    for (const LoraConfig& lora : {LoraConfig{}, lora_on({Projection::in_proj, Projection::dt_proj}, 4)}) {
      INFO(size << ", " << lora.targets.size() << " targets");
      const ParameterCounts p = parameter_counts(c, c.tie_word_embeddings, lora);

      // Counted from the file itself and the four projection shapes written out by hand.
      const SafetensorsFile file = SafetensorsFile::open(dir / size / "model.safetensors");
      int64_t in_file = 0;
      for (const std::string& name : file.names()) {
        int64_t numel = 1;
        for (int64_t d : file.info(name).shape) numel *= d;
        in_file += numel;
      }
      const int64_t D = c.d_inner, M = c.d_model, R = c.dt_rank, N = c.d_state;
      CHECK(p.base == in_file);
      CHECK(p.nf4 == c.n_layer * (2 * D * M + (R + 2 * N) * D + D * R + M * D));
      CHECK(p.dense == p.base - p.nf4);

      // Three ranks with ZeRO: rank 0's moments are the largest shard.
      const ShardIndex shard{0, 3};
      const StepShape shape{2, 24, 8, true, 16};
      const MemoryEstimate m = memory_estimate(*backend, c, c.tie_word_embeddings, lora, shape, shard);
      const MambaWeights weights = MambaWeights::load(dir / size, *backend);
      CHECK(weights.bytes() == m.nf4_weights + m.dense_weights);
      CHECK(m.gathered_weights == 0);
      const size_t before_adapters = backend->allocated_bytes();
      LoraAdapters adapters(*backend, c, lora, shard);
      CHECK(backend->allocated_bytes() - before_adapters == m.adapters + m.adam_moments);
      int64_t adapter_numel = 0;
      for (const AdapterTensor& t : adapters.tensors()) adapter_numel += t.numel();
      CHECK(p.trainable == adapter_numel);
      CHECK(p.trainable == adapters.numel());

      for (const bool recompute : {true, false}) {
        StepShape s = shape;
        s.recompute = recompute;
        const TrainStep step(*backend, weights, adapters, s);
        const StepPlanBytes planned = TrainStep::planned_bytes(*backend, c, lora, s);
        CHECK(step.activation_bytes() == planned.total());
        CHECK(planned.workspaces > 0);
        if (recompute) CHECK(planned.total() == m.step.total());
      }

      // Sharded base weights: this rank's shard of every layer's NF4 block, and two whole blocks to gather.
      const MambaWeights sharded = MambaWeights::load(dir / size, *backend, ShardIndex{1, 3});
      const MemoryEstimate ms = memory_estimate(*backend, c, c.tie_word_embeddings, lora, shape, shard, 3);
      CHECK(sharded.bytes() == ms.nf4_weights + ms.dense_weights);
      CHECK(ms.nf4_weights < m.nf4_weights);
      CHECK(ms.gathered_weights == 2 * Arena::padded(layer_nf4_layout(c, 3).bytes));

      // Each frozen or adapter weight is one multiply-add per token forward; the LM head one per
      // (d_model, vocab) pair; conv and scan as model_info.h counts them.
      const FlopsPerToken f = flops_per_token(c, lora);
      const double head = 2.0 * static_cast<double>(M * c.vocab_size);
      const double elementwise = static_cast<double>(c.n_layer) * (2.0 * c.conv_kernel * D + 8.0 * D * N);
      CHECK(f.forward == Approx(2.0 * static_cast<double>(p.nf4 + p.trainable) + head + elementwise).epsilon(1e-12));
      // The recomputation: a forward without the LM head and without forming out_proj's output (its frozen
      // GEMM, d_model x d_inner, and its adapter's up-projection, d_model x rank).
      const double out_proj_output =
          2.0 * static_cast<double>(M * (D + (lora.targets_projection(Projection::out_proj) ? lora.rank : 0)));
      CHECK(f.recompute == Approx(f.forward - head - c.n_layer * out_proj_output).epsilon(1e-12));
      CHECK(f.step(true) == Approx(f.step(false) + f.recompute).epsilon(1e-12));
      CHECK(f.backward > f.forward);  // dx of every GEMM, plus the adapters' weight gradients
    }
  }
}

TEST_CASE("info sizes the backend the recipe's device asks for") {
  std::string assumption;
  CHECK(backend_sizes_for("cpu", &assumption)->name() == "cpu");
  CHECK(assumption.empty());
  const std::unique_ptr<BackendSizes> automatic = backend_sizes_for("auto", &assumption);
  CHECK(!assumption.empty());
#ifdef SSMTUNE_WITH_CUDA
  CHECK(automatic->name() == "cuda");
  CHECK(automatic->act_dtype() == DType::BF16);
#else
  CHECK(automatic->name() == "cpu");
  CHECK_THROWS_AS(backend_sizes_for("cuda", &assumption), Error);
#endif
}
