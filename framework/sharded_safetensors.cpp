#include "framework/sharded_safetensors.h"

#include <algorithm>
#include <charconv>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "framework/atomic_file.h"
#include "framework/error.h"
#include "framework/untrusted_json.h"

namespace ssmtune {

namespace fs = std::filesystem;

ShardedSafetensors ShardedSafetensors::open_dir(const fs::path& dir) {
  if (fs::exists(dir / kSafetensorsName)) return open_file(dir / kSafetensorsName);
  if (fs::exists(dir / kSafetensorsIndexName)) return open_index(dir / kSafetensorsIndexName);
  fail("{}: no model weights: neither {} nor {} exists", dir.string(), kSafetensorsName, kSafetensorsIndexName);
}

ShardedSafetensors ShardedSafetensors::open_file(const fs::path& file) {
  ShardedSafetensors set;
  set.origin_ = file;
  set.files_.push_back(SafetensorsFile::open(file));
  for (std::string& name : set.files_.front().names()) set.owner_.emplace(std::move(name), 0);
  return set;
}

ShardedSafetensors ShardedSafetensors::open_index(const fs::path& index_json) {
  const std::string where = index_json.string();
  nlohmann::json index;
  try {
    index = parse_untrusted_json(where, read_text_file(index_json));
  } catch (const nlohmann::json::parse_error& e) {
    fail("{}: invalid JSON: {}", where, e.what());
  }
  if (!index.is_object()) fail("{}: expected a JSON object, got {}", where, index.type_name());
  if (!index.contains("weight_map")) fail("{}: missing key 'weight_map'", where);
  const nlohmann::json& weight_map = index["weight_map"];
  if (!weight_map.is_object()) fail("{}: key 'weight_map' must be a JSON object, got {}", where, weight_map.type_name());

  ShardedSafetensors set;
  set.origin_ = index_json;
  std::map<std::string, size_t> shard_index;  // shard file name -> index into files_
  for (const auto& [tensor, shard] : weight_map.items()) {
    if (!shard.is_string())
      fail("{}: weight_map['{}'] must be a shard file name, got {}", where, tensor, shard.dump());
    const std::string file = shard.get<std::string>();
    auto [found, added] = shard_index.emplace(file, set.files_.size());
    if (added) {
      const fs::path relative(file);
      const bool leaves_dir = relative.is_absolute() || file.empty() ||
                              std::any_of(relative.begin(), relative.end(), [](const fs::path& part) {
                                return part == "..";
                              });
      if (leaves_dir) fail("{}: shard '{}' (for tensor '{}') is not a file name inside the index's directory", where,
                           file, tensor);
      const fs::path shard_path = index_json.parent_path() / relative;
      if (!fs::exists(shard_path))
        fail("{}: shard '{}' (listed for tensor '{}') does not exist: {}", where, file, tensor, shard_path.string());
      set.files_.push_back(SafetensorsFile::open(shard_path));
    }
    const SafetensorsFile& holder = set.files_[found->second];
    if (!holder.contains(tensor))
      fail("{}: weight_map puts tensor '{}' in '{}', but that file has no such tensor", where, tensor, file);
    set.owner_.emplace(tensor, found->second);
  }
  return set;
}

std::vector<std::string> ShardedSafetensors::names() const {
  std::vector<std::string> names;
  names.reserve(owner_.size());
  for (const auto& [name, file] : owner_) names.push_back(name);
  return names;
}

const SafetensorsFile& ShardedSafetensors::file_of(std::string_view name) const {
  auto found = owner_.find(name);
  if (found == owner_.end()) fail("{}: no tensor '{}'", origin_.string(), name);
  return files_[found->second];
}

PlannedTensor ShardedSafetensors::copy_as(std::string_view name, std::string new_name) const {
  const TensorInfo& tensor = info(name);
  return {std::move(new_name), tensor.dtype, tensor.shape, [this, name = std::string(name)](std::span<std::byte> to) {
            const std::span<const std::byte> from = bytes(name);
            std::copy(from.begin(), from.end(), to.begin());
          }};
}

uint64_t parse_byte_size(std::string_view text, std::string_view what) {
  static const std::pair<std::string_view, uint64_t> kUnits[] = {
      {"", 1},          {"B", 1},           {"KB", 1'000},       {"MB", 1'000'000},
      {"GB", 1'000'000'000}, {"KiB", 1ull << 10}, {"MiB", 1ull << 20}, {"GiB", 1ull << 30},
  };
  uint64_t number = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), number);
  const std::string_view unit = text.substr(static_cast<size_t>(end - text.data()));
  if (error == std::errc() && number > 0)
    for (const auto& [name, multiple] : kUnits) {
      uint64_t bytes = 0;
      if (unit == name && !__builtin_mul_overflow(number, multiple, &bytes)) return bytes;
    }
  fail("{} '{}': expected a positive whole number of bytes, optionally with a unit KB, MB, GB (powers of 1000) or "
       "KiB, MiB, GiB (powers of 1024), e.g. 5GB",
       what, text);
}

std::vector<std::string> write_sharded_safetensors(const fs::path& dir, std::span<const PlannedTensor> tensors,
                                                   uint64_t max_shard_bytes) {
  // Which tensors go into which shard, by the rule huggingface_hub's split_state_dict_into_shards uses.
  std::vector<std::vector<PlannedTensor>> shards;
  uint64_t current_bytes = 0, total_bytes = 0;
  bool current_open = false;
  for (const PlannedTensor& tensor : tensors) {
    const uint64_t bytes = tensor.byte_size();
    total_bytes += bytes;
    if (bytes > max_shard_bytes) {
      shards.insert(current_open ? shards.end() - 1 : shards.end(), {tensor});
      continue;
    }
    if (!current_open || current_bytes + bytes > max_shard_bytes) {
      shards.emplace_back();
      current_bytes = 0;
      current_open = true;
    }
    shards.back().push_back(tensor);
    current_bytes += bytes;
  }
  if (shards.empty()) shards.emplace_back();  // a model without tensors is still one (empty) file

  const std::map<std::string, std::string> metadata{{"format", "pt"}};
  if (shards.size() == 1) {
    write_safetensors(dir / kSafetensorsName, shards.front(), metadata);
    return {kSafetensorsName};
  }
  std::vector<std::string> files;
  nlohmann::json weight_map = nlohmann::json::object();
  for (size_t i = 0; i < shards.size(); ++i) {
    const std::string file = fmt::format("model-{:05d}-of-{:05d}.safetensors", i + 1, shards.size());
    write_safetensors(dir / file, shards[i], metadata);
    for (const PlannedTensor& tensor : shards[i]) weight_map[tensor.name] = file;
    files.push_back(file);
  }
  const nlohmann::json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", weight_map}};
  const std::string text = index.dump(2) + "\n";
  write_file_atomically(dir / kSafetensorsIndexName, std::as_bytes(std::span(text)));
  files.push_back(kSafetensorsIndexName);
  return files;
}

}  // namespace ssmtune
