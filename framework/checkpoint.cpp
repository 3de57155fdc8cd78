#include "framework/checkpoint.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <regex>

#include "framework/atomic_file.h"
#include "framework/checkpoint_manifest.h"
#include "framework/error.h"
#include "framework/safetensors.h"
#include "framework/untrusted_json.h"

namespace ssmtune {
namespace {

namespace fs = std::filesystem;

const std::regex kStepDir(R"(step_(\d{1,18}))");  // 18 digits fit int64_t
constexpr const char* kFormat = "ssmtune-checkpoint-3";

// The parameters as named tensors with PEFT's keys, in the master dtype, so a reload is bit-exact.
void write_adapter(const LoraAdapters& adapters, const fs::path& path) {
  const std::vector<double> values = adapters.download(adapters.params());
  const DType dtype = adapters.dtype();
  SafetensorsWriter writer;
  for (const AdapterTensor& t : adapters.tensors()) {
    std::vector<std::byte> bytes(static_cast<size_t>(t.numel()) * dtype_size(dtype));
    convert_from_double(values.data() + t.offset, static_cast<size_t>(t.numel()), dtype, bytes.data());
    writer.add(t.peft_key, dtype, {t.rows, t.cols}, bytes.data());
  }
  writer.write(path);
}

void read_adapter(const fs::path& path, LoraAdapters& adapters) {
  const SafetensorsFile file = SafetensorsFile::open(path);
  std::vector<double> values(static_cast<size_t>(adapters.numel()));
  for (const AdapterTensor& t : adapters.tensors()) {
    const std::vector<int64_t> shape{t.rows, t.cols};
    file.read_double(t.peft_key, shape, values.data() + t.offset);
  }
  adapters.upload(adapters.params(), values);
}

// The moments of the adapters' optimizer range, flat, in the master dtype.
void write_moments(const LoraAdapters& adapters, const fs::path& path) {
  const DType dtype = adapters.dtype();
  const FlatRange range = adapters.optimizer_range();
  SafetensorsWriter writer;
  for (const auto& [name, buffer] : {std::pair{"adam_m", adapters.adam_m()}, std::pair{"adam_v", adapters.adam_v()}}) {
    const std::vector<double> values = adapters.download(buffer);
    std::vector<std::byte> bytes(values.size() * dtype_size(dtype));
    convert_from_double(values.data(), values.size(), dtype, bytes.data());
    writer.add(name, dtype, {range.size()}, bytes.data());
  }
  writer.set_metadata("begin", std::to_string(range.begin));
  writer.set_metadata("end", std::to_string(range.end));
  writer.set_metadata("numel", std::to_string(adapters.numel()));
  writer.write(path);
}

struct MomentShard {
  std::string file;
  FlatRange range;
};

// Fills the moments of `wanted` (indices relative to wanted.begin) from the shards that overlap it.
void read_moments(const fs::path& dir, const CheckpointManifest& manifest, const std::vector<MomentShard>& shards,
                  FlatRange wanted, std::vector<double>& m, std::vector<double>& v) {
  for (const MomentShard& shard : shards) {
    const FlatRange overlap = intersect(shard.range, wanted);
    if (overlap.size() == 0) continue;
    manifest.verify(shard.file);
    const SafetensorsFile file = SafetensorsFile::open(dir / shard.file);
    const std::map<std::string, std::string>& meta = file.metadata();
    const auto said = [&meta](const char* key) { return meta.contains(key) ? meta.at(key) : "(none)"; };
    if (said("begin") != std::to_string(shard.range.begin) || said("end") != std::to_string(shard.range.end))
      fail("{}: holds elements [{}, {}) of the optimizer state by its metadata, {} lists it for [{}, {})",
           file.path().string(), said("begin"), said("end"), kStateFile, shard.range.begin, shard.range.end);
    for (const auto& [name, out] : {std::pair{"adam_m", &m}, std::pair{"adam_v", &v}}) {
      const TensorInfo& info = file.info(name);
      if (info.shape != std::vector<int64_t>{shard.range.size()})
        fail("{}: tensor '{}' has shape [{}], expected [{}] for elements [{}, {}) of the optimizer state",
             file.path().string(), name, fmt::join(info.shape, ", "), shard.range.size(), shard.range.begin,
             shard.range.end);
      if (info.dtype != DType::F32 && info.dtype != DType::F64)
        fail("{}: tensor '{}' is {}, expected F32 or F64", file.path().string(), name, dtype_name(info.dtype));
      const size_t element = dtype_size(info.dtype);
      const std::span<const std::byte> bytes = file.bytes(name);
      convert_to_double(info.dtype, bytes.data() + (overlap.begin - shard.range.begin) * element,
                        static_cast<size_t>(overlap.size()), out->data() + (overlap.begin - wanted.begin));
    }
  }
}

// A rename or deletion inside `dir` is durable once the directory is synced.
void fsync_directory(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  const bool synced = fd >= 0 && ::fsync(fd) == 0;
  if (fd >= 0) ::close(fd);
  if (!synced) fail("{}: cannot sync the directory: {}", dir.string(), std::strerror(errno));
}

std::optional<int64_t> step_of(const fs::directory_entry& entry) {
  std::smatch match;
  const std::string name = entry.path().filename().string();
  if (!entry.is_directory() || !std::regex_match(name, match, kStepDir)) return std::nullopt;
  return std::stoll(match[1].str());
}

// The step_<N> directories under root, newest first.
std::vector<std::pair<int64_t, fs::path>> step_directories(const fs::path& root) {
  std::vector<std::pair<int64_t, fs::path>> found;
  if (!fs::is_directory(root)) return found;
  for (const fs::directory_entry& entry : fs::directory_iterator(root))
    if (const std::optional<int64_t> step = step_of(entry)) found.emplace_back(*step, entry.path());
  std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  return found;
}

// Deletes a checkpoint directory so that a crash midway leaves no half of it under a complete name:
// it is renamed to a temporary first (removed by remove_interrupted_saves when a crash interrupts).
void remove_checkpoint(const fs::path& dir) {
  const fs::path doomed = dir.parent_path() / ("." + dir.filename().string() + ".removing");
  fs::remove_all(doomed);
  fs::rename(dir, doomed);
  fsync_directory(dir.parent_path());
  fs::remove_all(doomed);
}

// After checkpoint `newest` is complete: the older ones beyond the keep_last newest go.
void remove_old_checkpoints(const fs::path& root, int64_t newest, int64_t keep_last) {
  if (keep_last <= 0) return;
  int64_t kept = 1;  // the new one
  for (const auto& [step, dir] : step_directories(root)) {
    if (step >= newest) continue;
    if (kept < keep_last)
      ++kept;
    else
      remove_checkpoint(dir);
  }
}

}  // namespace

std::string optimizer_file_name(ShardIndex shard) {
  return shard.count == 1 ? kOptimizerFile : fmt::format("optimizer-{}-of-{}.safetensors", shard.index, shard.count);
}

fs::path save_checkpoint(Communicator& ranks, const fs::path& output_dir, const LoraAdapters& adapters,
                         ShardIndex optimizer_shard, const TrainingState& state, const std::string& resolved_recipe,
                         int64_t keep_last) {
  const fs::path root = output_dir / "checkpoints";
  const fs::path final_dir = root / ("step_" + std::to_string(state.step));
  const fs::path temp_dir = root / (".step_" + std::to_string(state.step) + ".tmp");
  if (shard_range(adapters.numel(), optimizer_shard) != adapters.optimizer_range())
    fail("internal: save_checkpoint: optimizer shard {} of {} is not the adapters' optimizer range",
         optimizer_shard.index, optimizer_shard.count);
  if (ranks.rank() == 0) {
    fs::create_directories(root);
    fs::remove_all(temp_dir);  // left by an interrupted save
    fs::create_directories(temp_dir);
  }
  ranks.barrier();
  if (!fs::is_directory(temp_dir))
    fail("{}: rank {} cannot see the checkpoint directory rank 0 created: train.output_dir must be on a "
         "filesystem that every host of the job shares",
         temp_dir.string(), ranks.rank());
  const bool writes_moments = optimizer_shard.count > 1 || ranks.rank() == 0;
  if (writes_moments) write_moments(adapters, temp_dir / optimizer_file_name(optimizer_shard));
  ranks.barrier();

  if (ranks.rank() == 0) {
    write_adapter(adapters, temp_dir / kAdapterFile);
    write_file_atomically(temp_dir / kRecipeFile, std::as_bytes(std::span(resolved_recipe)));
    const LoraConfig& lora = adapters.config();
    nlohmann::json targets = nlohmann::json::array();
    for (Projection p : lora.targets) targets.push_back(projection_name(p));
    nlohmann::json shards = nlohmann::json::array();
    std::vector<std::string> files{kAdapterFile, kRecipeFile, kStateFile};
    for (int i = 0; i < optimizer_shard.count; ++i) {
      const FlatRange range = shard_range(adapters.numel(), {i, optimizer_shard.count});
      files.push_back(optimizer_file_name({i, optimizer_shard.count}));
      shards.push_back({{"file", files.back()}, {"begin", range.begin}, {"end", range.end}});
    }
    const nlohmann::json json = {
        {"format", kFormat},
        {"step", state.step},
        {"seed", state.seed},
        {"world_size", state.world_size},
        {"strategy", state.strategy},
        {"global_batch", state.global_batch},
        {"sampler", {{"epoch", state.sampler.epoch}, {"index", state.sampler.index}}},
        {"bad_steps", {{"in_a_row", state.bad_steps_in_a_row}, {"total", state.bad_steps_total}}},
        {"lora", {{"rank", lora.rank}, {"alpha", lora.alpha}, {"dropout", lora.dropout}, {"rslora", lora.rslora},
                  {"targets", targets}}},
        {"optimizer", {{"numel", adapters.numel()}, {"shards", shards}}},
    };
    const std::string text = json.dump(2) + "\n";
    write_file_atomically(temp_dir / kStateFile, std::as_bytes(std::span(text)));
    write_manifest(temp_dir, files);  // last: with it, and under its final name, the checkpoint is complete
    // A checkpoint of this step from an interrupted earlier run is replaced as a whole (rename() cannot
    // replace a directory that has files).
    if (fs::exists(final_dir)) {
      const fs::path replaced = root / (".step_" + std::to_string(state.step) + ".replaced");
      fs::remove_all(replaced);
      fs::rename(final_dir, replaced);
      fs::rename(temp_dir, final_dir);
      fsync_directory(root);
      fs::remove_all(replaced);
    } else {
      fs::rename(temp_dir, final_dir);
    }
    fsync_directory(root);
    remove_old_checkpoints(root, state.step, keep_last);
  }
  ranks.barrier();  // no rank goes on (or exits) before the checkpoint is complete
  return final_dir;
}

CheckpointSearch find_latest_checkpoint(const fs::path& output_dir) {
  CheckpointSearch search;
  for (const auto& [step, dir] : step_directories(output_dir / "checkpoints")) {
    try {
      CheckpointManifest::read(dir).verify_all();
      search.latest = dir;
      return search;
    } catch (const Error& e) {
      search.skipped.emplace_back(dir, e.what());
    }
  }
  return search;
}

std::vector<std::string> remove_interrupted_saves(const fs::path& output_dir) {
  const fs::path root = output_dir / "checkpoints";
  std::vector<std::string> removed;
  if (!fs::is_directory(root)) return removed;
  for (const fs::directory_entry& entry : fs::directory_iterator(root))
    if (const std::string name = entry.path().filename().string(); name.starts_with(".step_"))
      removed.push_back(name);
  for (const std::string& name : removed) fs::remove_all(root / name);
  if (!removed.empty()) fsync_directory(root);
  std::sort(removed.begin(), removed.end());
  return removed;
}

TrainingState load_checkpoint(const fs::path& dir, LoraAdapters& adapters) {
  const fs::path state_path = dir / kStateFile;
  const CheckpointManifest manifest = CheckpointManifest::read(dir);
  manifest.verify(kStateFile);
  nlohmann::json json;
  try {
    json = parse_untrusted_json(state_path.string(), read_text_file(state_path));
  } catch (const nlohmann::json::exception& e) {
    fail("{}: not valid JSON: {}", state_path.string(), e.what());
  }
  TrainingState state;
  std::vector<MomentShard> shards;
  try {
    if (json.at("format").get<std::string>() != kFormat)
      fail("{}: format '{}', this version of ssmtune reads '{}'", state_path.string(),
           json.at("format").get<std::string>(), kFormat);
    state.step = json.at("step").get<int64_t>();
    state.seed = json.at("seed").get<uint64_t>();
    state.world_size = json.at("world_size").get<int>();
    state.strategy = json.at("strategy").get<std::string>();
    state.global_batch = json.at("global_batch").get<int64_t>();
    state.sampler.epoch = json.at("sampler").at("epoch").get<uint64_t>();
    state.sampler.index = json.at("sampler").at("index").get<uint64_t>();
    state.bad_steps_in_a_row = json.at("bad_steps").at("in_a_row").get<int64_t>();
    state.bad_steps_total = json.at("bad_steps").at("total").get<int64_t>();
    const nlohmann::json& lora = json.at("lora");
    if (lora.at("rank").get<int64_t>() != adapters.config().rank)
      fail("{}: checkpoint has LoRA rank {}, the recipe asks for {}", state_path.string(),
           lora.at("rank").get<int64_t>(), adapters.config().rank);
    const nlohmann::json& optimizer = json.at("optimizer");
    if (optimizer.at("numel").get<int64_t>() != adapters.numel())
      fail("{}: the optimizer state has {} elements, the recipe's adapters {} (other LoRA targets?)",
           state_path.string(), optimizer.at("numel").get<int64_t>(), adapters.numel());
    for (const nlohmann::json& s : optimizer.at("shards"))
      shards.push_back({s.at("file").get<std::string>(), {s.at("begin").get<int64_t>(), s.at("end").get<int64_t>()}});
  } catch (const nlohmann::json::exception& e) {
    fail("{}: {}", state_path.string(), e.what());
  }
  std::sort(shards.begin(), shards.end(), [](const auto& a, const auto& b) { return a.range.begin < b.range.begin; });
  int64_t covered = 0;
  for (const MomentShard& s : shards) {
    if (s.range.begin != covered || s.range.end < s.range.begin)
      fail("{}: the optimizer shards do not tile the state: '{}' holds [{}, {}), expected to start at {}",
           state_path.string(), s.file, s.range.begin, s.range.end, covered);
    covered = s.range.end;
  }
  if (covered != adapters.numel())
    fail("{}: the optimizer shards cover {} of {} elements", state_path.string(), covered, adapters.numel());

  manifest.verify(kAdapterFile);
  read_adapter(dir / kAdapterFile, adapters);
  const FlatRange wanted = adapters.optimizer_range();
  std::vector<double> m(static_cast<size_t>(wanted.size())), v(static_cast<size_t>(wanted.size()));
  read_moments(dir, manifest, shards, wanted, m, v);
  adapters.upload(adapters.adam_m(), m);
  adapters.upload(adapters.adam_v(), v);
  return state;
}

void verify_exported_files(const std::filesystem::path& dir) {
  const CheckpointManifest manifest = CheckpointManifest::read(dir);
  for (const char* file : {kRecipeFile, kAdapterFile}) manifest.verify(file);
}

}  // namespace ssmtune
