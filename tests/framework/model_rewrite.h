// Copies of a model directory with tensors changed, for tests of what the loaders accept and refuse.
#pragma once
#include <filesystem>
#include <functional>
#include <vector>

#include "framework/atomic_file.h"
#include "framework/sharded_safetensors.h"

namespace ssmtune::test {

// What to write for one tensor of the source: nothing drops it, a copy keeps it (source.copy_as).
using TensorEdit = std::function<std::vector<PlannedTensor>(const std::string& name, const ShardedSafetensors& source)>;

inline std::vector<PlannedTensor> keep(const std::string& name, const ShardedSafetensors& source) {
  return {source.copy_as(name, name)};
}

// Writes `to` (config.json as in `from`, or `config_text` when given) with the tensors of `from`, in
// sorted order, each passed through `edit`, sharded at max_shard_bytes.
inline void rewrite_model(const std::filesystem::path& from, const std::filesystem::path& to, const TensorEdit& edit,
                          uint64_t max_shard_bytes = kDefaultMaxShardBytes, const std::string& config_text = "") {
  const ShardedSafetensors source = ShardedSafetensors::open_dir(from);
  std::vector<PlannedTensor> planned;
  for (const std::string& name : source.names())
    for (PlannedTensor& t : edit(name, source)) planned.push_back(std::move(t));
  std::filesystem::create_directories(to);
  write_sharded_safetensors(to, planned, max_shard_bytes);
  const std::string config = config_text.empty() ? read_text_file(from / "config.json") : config_text;
  write_file_atomically(to / "config.json", std::as_bytes(std::span(config)));
}

// An edit that stores every floating-point tensor in `dtype` (rounded as torch's .to() rounds).
inline TensorEdit convert_floats_to(DType dtype) {
  return [dtype](const std::string& name, const ShardedSafetensors& source) -> std::vector<PlannedTensor> {
    const TensorInfo& info = source.info(name);
    if (!is_floating_point(info.dtype)) return keep(name, source);
    return {{name, dtype, info.shape, [&source, name, info, dtype](std::span<std::byte> to) {
               std::vector<double> values(static_cast<size_t>(info.numel()));
               source.read_double(name, info.shape, values.data());
               convert_from_double(values.data(), values.size(), dtype, to.data());
             }}};
  };
}

}  // namespace ssmtune::test
