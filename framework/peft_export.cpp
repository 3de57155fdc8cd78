#include "framework/peft_export.h"

#include <nlohmann/json.hpp>

#include "framework/atomic_file.h"
#include "framework/checkpoint.h"
#include "framework/error.h"
#include "framework/recipe_config.h"
#include "framework/safetensors.h"

namespace ssmtune {

// The PEFT release whose adapter format this export follows.
static constexpr const char* kPeftFormatVersion = "0.21.0";

std::vector<std::string> export_peft_adapter(const std::filesystem::path& checkpoint_dir,
                                             const std::filesystem::path& out_dir) {
  verify_exported_files(checkpoint_dir);  // an unfinished checkpoint, or damaged adapters, export nothing
  const RecipeConfig recipe = load_recipe(checkpoint_dir / kRecipeFile, {});
  const LoraConfig& lora = recipe.lora;
  std::vector<std::string> warnings;

  const SafetensorsFile adapter = SafetensorsFile::open(checkpoint_dir / kAdapterFile);
  SafetensorsWriter writer;
  for (const std::string& name : adapter.names()) {
    const TensorInfo& info = adapter.info(name);
    std::vector<float> values(static_cast<size_t>(info.numel()));
    adapter.read_float(name, info.shape, values.data());
    writer.add_float_as(name, DType::F32, info.shape, values.data());
  }

  nlohmann::json targets = nlohmann::json::array();
  for (Projection p : lora.targets) {
    targets.push_back(projection_name(p));
    if (p == Projection::out_proj)
      warnings.push_back(
          "out_proj is among the LoRA targets: PEFT >= 0.16 refuses out_proj adapters for Mamba models, so this "
          "adapter loads in PEFT only without them; a merged export keeps their effect");
    if (p == Projection::dt_proj)
      warnings.push_back(
          "dt_proj is among the LoRA targets: transformers (5.17) computes dt_proj as dt_proj.weight @ x in its "
          "Mamba mixers, bypassing the module, so PEFT loads this adapter but its dt_proj part has no effect "
          "there; a merged export keeps its effect");
  }
  const nlohmann::json config = {
      {"peft_type", "LORA"},
      {"task_type", "CAUSAL_LM"},
      {"base_model_name_or_path", recipe.model_path.string()},
      {"r", lora.rank},
      {"lora_alpha", lora.alpha},
      {"lora_dropout", lora.dropout},
      {"target_modules", targets},
      {"bias", "none"},
      {"fan_in_fan_out", false},
      {"use_rslora", lora.rslora},
      {"use_dora", false},
      {"init_lora_weights", true},
      {"inference_mode", true},
      {"modules_to_save", nullptr},
      {"peft_version", kPeftFormatVersion},
  };
  std::filesystem::create_directories(out_dir);
  writer.write(out_dir / kPeftWeightsFile);
  const std::string text = config.dump(2) + "\n";
  write_file_atomically(out_dir / kPeftConfigFile, std::as_bytes(std::span(text)));
  return warnings;
}

}  // namespace ssmtune
