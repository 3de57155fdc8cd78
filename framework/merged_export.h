// `ssmtune export --format merged`: the fine-tuned model as one Hugging Face model that
// MambaForCausalLM.from_pretrained loads without PEFT (which refuses out_proj adapters for Mamba).
// Every projection becomes
//   W' = dequantize(NF4(W)) + scale · B · A        (B·A and the sum in double, then rounded once)
// NF4(W) being the base weight exactly as training held it (quantized as the loader quantizes it, or as
// stored in a pre-quantized base), not W itself: the adapters were trained against that weight, so the
// merged model computes what the trained model computed, up to the output dtype; projections without
// an adapter are the dequantized base alone. Every other tensor of the base model is copied, converted
// to the output dtype when it is floating point; config.json is the base's without quantization_config,
// with "dtype". The weights are sharded as save_pretrained shards them, and the directory appears
// complete or not at all (atomic_directory.h).
#pragma once
#include <cstdint>
#include <filesystem>

#include "framework/dtype.h"
#include "framework/sharded_safetensors.h"

namespace ssmtune {

struct MergedExportOptions {
  std::filesystem::path model;  // the base model; empty: model.path of the checkpoint's recipe
  DType dtype = DType::BF16;    // of every floating-point tensor written: F32, BF16 or F16
  uint64_t max_shard_bytes = kDefaultMaxShardBytes;
};

// Errors name the file and tensor or key: an incomplete or damaged checkpoint (no manifest, or a file
// that does not match it), a base model that is not there (saying where its path came from), adapters
// that do not fit the base model or the recipe's lora.targets, an output directory that exists and is
// not empty.
void export_merged_model(const std::filesystem::path& checkpoint_dir, const std::filesystem::path& out_dir,
                         const MergedExportOptions& options);

}  // namespace ssmtune
