#include "tests/hf/hf_reference.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "framework/atomic_file.h"
#include "framework/error.h"

namespace ssmtune::test {

namespace fs = std::filesystem;

namespace {

constexpr const char* kReferenceFile = "reference.safetensors";
constexpr const char* kPeftAdapterDir = "adapter";

Projection projection_named(const std::string& name, const std::string& source) {
  for (Projection p : kProjections)
    if (projection_name(p) == name) return p;
  fail("{}: target module '{}' is not a Mamba projection", source, name);
}

}  // namespace

fs::path hf_reference_root() {
  if (const char* dir = std::getenv("SSMTUNE_HF_DIR"); dir && *dir) return dir;
  return fs::path(SSMTUNE_SOURCE_DIR) / "tests/hf/fixtures";
}

std::vector<fs::path> hf_reference_dirs(const fs::path& root) {
  std::vector<fs::path> dirs;
  if (!fs::is_directory(root)) return dirs;
  for (const fs::directory_entry& entry : fs::directory_iterator(root))
    if (entry.is_directory() && fs::exists(entry.path() / kReferenceFile)) dirs.push_back(entry.path());
  std::sort(dirs.begin(), dirs.end());
  return dirs;
}

HfReference::HfReference(fs::path dir) : dir_(std::move(dir)), file_(SafetensorsFile::open(dir_ / kReferenceFile)) {
  const TensorInfo& info = file_.info("tokens");
  if (info.dtype != DType::I32 || info.shape.size() != 2)
    fail("{}: 'tokens' must be I32 [batch, length]", file_.path().string());
  batch_ = info.shape[0];
  length_ = info.shape[1];
  std::vector<int32_t> ids(static_cast<size_t>(info.numel()));
  std::memcpy(ids.data(), file_.bytes("tokens").data(), ids.size() * sizeof(int32_t));
  tokens_.assign(ids.begin(), ids.end());
}

std::vector<uint32_t> HfReference::inputs() const {
  std::vector<uint32_t> inputs;
  for (int64_t b = 0; b < batch_; ++b)
    inputs.insert(inputs.end(), tokens_.begin() + b * length_, tokens_.begin() + (b + 1) * length_ - 1);
  return inputs;
}

std::vector<double> HfReference::read(std::string_view tensor) const {
  const TensorInfo& info = file_.info(tensor);
  std::vector<double> values(static_cast<size_t>(info.numel()));
  file_.read_double(tensor, info.shape, values.data());
  return values;
}

std::vector<double> HfReference::logits(const std::string& variant) const {
  const std::vector<double> all = read(variant + "logits");  // [batch, length, vocab]
  const size_t vocab = all.size() / static_cast<size_t>(batch_ * length_);
  const size_t row = static_cast<size_t>(length_) * vocab, kept = static_cast<size_t>(length_ - 1) * vocab;
  std::vector<double> first;
  for (int64_t b = 0; b < batch_; ++b)
    first.insert(first.end(), all.begin() + b * row, all.begin() + b * row + kept);
  return first;
}

LoraConfig HfReference::lora(bool peft_targets_only) const {
  const fs::path path = dir_ / kPeftAdapterDir / "adapter_config.json";
  LoraConfig lora;
  try {
    const nlohmann::json config = nlohmann::json::parse(read_text_file(path));
    lora.rank = config.at("r").get<int64_t>();
    lora.alpha = config.at("lora_alpha").get<double>();
    lora.dropout = config.at("lora_dropout").get<double>();
    lora.rslora = config.at("use_rslora").get<bool>();
    lora.targets.clear();
    for (const std::string& name : config.at("target_modules").get<std::vector<std::string>>())
      lora.targets.push_back(projection_named(name, path.string()));
  } catch (const nlohmann::json::exception& e) {
    fail("{}: {}", path.string(), e.what());
  }
  if (!peft_targets_only)
    for (Projection p : {Projection::dt_proj, Projection::out_proj})
      if (!lora.targets_projection(p)) lora.targets.push_back(p);
  // The flat layout orders tensors by projection within a layer whatever the order here; keep the
  // config in that order too, so that a checkpoint's recipe reads the same.
  std::sort(lora.targets.begin(), lora.targets.end());
  return lora;
}

void HfReference::load_adapters(LoraAdapters& adapters) const {
  const SafetensorsFile peft = SafetensorsFile::open(dir_ / kPeftAdapterDir / "adapter_model.safetensors");
  std::vector<double> values(static_cast<size_t>(adapters.numel()));
  for (const AdapterTensor& t : adapters.tensors()) {
    const std::vector<int64_t> shape{t.rows, t.cols};
    if (peft.contains(t.peft_key))
      peft.read_double(t.peft_key, shape, values.data() + t.offset);
    else
      file_.read_double("adapter." + t.peft_key, shape, values.data() + t.offset);
  }
  adapters.upload(adapters.params(), values);
}

SsmtuneRun run_ssmtune(const HfReference& ref, const MambaWeights& weights, Backend& backend, const LoraConfig& lora) {
  LoraAdapters adapters(backend, weights.config(), lora);
  ref.load_adapters(adapters);
  adapters.upload(adapters.grads(), std::vector<double>(static_cast<size_t>(adapters.numel()), 0.0));

  const StepShape shape = ref.step_shape();
  const int64_t targets = shape.batch * shape.seq_len;
  TrainStep step(backend, weights, adapters, shape);
  SsmtuneRun run;
  run.logits = step.forward_logits(ref.inputs().data());
  const std::vector<uint8_t> mask(static_cast<size_t>(targets), 1);
  const double loss_sum = step.forward_backward(ref.tokens().data(), mask.data(), 1.0 / static_cast<double>(targets),
                                                /*dropout_seed=*/0, /*dropout_stream=*/0);
  run.loss = loss_sum / static_cast<double>(targets);
  run.grads = adapters.download(adapters.grads());
  run.layout = adapters.tensors();
  return run;
}

Discrepancy discrepancy(std::span<const double> ours, std::span<const double> theirs) {
  if (ours.size() != theirs.size()) fail("comparing {} values with {}", ours.size(), theirs.size());
  Discrepancy d;
  bool nan = false;
  for (size_t i = 0; i < ours.size(); ++i) {
    const double diff = std::fabs(ours[i] - theirs[i]);
    nan |= std::isnan(diff);
    d.max_abs = std::max(d.max_abs, diff);
    d.max_ref = std::max(d.max_ref, std::fabs(theirs[i]));
  }
  // A NaN on either side fails every tolerance.
  if (nan) d.max_abs = std::numeric_limits<double>::quiet_NaN();
  return d;
}

}  // namespace ssmtune::test
