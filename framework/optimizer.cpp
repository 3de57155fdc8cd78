#include "framework/optimizer.h"

#include <cmath>
#include <numbers>

namespace ssmtune {

double learning_rate(const OptimizerConfig& c, int64_t step) {
  if (step < c.warmup_steps) return c.lr * static_cast<double>(step + 1) / static_cast<double>(c.warmup_steps);
  const int64_t decay_steps = std::max<int64_t>(1, c.total_steps - c.warmup_steps);
  const double progress = std::min(1.0, static_cast<double>(step - c.warmup_steps) / static_cast<double>(decay_steps));
  const double cosine = 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
  return c.lr * (c.min_lr_ratio + (1.0 - c.min_lr_ratio) * cosine);
}

UpdateStats apply_update(Backend& backend, LoraAdapters& adapters, const OptimizerConfig& c, int64_t step) {
  UpdateStats stats;
  stats.lr = learning_rate(c, step);
  stats.grad_norm = std::sqrt(backend.sum_of_squares(adapters.grads(), adapters.numel()));
  if (c.max_grad_norm > 0 && stats.grad_norm > c.max_grad_norm)
    backend.scale(adapters.grads(), adapters.numel(), c.max_grad_norm / (stats.grad_norm + 1e-6));
  const double t = static_cast<double>(step + 1);
  backend.adamw_update(adapters.params(), adapters.grads(), adapters.adam_m(), adapters.adam_v(), adapters.numel(),
                       stats.lr, c.beta1, c.beta2, c.eps, c.weight_decay, 1.0 - std::pow(c.beta1, t),
                       1.0 - std::pow(c.beta2, t));
  return stats;
}

}  // namespace ssmtune
