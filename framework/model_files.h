// A base model as a Hugging Face directory holds it: config.json, and the weights in model.safetensors
// or in shards with an index (sharded_safetensors.h), the projections either in floating point or
// pre-quantized by bitsandbytes, which config.json's quantization_config announces (nf4_checkpoint.h).
// The loader, `ssmtune quantize` and the merged export all read a base model through this.
#pragma once
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "framework/mamba_config.h"
#include "framework/mamba_model.h"
#include "framework/nf4_checkpoint.h"
#include "framework/sharded_safetensors.h"

namespace ssmtune {

inline constexpr const char* kConfigName = "config.json";

class ModelFiles {
 public:
  // Errors name the file and key or tensor: config.json missing, malformed or of an unsupported
  // model_type (mamba_config.h), a quantization_config we do not support (nf4_checkpoint.h), weights
  // missing or malformed (sharded_safetensors.h).
  static ModelFiles open(const std::filesystem::path& dir);

  const std::filesystem::path& dir() const { return dir_; }
  std::filesystem::path config_path() const { return dir_ / kConfigName; }
  // The architecture. quantization_config is not part of it: it is taken out of `extra`.
  const MambaConfig& config() const { return config_; }
  const ShardedSafetensors& tensors() const { return tensors_; }
  // config.json declares a bitsandbytes NF4 checkpoint (a supported quantization_config).
  bool prequantized() const { return prequantized_; }

  // An untied head: the checkpoint stores lm_head.weight.
  bool has_lm_head() const { return tensors_.contains("lm_head.weight"); }
  // mamba_tensors() of this checkpoint.
  std::vector<MambaTensor> layout() const { return mamba_tensors(config_, has_lm_head()); }
  // The name the checkpoint stores `t` under: its HF name, or mamba_ssm's for the embedding.
  std::string stored_name(const MambaTensor& t) const;
  // The checkpoint's own tensors that layout() does not account for (neither a tensor of it nor part
  // of a pre-quantized projection), sorted.
  std::vector<std::string> other_tensors() const;

  // A projection as bitsandbytes stored it, checked against its shape; nothing when it is stored in
  // floating point (a module transformers left unquantized). Error: bitsandbytes tensors in a
  // checkpoint whose config.json has no quantization_config.
  std::optional<Nf4HostWeight> stored_nf4(const MambaTensor& projection) const;
  // A projection in NF4 as training holds it: stored_nf4, or the floating-point weight quantized as
  // every backend's nf4_quantize quantizes it (cpu::nf4_quantize).
  Nf4HostWeight projection_nf4(const MambaTensor& projection) const;

 private:
  std::filesystem::path dir_;
  MambaConfig config_;
  ShardedSafetensors tensors_;
  bool prequantized_ = false;
};

}  // namespace ssmtune
