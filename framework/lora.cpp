#include "framework/lora.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "framework/error.h"
#include "kernels/common/counter_rng.h"

namespace ssmtune {

double LoraConfig::scale() const {
  return rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / static_cast<double>(rank);
}

bool LoraConfig::targets_projection(Projection p) const {
  return std::find(targets.begin(), targets.end(), p) != targets.end();
}

LoraAdapters::LoraAdapters(Backend& backend, const MambaConfig& model, const LoraConfig& config,
                           ShardIndex optimizer_shard)
    : backend_(&backend), config_(config), arena_(backend, "LoRA adapters and optimizer state") {
  if (config.rank <= 0) fail("lora.rank must be positive, got {}", config.rank);
  if (config.dropout < 0 || config.dropout >= 1) fail("lora.dropout must be in [0, 1), got {}", config.dropout);
  index_.assign(static_cast<size_t>(model.n_layer), {-1, -1, -1, -1});
  for (int64_t layer = 0; layer < model.n_layer; ++layer)
    for (Projection p : kProjections) {
      if (!config.targets_projection(p)) continue;
      const auto [out, in] = projection_shape(model, p);
      const std::string key = "base_model.model.backbone.layers." + std::to_string(layer) + ".mixer." +
                              std::string(projection_name(p));
      index_[layer][static_cast<size_t>(p)] = static_cast<int64_t>(tensors_.size());
      tensors_.push_back({key + ".lora_A.weight", layer, p, true, config.rank, in, numel_});
      numel_ += config.rank * in;
      tensors_.push_back({key + ".lora_B.weight", layer, p, false, out, config.rank, numel_});
      numel_ += out * config.rank;
    }
  const size_t bytes = static_cast<size_t>(numel_) * dtype_size(backend.master_dtype());
  optimizer_range_ = shard_range(numel_, optimizer_shard);
  const size_t moment_bytes = static_cast<size_t>(optimizer_range_.size()) * dtype_size(backend.master_dtype());
  const bool act_copy = backend.act_dtype() != backend.master_dtype();
  arena_.add(&params_, bytes);
  if (act_copy) arena_.add(&params_act_, static_cast<size_t>(numel_) * dtype_size(backend.act_dtype()));
  arena_.add(&grads_, bytes);
  arena_.add(&m_, moment_bytes);
  arena_.add(&v_, moment_bytes);
  arena_.allocate();
  if (!act_copy) params_act_ = params_;
}

void LoraAdapters::refresh_act_params() const {
  if (params_act_ != params_) backend_->master_to_act(params_, params_act_, numel_);
}

void LoraAdapters::initialize(uint64_t seed) {
  std::vector<double> values(static_cast<size_t>(numel_), 0.0);
  for (size_t t = 0; t < tensors_.size(); ++t) {
    const AdapterTensor& a = tensors_[t];
    if (!a.is_A) continue;
    const double bound = 1.0 / std::sqrt(static_cast<double>(a.cols));
    for (int64_t i = 0; i < a.numel(); ++i)
      values[a.offset + i] = static_cast<float>((2.0 * counter_random_uniform(seed, t, i) - 1.0) * bound);
  }
  upload(params_, values);
}

std::optional<LoraPath> LoraAdapters::path(int64_t layer, Projection p, uint64_t dropout_seed,
                                           uint64_t dropout_stream) const {
  const int64_t a = index_[layer][static_cast<size_t>(p)];
  if (a < 0) return std::nullopt;
  const size_t master = dtype_size(backend_->master_dtype()), act = dtype_size(backend_->act_dtype());
  auto at = [master](void* base, int64_t offset) { return static_cast<std::byte*>(base) + offset * master; };
  auto act_at = [act](void* base, int64_t offset) { return static_cast<std::byte*>(base) + offset * act; };
  const AdapterTensor& A = tensors_[a];
  const AdapterTensor& B = tensors_[a + 1];
  LoraPath path;
  path.rank = config_.rank;
  path.scale = config_.scale();
  path.dropout = config_.dropout;
  path.dropout_seed = dropout_seed;
  path.dropout_stream = dropout_stream;
  path.A = at(params_, A.offset);
  path.B = at(params_, B.offset);
  path.A_act = act_at(params_act_, A.offset);
  path.B_act = act_at(params_act_, B.offset);
  path.dA = at(grads_, A.offset);
  path.dB = at(grads_, B.offset);
  return path;
}

FlatRange LoraAdapters::layer_range(int64_t layer) const {
  FlatRange range{numel_, 0};
  for (const AdapterTensor& t : tensors_)
    if (t.layer == layer) {
      range.begin = std::min(range.begin, t.offset);
      range.end = std::max(range.end, t.offset + t.numel());
    }
  if (range.end < range.begin) fail("internal: layer {} has no adapters", layer);
  return range;
}

int64_t LoraAdapters::count_of(const void* buffer) const {
  return buffer == m_ || buffer == v_ ? optimizer_range_.size() : numel_;
}

std::vector<double> LoraAdapters::download(const void* buffer) const {
  std::vector<double> values(static_cast<size_t>(count_of(buffer)));
  const DType dtype = backend_->master_dtype();
  std::vector<std::byte> bytes(values.size() * dtype_size(dtype));
  backend_->copy_to_host(bytes.data(), buffer, bytes.size());
  convert_to_double(dtype, bytes.data(), values.size(), values.data());
  return values;
}

void LoraAdapters::upload(void* buffer, const std::vector<double>& values) const {
  if (static_cast<int64_t>(values.size()) != count_of(buffer))
    fail("internal: adapter buffer of {} values, expected {}", values.size(), count_of(buffer));
  const DType dtype = backend_->master_dtype();
  std::vector<std::byte> bytes(values.size() * dtype_size(dtype));
  convert_from_double(values.data(), values.size(), dtype, bytes.data());
  backend_->copy_from_host(buffer, bytes.data(), bytes.size());
}

}  // namespace ssmtune
