// Export of a training checkpoint as a PEFT LoRA adapter (REFERENCE.md §4): adapter_config.json and
// adapter_model.safetensors that `PeftModel.from_pretrained` loads.
#pragma once
#include <filesystem>
#include <string>
#include <vector>

namespace ssmtune {

// The two files of a PEFT adapter directory (framework/peft_import.h reads them back).
inline constexpr const char* kPeftConfigFile = "adapter_config.json";
inline constexpr const char* kPeftWeightsFile = "adapter_model.safetensors";

// Writes the adapter into out_dir and returns warnings for the user (e.g. targets PEFT refuses). An Error
// naming the file when the checkpoint's manifest is missing or a file does not match it.
std::vector<std::string> export_peft_adapter(const std::filesystem::path& checkpoint_dir,
                                             const std::filesystem::path& out_dir);

}  // namespace ssmtune
