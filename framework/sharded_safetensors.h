// The weights of a Hugging Face model directory as one set of named tensors (REFERENCE.md §5): either
// model.safetensors, or the shards that model.safetensors.index.json lists,
//   {"metadata": {"total_size": <bytes of all tensors>}, "weight_map": {<tensor>: <shard file>}},
// read through one interface, and written the way transformers' save_pretrained writes them.
#pragma once
#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "framework/safetensors.h"

namespace ssmtune {

inline constexpr const char* kSafetensorsName = "model.safetensors";
inline constexpr const char* kSafetensorsIndexName = "model.safetensors.index.json";

class ShardedSafetensors {
 public:
  // <dir>/model.safetensors when there is one (transformers looks for it first), otherwise the index
  // beside it; an Error naming the directory and both names when neither exists.
  static ShardedSafetensors open_dir(const std::filesystem::path& dir);
  // One file, as a set of one shard.
  static ShardedSafetensors open_file(const std::filesystem::path& file);
  // The index and the shards it names (relative to its directory). Errors name the index and: JSON
  // that does not parse, a weight_map that is missing or not {string: string}, a shard path that
  // leaves the directory, a shard that does not exist (and one tensor it should hold), a tensor the
  // map puts in a shard that lacks it. Tensors a shard holds but the map does not list are not read,
  // as transformers does not read them.
  static ShardedSafetensors open_index(const std::filesystem::path& index_json);

  // The single file or the index, for messages.
  const std::filesystem::path& origin() const { return origin_; }
  std::vector<std::string> names() const;  // sorted
  bool contains(std::string_view name) const { return owner_.contains(name); }
  // The shard holding the tensor; Error "<origin>: no tensor '<name>'".
  const SafetensorsFile& file_of(std::string_view name) const;
  const TensorInfo& info(std::string_view name) const { return file_of(name).info(name); }
  const TensorInfo& float_info(std::string_view name, std::span<const int64_t> expected_shape) const {
    return file_of(name).float_info(name, expected_shape);
  }
  std::span<const std::byte> bytes(std::string_view name) const { return file_of(name).bytes(name); }
  // As SafetensorsFile's, whose messages name the shard.
  void read_float(std::string_view name, std::span<const int64_t> expected_shape, float* out) const {
    file_of(name).read_float(name, expected_shape, out);
  }
  void read_double(std::string_view name, std::span<const int64_t> expected_shape, double* out) const {
    file_of(name).read_double(name, expected_shape, out);
  }
  // The tensor, to be written unchanged (dtype, shape, bytes) under `new_name`; it reads from this set
  // when written, so the set must outlive the write.
  PlannedTensor copy_as(std::string_view name, std::string new_name) const;

 private:
  std::filesystem::path origin_;
  std::vector<SafetensorsFile> files_;
  std::map<std::string, size_t, std::less<>> owner_;  // tensor -> index into files_
};

// transformers' default max_shard_size, "5GB".
inline constexpr uint64_t kDefaultMaxShardBytes = 5'000'000'000;

// A size as transformers' max_shard_size spells it: a positive integer number of bytes, optionally
// followed by KB, MB or GB (powers of 1000) or KiB, MiB or GiB (powers of 1024). The Error names
// `what` (e.g. "--max-shard-size"). A lowercase "b" (which transformers reads as bits) is refused.
uint64_t parse_byte_size(std::string_view text, std::string_view what);

// Writes the tensors into `dir` as save_pretrained does (huggingface_hub's split): in the given order,
// a new shard whenever the next tensor would take the current one past max_shard_bytes, a tensor
// larger than the limit alone in a shard of its own. One shard is written as model.safetensors, several
// as model-<i>-of-<n>.safetensors (5 digits each) plus the index, whose total_size is the bytes of all
// tensors. Every file is written atomically; returns their names.
std::vector<std::string> write_sharded_safetensors(const std::filesystem::path& dir,
                                                   std::span<const PlannedTensor> tensors,
                                                   uint64_t max_shard_bytes);

}  // namespace ssmtune
