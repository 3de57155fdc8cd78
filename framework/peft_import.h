// Import of a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors, as
// `ssmtune export --format peft` writes it and PEFT's save_pretrained saves it) into ssmtune's adapter
// layout: the inverse of framework/peft_export.h. The tensor names are PEFT's
// (base_model.model.backbone.layers.{i}.mixer.<proj>.lora_{A,B}.weight), the adapters' own keys.
#pragma once
#include <filesystem>

#include "framework/lora.h"

namespace ssmtune {

// The LoRA configuration of <dir>/adapter_config.json: r, lora_alpha, use_rslora, lora_dropout and
// target_modules (a list of in_proj, x_proj, dt_proj, out_proj, or one of them as a string). Errors name
// the file and the key: a missing or malformed value, another peft_type, and what ssmtune's adapters
// cannot express (DoRA, fan_in_fan_out, a bias, per-module rank or alpha patterns, a subset of layers).
LoraConfig read_peft_adapter_config(const std::filesystem::path& dir);

// Loads <dir>/adapter_model.safetensors into adapters, built from read_peft_adapter_config(dir) for
// the base model at hand. Every tensor of the layout must be there with its shape ([r, in] for A, [out,
// r] for B), and every tensor there must belong to the layout; otherwise an Error names the file and
// the tensor (and both shapes).
void load_peft_adapter(const std::filesystem::path& dir, LoraAdapters& adapters);

}  // namespace ssmtune
