#include "framework/merged_export.h"

#include <map>
#include <set>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "framework/atomic_directory.h"
#include "framework/atomic_file.h"
#include "framework/checkpoint.h"
#include "framework/error.h"
#include "framework/model_files.h"
#include "framework/recipe_config.h"
#include "kernels/cpu/nf4.h"

namespace ssmtune {
namespace {

namespace fs = std::filesystem;

// The checkpoint's adapters, checked against the base model before anything is written and read one
// projection at a time while the output is written.
class Adapters {
 public:
  Adapters(const fs::path& checkpoint_dir, const LoraConfig& lora, const std::vector<MambaTensor>& layout)
      : file_(SafetensorsFile::open(checkpoint_dir / kAdapterFile)), lora_(lora) {
    std::set<std::string> expected;
    for (const MambaTensor& t : layout) {
      if (t.kind != MambaTensor::Kind::projection || !lora.targets_projection(t.projection)) continue;
      const auto [a, b] = names(t);
      file_.float_info(a, std::vector<int64_t>{lora.rank, t.shape[1]});
      file_.float_info(b, std::vector<int64_t>{t.shape[0], lora.rank});
      expected.insert({a, b});
    }
    for (const std::string& name : file_.names())
      if (!expected.contains(name))
        fail("{}: tensor '{}' is not an adapter of the base model's projections in lora.targets [{}]",
             file_.path().string(), name, fmt::join(target_names(), ", "));
  }

  // w[out, in] += scale · B · A, each sum over the rank in double; false when `t` has no adapter.
  bool add_to(const MambaTensor& t, std::vector<double>& w) const {
    if (!lora_.targets_projection(t.projection)) return false;
    const int64_t out = t.shape[0], in = t.shape[1], rank = lora_.rank;
    const auto [a_name, b_name] = names(t);
    std::vector<double> A(static_cast<size_t>(rank * in)), B(static_cast<size_t>(out * rank));
    file_.read_double(a_name, std::vector<int64_t>{rank, in}, A.data());
    file_.read_double(b_name, std::vector<int64_t>{out, rank}, B.data());
    const double scale = lora_.scale();
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < out; ++o) {
      std::vector<double> delta(static_cast<size_t>(in), 0.0);
      for (int64_t k = 0; k < rank; ++k) {
        const double b = B[o * rank + k];
        const double* a = &A[k * in];
        for (int64_t i = 0; i < in; ++i) delta[i] += b * a[i];
      }
      double* row = &w[o * in];
      for (int64_t i = 0; i < in; ++i) row[i] += scale * delta[i];
    }
    return true;
  }

 private:
  static std::pair<std::string, std::string> names(const MambaTensor& t) {
    const std::string key =
        fmt::format("base_model.model.backbone.layers.{}.mixer.{}", t.layer, projection_name(t.projection));
    return {key + ".lora_A.weight", key + ".lora_B.weight"};
  }
  std::vector<std::string_view> target_names() const {
    std::vector<std::string_view> names;
    for (Projection p : lora_.targets) names.push_back(projection_name(p));
    return names;
  }

  SafetensorsFile file_;
  LoraConfig lora_;
};

// A floating-point tensor of `shape` whose values `compute` produces in double, written in `dtype`.
PlannedTensor computed(std::string name, std::vector<int64_t> shape, DType dtype,
                       std::function<std::vector<double>()> compute) {
  return {std::move(name), dtype, std::move(shape), [dtype, compute](std::span<std::byte> to) {
            const std::vector<double> values = compute();
            convert_from_double(values.data(), values.size(), dtype, to.data());
          }};
}

fs::path base_model_dir(const RecipeConfig& recipe, const fs::path& checkpoint_dir, const fs::path& model) {
  const fs::path dir = model.empty() ? recipe.model_path : model;
  if (!fs::exists(dir / kConfigName))
    fail("{}: no base model there (no {}); the path is {}", dir.string(), kConfigName,
         model.empty() ? fmt::format("model.path of {}; give the base model with --model",
                                     (checkpoint_dir / kRecipeFile).string())
                       : std::string("from --model"));
  return dir;
}

}  // namespace

void export_merged_model(const fs::path& checkpoint_dir, const fs::path& out_dir, const MergedExportOptions& options) {
  if (options.dtype != DType::F32 && options.dtype != DType::BF16 && options.dtype != DType::F16)
    fail("merged export: dtype {} is not one of F32, BF16, F16", dtype_name(options.dtype));
  verify_exported_files(checkpoint_dir);  // an unfinished checkpoint, or damaged adapters, export nothing
  const RecipeConfig recipe = load_recipe(checkpoint_dir / kRecipeFile, {});
  const ModelFiles files = ModelFiles::open(base_model_dir(recipe, checkpoint_dir, options.model));
  const ShardedSafetensors& tensors = files.tensors();
  const std::vector<MambaTensor> layout = files.layout();
  const Adapters adapters(checkpoint_dir, recipe.lora, layout);
  const DType dtype = options.dtype;

  std::vector<PlannedTensor> planned;
  for (const MambaTensor& t : layout) {
    const std::string stored = files.stored_name(t);
    if (t.kind != MambaTensor::Kind::projection) {
      tensors.float_info(stored, t.shape);
      planned.push_back(computed(t.name, t.shape, dtype, [&tensors, stored, t] {
        std::vector<double> values(static_cast<size_t>(t.numel()));
        tensors.read_double(stored, t.shape, values.data());
        return values;
      }));
      continue;
    }
    if (!files.stored_nf4(t)) tensors.float_info(stored, t.shape);  // checked now, not after hours of writing
    planned.push_back(computed(t.name, t.shape, dtype, [&files, &adapters, t] {
      const Nf4HostWeight base = files.projection_nf4(t);
      std::vector<double> values(static_cast<size_t>(t.numel()));
      cpu::nf4_dequantize(base.packed.data(), base.absmax_codes.data(), base.nested_absmax.data(), base.nested_offset,
                          t.numel(), values.data());
      adapters.add_to(t, values);
      return values;
    }));
  }
  for (const std::string& name : files.other_tensors()) {
    const TensorInfo& info = tensors.info(name);
    if (!is_floating_point(info.dtype)) {
      planned.push_back(tensors.copy_as(name, name));
      continue;
    }
    planned.push_back(computed(name, info.shape, dtype, [&tensors, name, shape = info.shape, numel = info.numel()] {
      std::vector<double> values(static_cast<size_t>(numel));
      tensors.read_double(name, shape, values.data());
      return values;
    }));
  }

  nlohmann::json config = mamba_config_to_json(files.config());
  config.erase("torch_dtype");  // transformers < 4.56 named it so; "dtype" below says what the files hold
  config["dtype"] = torch_dtype_name(dtype);
  const std::string config_text = config.dump(2) + "\n";
  write_directory_atomically(out_dir, [&](const fs::path& temporary) {
    write_sharded_safetensors(temporary, planned, options.max_shard_bytes);
    write_file_atomically(temporary / kConfigName, std::as_bytes(std::span(config_text)));
  });
}

}  // namespace ssmtune
