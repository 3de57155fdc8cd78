#include "framework/optimizer.h"

#include <cmath>
#include <numbers>

#include "framework/error.h"

namespace ssmtune {
namespace {

Element master_element(DType dtype) {
  if (dtype == DType::F32) return Element::f32;
  if (dtype == DType::F64) return Element::f64;
  fail("internal: adapters in {}, not a master dtype", dtype_name(dtype));
}

void* at(void* base, int64_t offset, DType dtype) {
  return static_cast<std::byte*>(base) + offset * static_cast<int64_t>(dtype_size(dtype));
}

// Clips the gradients of the adapters' optimizer_range() by the global norm sqrt(grad_sum_of_squares)
// and applies AdamW update number step+1 to that range; touches nothing when told to skip or when the
// norm is not finite (one inf or NaN gradient makes it so).
UpdateStats clip_and_update(Backend& backend, LoraAdapters& adapters, const OptimizerConfig& c, int64_t step,
                            double grad_sum_of_squares, bool skip = false) {
  UpdateStats stats;
  stats.lr = learning_rate(c, step);
  stats.grad_norm = std::sqrt(grad_sum_of_squares);
  stats.skipped = skip || !std::isfinite(stats.grad_norm);
  if (stats.skipped) return stats;
  const FlatRange range = adapters.optimizer_range();
  void* grads = at(adapters.grads(), range.begin, adapters.dtype());
  if (c.max_grad_norm > 0 && stats.grad_norm > c.max_grad_norm)
    backend.scale(grads, range.size(), c.max_grad_norm / (stats.grad_norm + 1e-6));
  const double t = static_cast<double>(step + 1);
  backend.adamw_update(at(adapters.params(), range.begin, adapters.dtype()), grads, adapters.adam_m(),
                       adapters.adam_v(), range.size(), stats.lr, c.beta1, c.beta2, c.eps, c.weight_decay,
                       1.0 - std::pow(c.beta1, t), 1.0 - std::pow(c.beta2, t));
  return stats;
}

std::vector<FlatRange> layer_ranges(const LoraAdapters& adapters) {
  int64_t layers = 0;
  for (const AdapterTensor& t : adapters.tensors()) layers = std::max(layers, t.layer + 1);
  std::vector<FlatRange> ranges;
  for (int64_t layer = 0; layer < layers; ++layer) ranges.push_back(adapters.layer_range(layer));
  return ranges;
}

}  // namespace

double learning_rate(const OptimizerConfig& c, int64_t step) {
  if (step < c.warmup_steps) return c.lr * static_cast<double>(step + 1) / static_cast<double>(c.warmup_steps);
  const int64_t decay_steps = std::max<int64_t>(1, c.total_steps - c.warmup_steps);
  const double progress = std::min(1.0, static_cast<double>(step - c.warmup_steps) / static_cast<double>(decay_steps));
  const double cosine = 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
  return c.lr * (c.min_lr_ratio + (1.0 - c.min_lr_ratio) * cosine);
}

UpdateStats apply_update(Backend& backend, LoraAdapters& adapters, const OptimizerConfig& c, int64_t step) {
  if (adapters.optimizer_range().size() != adapters.numel())
    fail("internal: apply_update needs the whole optimizer state; sharded state is DataParallelOptimizer's");
  return clip_and_update(backend, adapters, c, step, backend.sum_of_squares(adapters.grads(), adapters.numel()));
}

DataParallelOptimizer::DataParallelOptimizer(Backend& backend, LoraAdapters& adapters, Communicator& comm,
                                             Communicator& host, const OptimizerConfig& config,
                                             const DistributedConfig& distributed)
    : backend_(backend),
      adapters_(adapters),
      comm_(comm),
      host_(host),
      config_(config),
      strategy_(distributed.strategy),
      element_(master_element(adapters.dtype())),
      buckets_(comm, layer_ranges(adapters), adapters.numel(), element_, distributed.bucket_mb * 1048576.0,
               distributed.strategy == ShardingStrategy::zero2 ? GradientBuckets::Reduction::reduce_scatter
                                                               : GradientBuckets::Reduction::all_reduce),
      param_counts_(shard_counts({0, adapters.numel()}, adapters.numel(), comm.size())) {
  const FlatRange expected = shard_range(adapters.numel(), optimizer_shard(strategy_, comm.rank(), comm.size()));
  if (adapters.optimizer_range() != expected)
    fail("internal: the adapters keep moments for [{}, {}), strategy {} on rank {} of {} needs [{}, {})",
         adapters.optimizer_range().begin, adapters.optimizer_range().end, strategy_name(strategy_), comm.rank(),
         comm.size(), expected.begin, expected.end);
}

void DataParallelOptimizer::start_step() { buckets_.start(adapters_.grads()); }

void DataParallelOptimizer::layer_backward_done(int64_t layer) { buckets_.layer_done(layer); }

UpdateStats DataParallelOptimizer::update(int64_t step, bool loss_is_finite) {
  buckets_.finish();
  comm_.wait();
  double grad_sum_of_squares = 0;
  if (strategy_ == ShardingStrategy::ddp) {
    // Every rank holds the same summed gradients.
    grad_sum_of_squares = backend_.sum_of_squares(adapters_.grads(), adapters_.numel());
  } else {
    const FlatRange shard = adapters_.optimizer_range();
    grad_sum_of_squares = backend_.sum_of_squares(at(adapters_.grads(), shard.begin, adapters_.dtype()), shard.size());
    host_.all_reduce_sum(&grad_sum_of_squares, 1, Element::f64);
  }
  const UpdateStats stats = clip_and_update(backend_, adapters_, config_, step, grad_sum_of_squares, !loss_is_finite);
  // A skipped update skips on every rank (the norm is global), and the adapters are still the same.
  if (strategy_ != ShardingStrategy::ddp && !stats.skipped) {
    comm_.all_gather(adapters_.params(), param_counts_, element_);
    comm_.wait();
  }
  return stats;
}

}  // namespace ssmtune
