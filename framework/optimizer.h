// AdamW over the flat adapter buffers, with global-norm clipping and a learning rate that warms up
// linearly and then follows a cosine down to min_lr_ratio * lr (torchtune's and HF's schedule); and the
// update of a data-parallel job, which sums the gradients over the ranks before it and, with ZeRO,
// updates only this rank's shard.
#pragma once
#include <cstdint>
#include <vector>

#include "distributed/communicator.h"
#include "distributed/gradient_buckets.h"
#include "distributed/strategy.h"
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
  // The loss or the gradient norm was not finite, and nothing was updated: adapters and moments are as
  // they were (the trainer counts such steps, train.max_bad_steps).
  bool skipped = false;
};

// One process: clips the gradients to max_grad_norm and applies AdamW update number step+1, or skips
// it when the gradient norm is not finite.
UpdateStats apply_update(Backend& backend, LoraAdapters& adapters, const OptimizerConfig& config, int64_t step);

// The update of a data-parallel job (distributed/strategy.h). Gradients are summed over the ranks
// bucket by bucket (all-reduce for ddp and zero1, reduce-scatter for zero2), clipped by the global norm
// (with ZeRO from each rank's shard, its sum of squares all-reduced), AdamW updates the adapters'
// optimizer_range() (this rank's shard with ZeRO, whose moments are the only ones it keeps), and the
// updated shards are all-gathered. With one rank it is apply_update.
class DataParallelOptimizer {
 public:
  // comm: the backend's communicator; host: MPI over host memory, for the norm. The adapters' moments
  // must cover optimizer_shard(distributed.strategy, rank, size).
  DataParallelOptimizer(Backend& backend, LoraAdapters& adapters, Communicator& comm, Communicator& host,
                        const OptimizerConfig& config, const DistributedConfig& distributed);

  // Begins a step, before the backward of its last micro-batch.
  void start_step();
  // Layer `layer`'s backward of the last micro-batch has been issued: its gradients are complete, and
  // its bucket may go out while the backward continues below it.
  void layer_backward_done(int64_t layer);
  // Finishes the reduction, clips, applies AdamW update number step+1 and gathers the adapters. Skips
  // the update on every rank when loss_is_finite is false or the global gradient norm is not finite
  // (both are the same on every rank: the caller passes the all-reduced loss).
  UpdateStats update(int64_t step, bool loss_is_finite = true);

  const GradientBuckets& buckets() const { return buckets_; }

 private:
  Backend& backend_;
  LoraAdapters& adapters_;
  Communicator& comm_;
  Communicator& host_;
  OptimizerConfig config_;
  ShardingStrategy strategy_;
  Element element_;
  GradientBuckets buckets_;
  std::vector<size_t> param_counts_;  // each rank's shard of the adapters, for the all-gather
};

}  // namespace ssmtune
