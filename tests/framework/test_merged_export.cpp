// The merged export: every projection equals dequantize(NF4(W)) + scale·B·A computed here from the
// base model and the adapter file, every other tensor the base's in the output dtype, config.json the
// base's with "dtype" and without quantization_config; sharded output reads back identically, a
// pre-quantized base gives the same model, and bad input is an Error naming what is wrong.
#include "framework/merged_export.h"

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "framework/atomic_file.h"
#include "framework/checkpoint.h"
#include "framework/checkpoint_manifest.h"
#include "framework/cpu_backend.h"
#include "framework/mamba_model.h"
#include "framework/model_sizes.h"
#include "framework/quantize_model.h"
#include "framework/safetensors.h"
#include "kernels/common/counter_rng.h"
#include "kernels/cpu/nf4.h"
#include "tests/catch.h"
#include "tests/framework/error_message.h"
#include "tests/framework/scratch_dir.h"

using namespace ssmtune;
using test::contains;
using test::error_message;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr int64_t kRank = 4;
constexpr double kAlpha = 8, kScale = kAlpha / kRank;

std::string adapter_key(int64_t layer, const std::string& projection, const char* matrix) {
  return "base_model.model.backbone.layers." + std::to_string(layer) + ".mixer." + projection + ".lora_" + matrix +
         ".weight";
}

// A base model and a checkpoint as training writes one (adapter.safetensors with PEFT's keys,
// state.json, recipe.yaml, manifest.json) with adapters on in_proj, x_proj and out_proj; A and B both
// random, so the merge moves every weight by far more than the output dtype's rounding.
struct Setup {
  test::ScratchDir dir{"merged"};
  MambaConfig config = model_size("demo");
  fs::path base = dir / "base", checkpoint = dir / "run/checkpoints/step_3";
  std::vector<std::string> targets{"in_proj", "x_proj", "out_proj"};

  Setup() {
    write_random_mamba(base, config, 6);
    fs::create_directories(checkpoint);
    SafetensorsWriter adapter;
    uint64_t stream = 0;
    for (int64_t layer = 0; layer < config.n_layer; ++layer)
      for (const std::string& p : targets) {
        const auto [out, in] = projection_shape(config, projection(p));
        adapter.add_float_as(adapter_key(layer, p, "A"), DType::F32, {kRank, in}, random(kRank * in, stream++).data());
        adapter.add_float_as(adapter_key(layer, p, "B"), DType::F32, {out, kRank}, random(out * kRank, stream++).data());
      }
    adapter.write(checkpoint / "adapter.safetensors");
    std::ofstream(checkpoint / "state.json") << "{}";
    std::ofstream(checkpoint / kOptimizerFile) << std::string(64, 'm');  // stands in for the moments
    write_recipe(base);
  }
  // recipe.yaml, and the manifest listing it as it now is.
  void write_recipe(const fs::path& model, const std::string& target_list = "[in_proj, x_proj, out_proj]") const {
    std::ofstream(checkpoint / "recipe.yaml") << "model:\n  path: " << model.string() << "\ndata:\n  path: "
                                              << (dir / "data.h5").string() << "\nlora:\n  rank: " << kRank
                                              << "\n  alpha: " << kAlpha << "\n  targets: " << target_list
                                              << "\ntrain:\n  output_dir: " << (dir / "run").string() << "\n";
    write_manifest(checkpoint, {"adapter.safetensors", "state.json", kOptimizerFile, "recipe.yaml"});
  }
  static Projection projection(const std::string& name) {
    for (Projection p : kProjections)
      if (projection_name(p) == name) return p;
    FAIL("no projection " << name);
    return Projection::in_proj;
  }
  static std::vector<float> random(int64_t n, uint64_t stream) {
    std::vector<float> values(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) values[i] = counter_random_uniform(17, stream, i) - 0.5f;
    return values;
  }
  std::vector<double> read(const fs::path& file, const std::string& name, std::vector<int64_t> shape) const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::vector<double> values(static_cast<size_t>(n));
    SafetensorsFile::open(file).read_double(name, shape, values.data());
    return values;
  }
};

MergedExportOptions options(DType dtype, fs::path model = {}, uint64_t max_shard_bytes = kDefaultMaxShardBytes) {
  MergedExportOptions o;
  o.model = std::move(model);
  o.dtype = dtype;
  o.max_shard_bytes = max_shard_bytes;
  return o;
}

// One unit in the last place of `dtype` at the magnitude of x (F16's subnormal spacing below 2^-14).
double ulp(DType dtype, double x) {
  const int mantissa_bits = dtype == DType::BF16 ? 7 : dtype == DType::F16 ? 10 : 23;
  int exponent = std::ilogb(std::max(std::fabs(x), 1e-30));
  if (dtype == DType::F16) exponent = std::max(exponent, -14);
  return std::ldexp(1.0, exponent - mantissa_bits);
}

// Every tensor of two exports: the same names, dtypes, shapes and bytes.
void require_same_tensors(const fs::path& a_dir, const fs::path& b_dir) {
  const ShardedSafetensors a = ShardedSafetensors::open_dir(a_dir), b = ShardedSafetensors::open_dir(b_dir);
  REQUIRE(a.names() == b.names());
  for (const std::string& name : a.names()) {
    INFO(name);
    CHECK(a.info(name).dtype == b.info(name).dtype);
    CHECK(a.info(name).shape == b.info(name).shape);
    const auto x = a.bytes(name), y = b.bytes(name);
    CHECK(std::equal(x.begin(), x.end(), y.begin(), y.end()));
  }
}

}  // namespace

TEST_CASE("merged projections equal dequantize(NF4(W)) + scale·B·A, other tensors the base's") {
  Setup s;
  for (const DType dtype : {DType::F32, DType::BF16, DType::F16}) {
    INFO(dtype_name(dtype));
    const fs::path out = s.dir / ("merged_" + std::string(dtype_name(dtype)));
    export_merged_model(s.checkpoint, out, options(dtype));
    const fs::path merged_file = out / "model.safetensors";
    const SafetensorsFile merged = SafetensorsFile::open(merged_file);
    const std::vector<MambaTensor> layout = mamba_tensors(s.config, false);
    std::vector<std::string> names;
    for (const MambaTensor& t : layout) names.push_back(t.name);
    std::sort(names.begin(), names.end());
    CHECK(merged.names() == names);

    for (const MambaTensor& t : layout) {
      INFO(t.name);
      CHECK(merged.info(t.name).dtype == dtype);
      const std::vector<double> actual = s.read(merged_file, t.name, t.shape);
      const std::vector<double> base = s.read(s.base / "model.safetensors", t.name, t.shape);
      if (t.kind != MambaTensor::Kind::projection) {
        // Rounded once from the base's value.
        std::vector<std::byte> rounded(base.size() * dtype_size(dtype));
        convert_from_double(base.data(), base.size(), dtype, rounded.data());
        std::vector<double> expected(base.size());
        convert_to_double(dtype, rounded.data(), expected.size(), expected.data());
        CHECK(actual == expected);
        continue;
      }
      // The base as training held it, in NF4, dequantized.
      const int64_t out_features = t.shape[0], in = t.shape[1], n = t.numel();
      const std::vector<float> w(base.begin(), base.end());
      const cpu::Nf4Sizes sizes = cpu::nf4_sizes(n);
      std::vector<uint8_t> packed(sizes.packed_bytes), codes(sizes.blocks);
      std::vector<float> nested(sizes.nested_blocks);
      float offset = 0;
      cpu::nf4_quantize(w.data(), n, packed.data(), codes.data(), nested.data(), &offset);
      std::vector<double> expected(static_cast<size_t>(n));
      cpu::nf4_dequantize(packed.data(), codes.data(), nested.data(), offset, n, expected.data());

      const std::string p(projection_name(t.projection));
      const bool adapted = std::find(s.targets.begin(), s.targets.end(), p) != s.targets.end();
      double largest_update = 0;
      if (adapted) {
        const fs::path adapter = s.checkpoint / "adapter.safetensors";
        const std::vector<double> A = s.read(adapter, adapter_key(t.layer, p, "A"), {kRank, in});
        const std::vector<double> B = s.read(adapter, adapter_key(t.layer, p, "B"), {out_features, kRank});
        for (int64_t o = 0; o < out_features; ++o)
          for (int64_t i = 0; i < in; ++i) {
            double ba = 0;
            for (int64_t k = 0; k < kRank; ++k) ba += B[o * kRank + k] * A[k * in + i];
            expected[o * in + i] += kScale * ba;
            largest_update = std::max(largest_update, std::fabs(kScale * ba));
          }
        CHECK(largest_update > 0.1);  // the merge is far from a rounding of the base
      }
      // Tolerance: the export rounds the exact double sum to the output dtype through fp32 (half an ulp
      // of fp32, then half an ulp of the output dtype), and its double sums over the rank may round
      // differently from this loop's by about 1e-16 relative: together under one ulp of the output dtype.
      size_t beyond = 0;
      for (int64_t i = 0; i < n; ++i)
        if (std::fabs(actual[i] - expected[i]) > ulp(dtype, expected[i])) ++beyond;
      CHECK(beyond == 0);
    }

    json config = json::parse(read_text_file(out / "config.json"));
    CHECK(config["dtype"] == (dtype == DType::F32 ? "float32" : dtype == DType::BF16 ? "bfloat16" : "float16"));
    CHECK(!config.contains("quantization_config"));
    config.erase("dtype");
    CHECK(config == json::parse(read_text_file(s.base / "config.json")));
  }
}

TEST_CASE("a sharded merged export reads back as the single-file one, and loads") {
  Setup s;
  export_merged_model(s.checkpoint, s.dir / "whole", {});
  export_merged_model(s.checkpoint, s.dir / "sharded", options(DType::BF16, {}, 6000));
  CHECK(!fs::exists(s.dir / "whole/model.safetensors.index.json"));
  CHECK(fs::exists(s.dir / "sharded/model.safetensors.index.json"));
  require_same_tensors(s.dir / "whole", s.dir / "sharded");
  const json index = json::parse(read_text_file(s.dir / "sharded/model.safetensors.index.json"));
  std::set<std::string> shards;
  for (const auto& [name, file] : index["weight_map"].items()) shards.insert(file.get<std::string>());
  CHECK(shards.size() > 2);
  const ShardedSafetensors whole = ShardedSafetensors::open_dir(s.dir / "whole");
  uint64_t total = 0;
  for (const std::string& name : whole.names()) total += whole.info(name).end - whole.info(name).begin;
  CHECK(index["metadata"]["total_size"] == total);
  // Our own loader takes the merged model as a base model.
  const std::unique_ptr<Backend> backend = make_cpu_backend(DType::F32);
  CHECK(MambaWeights::load(s.dir / "sharded", *backend).config().n_layer == s.config.n_layer);
}

TEST_CASE("a pre-quantized base merges to the same model as the base it was quantized from") {
  Setup s;
  write_quantized_model(s.base, s.dir / "base_nf4");
  export_merged_model(s.checkpoint, s.dir / "from_base", options(DType::F32));
  export_merged_model(s.checkpoint, s.dir / "from_nf4", options(DType::F32, s.dir / "base_nf4"));
  require_same_tensors(s.dir / "from_base", s.dir / "from_nf4");
  // The recipe's model.path may name the quantized model too.
  s.write_recipe(s.dir / "base_nf4");
  export_merged_model(s.checkpoint, s.dir / "from_recipe_nf4", options(DType::F32));
  require_same_tensors(s.dir / "from_base", s.dir / "from_recipe_nf4");
  const json config = json::parse(read_text_file(s.dir / "from_nf4/config.json"));
  CHECK(!config.contains("quantization_config"));
}

TEST_CASE("merged export errors name the checkpoint, base model, adapter or output at fault") {
  Setup s;
  const fs::path out = s.dir / "out";
  auto export_error = [&](const MergedExportOptions& o = {}) {
    const std::string message = error_message([&] { export_merged_model(s.checkpoint, out, o); });
    CHECK(!fs::exists(out));
    return message;
  };

  // The base model moved: the message says where its path came from and how to give another.
  fs::rename(s.base, s.dir / "moved");
  const std::string moved = export_error();
  CHECK(contains(moved, s.base.string()));
  CHECK(contains(moved, "model.path of " + (s.checkpoint / "recipe.yaml").string()));
  CHECK(contains(moved, "--model"));
  CHECK(contains(export_error(options(DType::BF16, s.dir / "nowhere")), "from --model"));
  export_merged_model(s.checkpoint, out, options(DType::BF16, s.dir / "moved"));  // --model overrides the recipe
  fs::remove_all(out);
  fs::rename(s.dir / "moved", s.base);

  // A base model of another size: the adapter's shapes do not fit.
  MambaConfig wider = s.config;
  wider.d_model = 96;
  wider.d_inner = 192;
  wider.dt_rank = 6;
  write_random_mamba(s.dir / "wider", wider, 1);
  const std::string shapes = export_error(options(DType::BF16, s.dir / "wider"));
  CHECK(contains(shapes, (s.checkpoint / "adapter.safetensors").string()));
  CHECK(contains(shapes, adapter_key(0, "in_proj", "A")));
  CHECK(contains(shapes, "expected [4, 96]"));

  // Adapters the recipe's lora.targets do not list.
  s.write_recipe(s.base, "[in_proj, out_proj]");
  const std::string targets = export_error();
  CHECK(contains(targets, adapter_key(0, "x_proj", "A")));
  CHECK(contains(targets, "lora.targets [in_proj, out_proj]"));
  s.write_recipe(s.base);

  CHECK(contains(export_error(options(DType::F64)), "F64"));

  fs::create_directories(out);
  std::ofstream(out / "keep.txt") << "mine";
  CHECK(contains(error_message([&] { export_merged_model(s.checkpoint, out, {}); }), "not an empty directory"));
  CHECK(read_text_file(out / "keep.txt") == "mine");
}

TEST_CASE("a checkpoint whose adapters do not match its manifest, or without one, exports nothing") {
  Setup s;
  const fs::path out = s.dir / "out";
  const fs::path adapter = s.checkpoint / "adapter.safetensors";
  const std::string intact = read_text_file(adapter);
  std::string corrupt = intact;
  corrupt[corrupt.size() / 2] ^= 0x01;  // one bit in the middle of the tensors
  std::ofstream(adapter, std::ios::binary) << corrupt;
  std::string message = error_message([&] { export_merged_model(s.checkpoint, out, {}); });
  INFO(message);
  CHECK(contains(message, adapter.string() + ": CRC-32"));
  CHECK(contains(message, "the file is corrupt"));
  CHECK(!fs::exists(out));

  std::ofstream(adapter, std::ios::binary) << intact;
  export_merged_model(s.checkpoint, out, {});
  CHECK(fs::exists(out / "model.safetensors"));

  // What only resuming reads may be damaged: the adapters still export, and the same model comes out.
  const std::string merged = read_text_file(out / "model.safetensors");
  const fs::path optimizer = s.checkpoint / kOptimizerFile;
  REQUIRE(fs::exists(optimizer));
  std::string moments = read_text_file(optimizer);
  moments[moments.size() / 2] ^= 0x01;
  std::ofstream(optimizer, std::ios::binary) << moments;
  fs::remove(s.checkpoint / kStateFile);
  export_merged_model(s.checkpoint, s.dir / "out3", {});
  CHECK(read_text_file(s.dir / "out3" / "model.safetensors") == merged);

  fs::remove(s.checkpoint / kRecipeFile);
  message = error_message([&] { export_merged_model(s.checkpoint, s.dir / "out2", {}); });
  CHECK(contains(message, (s.checkpoint / kRecipeFile).string() + ": listed in manifest.json but cannot be read"));
  CHECK(!fs::exists(s.dir / "out2"));
  fs::remove(s.checkpoint / kManifestFile);  // a save that did not finish
  message = error_message([&] { export_merged_model(s.checkpoint, s.dir / "out2", {}); });
  CHECK(contains(message, (s.checkpoint / kManifestFile).string() + ": missing"));
  CHECK(!fs::exists(s.dir / "out2"));
}
