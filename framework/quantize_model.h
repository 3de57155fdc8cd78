// `ssmtune quantize`: a base model written as transformers + bitsandbytes save one loaded with
// load_in_4bit, NF4 and double quantization (nf4_checkpoint.h). Each projection is quantized exactly as
// our loader quantizes it, so loading the output gives the same weights, bit for bit, as loading the
// source, with an eighth of the projections' fp32 bytes to read. Every other tensor is copied as the
// source stores it (dtype and bytes; the embedding under its HF name), and config.json gains
// quantization_config. The output directory appears complete or not at all (atomic_directory.h).
#pragma once
#include <cstdint>
#include <filesystem>

#include "framework/sharded_safetensors.h"

namespace ssmtune {

// Errors: everything ModelFiles::open and the loader refuse (named file, key or tensor), a source
// that is already quantized, a projection with non-finite values, an output directory that exists
// and is not empty.
void write_quantized_model(const std::filesystem::path& model_dir, const std::filesystem::path& out_dir,
                           uint64_t max_shard_bytes = kDefaultMaxShardBytes);

}  // namespace ssmtune
