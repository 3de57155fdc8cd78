#include "framework/checkpoint.h"

#include <nlohmann/json.hpp>
#include <fcntl.h>
#include <unistd.h>

#include <regex>

#include "framework/atomic_file.h"
#include "framework/error.h"
#include "framework/safetensors.h"

namespace ssmtune {
namespace {

namespace fs = std::filesystem;

const std::regex kStepDir(R"(step_(\d+))");

// One flat adapter buffer as named tensors: PEFT's keys, with a prefix for the optimizer moments.
// Stored in the master dtype, so a reload is bit-exact.
void add_flat(SafetensorsWriter& writer, const LoraAdapters& adapters, const std::string& prefix, const void* buffer) {
  const std::vector<double> values = adapters.download(buffer);
  const DType dtype = adapters.dtype();
  for (const AdapterTensor& t : adapters.tensors()) {
    std::vector<std::byte> bytes(static_cast<size_t>(t.numel()) * dtype_size(dtype));
    convert_from_double(values.data() + t.offset, static_cast<size_t>(t.numel()), dtype, bytes.data());
    writer.add(prefix + t.peft_key, dtype, {t.rows, t.cols}, bytes.data());
  }
}

void read_flat(const SafetensorsFile& file, LoraAdapters& adapters, const std::string& prefix, void* buffer) {
  std::vector<double> values(static_cast<size_t>(adapters.numel()));
  for (const AdapterTensor& t : adapters.tensors()) {
    const std::vector<int64_t> shape{t.rows, t.cols};
    file.read_double(prefix + t.peft_key, shape, values.data() + t.offset);
  }
  adapters.upload(buffer, values);
}

void fsync_directory(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

}  // namespace

fs::path save_checkpoint(const fs::path& output_dir, const LoraAdapters& adapters, const TrainingState& state,
                         const std::string& resolved_recipe) {
  const fs::path root = output_dir / "checkpoints";
  const fs::path final_dir = root / ("step_" + std::to_string(state.step));
  const fs::path temp_dir = root / (".step_" + std::to_string(state.step) + ".tmp." + std::to_string(::getpid()));
  fs::create_directories(root);
  fs::remove_all(temp_dir);
  fs::create_directories(temp_dir);

  SafetensorsWriter adapter_writer;
  add_flat(adapter_writer, adapters, "", adapters.params());
  adapter_writer.write(temp_dir / kAdapterFile);
  SafetensorsWriter optimizer_writer;
  add_flat(optimizer_writer, adapters, "adam_m.", adapters.adam_m());
  add_flat(optimizer_writer, adapters, "adam_v.", adapters.adam_v());
  optimizer_writer.write(temp_dir / kOptimizerFile);
  write_file_atomically(temp_dir / kRecipeFile, std::as_bytes(std::span(resolved_recipe)));

  const LoraConfig& lora = adapters.config();
  nlohmann::json targets = nlohmann::json::array();
  for (Projection p : lora.targets) targets.push_back(projection_name(p));
  const nlohmann::json json = {
      {"format", "ssmtune-checkpoint-1"},
      {"step", state.step},
      {"seed", state.seed},
      {"world_size", state.world_size},
      {"sampler", {{"epoch", state.sampler.epoch}, {"index", state.sampler.index}}},
      {"lora", {{"rank", lora.rank}, {"alpha", lora.alpha}, {"dropout", lora.dropout}, {"rslora", lora.rslora},
                {"targets", targets}}},
  };
  const std::string text = json.dump(2) + "\n";
  write_file_atomically(temp_dir / kStateFile, std::as_bytes(std::span(text)));
  fsync_directory(temp_dir);

  // A checkpoint of this step from an interrupted earlier run is replaced as a whole.
  fs::remove_all(final_dir);
  fs::rename(temp_dir, final_dir);
  fsync_directory(root);
  return final_dir;
}

std::optional<fs::path> latest_checkpoint(const fs::path& output_dir) {
  const fs::path root = output_dir / "checkpoints";
  if (!fs::is_directory(root)) return std::nullopt;
  std::optional<fs::path> best;
  int64_t best_step = -1;
  for (const fs::directory_entry& entry : fs::directory_iterator(root)) {
    std::smatch match;
    const std::string name = entry.path().filename().string();
    if (!entry.is_directory() || !std::regex_match(name, match, kStepDir)) continue;
    if (!fs::exists(entry.path() / kStateFile)) continue;
    const int64_t step = std::stoll(match[1].str());
    if (step > best_step) {
      best_step = step;
      best = entry.path();
    }
  }
  return best;
}

TrainingState load_checkpoint(const fs::path& dir, LoraAdapters& adapters) {
  const fs::path state_path = dir / kStateFile;
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(read_text_file(state_path));
  } catch (const nlohmann::json::exception& e) {
    fail("{}: not valid JSON: {}", state_path.string(), e.what());
  }
  TrainingState state;
  try {
    state.step = json.at("step").get<int64_t>();
    state.seed = json.at("seed").get<uint64_t>();
    state.world_size = json.at("world_size").get<int>();
    state.sampler.epoch = json.at("sampler").at("epoch").get<uint64_t>();
    state.sampler.index = json.at("sampler").at("index").get<uint64_t>();
    const nlohmann::json& lora = json.at("lora");
    if (lora.at("rank").get<int64_t>() != adapters.config().rank)
      fail("{}: checkpoint has LoRA rank {}, the recipe asks for {}", state_path.string(),
           lora.at("rank").get<int64_t>(), adapters.config().rank);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: {}", state_path.string(), e.what());
  }
  read_flat(SafetensorsFile::open(dir / kAdapterFile), adapters, "", adapters.params());
  const SafetensorsFile optimizer = SafetensorsFile::open(dir / kOptimizerFile);
  read_flat(optimizer, adapters, "adam_m.", adapters.adam_m());
  read_flat(optimizer, adapters, "adam_v.", adapters.adam_v());
  return state;
}

}  // namespace ssmtune
