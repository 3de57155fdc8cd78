// AdamW over the flat adapter buffers, with global-norm clipping and a learning rate that warms up
// linearly and then follows a cosine down to min_lr_ratio * lr (torchtune's and HF's schedule).
#pragma once
#include <cstdint>

#include "framework/backend.h"
#include "framework/lora.h"

namespace ssmtune {

struct OptimizerConfig {
  double lr = 1e-3;
  double min_lr_ratio = 0.0;
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double weight_decay = 0.0;
  double max_grad_norm = 1.0;  // <= 0 disables clipping
};

// Learning rate for the update with 0-based index `step`.
double learning_rate(const OptimizerConfig& config, int64_t step);

struct UpdateStats {
  double lr = 0;
  double grad_norm = 0;  // before clipping
};

// Clips the gradients to max_grad_norm and applies AdamW update number step+1.
UpdateStats apply_update(Backend& backend, LoraAdapters& adapters, const OptimizerConfig& config, int64_t step);

}  // namespace ssmtune
