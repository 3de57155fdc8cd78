// How a data-parallel job splits its work (recipe keys distributed.*):
//   ddp    every rank keeps the whole optimizer state; gradients are all-reduced.
//   zero1  each rank keeps the AdamW moments of its 1/N shard only (ZeRO stage 1): gradients are
//          all-reduced, each rank updates its shard, the updated shards are all-gathered.
//   zero2  as zero1, but gradients are reduce-scattered (ZeRO stage 2): each rank receives only the
//          sums of its shard, so the gradient traffic is that of one all-reduce in all (reduce-scatter
//          plus all-gather) instead of zero1's one and a half. The backward still accumulates the whole
//          flat gradient buffer, so stage 2's gradient memory saving does not apply to it here: keeping
//          only the shard would need a reduce-scatter per micro-batch, for at most (N-1)/N of the
//          adapters' gradients (127 MB for mamba-2.8b at rank 16), under 1% of a GPU's plans.
// Independently of the strategy, shard_base_weights splits the frozen NF4 projections of every layer
// over the ranks, which all-gather each layer as it is needed (framework/layer_weights.h): with zero2
// it is FSDP's FULL_SHARD for everything but the adapters themselves, which are small and stay whole.
#pragma once
#include <optional>
#include <string_view>

#include "distributed/sharding.h"

namespace ssmtune {

enum class ShardingStrategy { ddp, zero1, zero2 };

std::string_view strategy_name(ShardingStrategy strategy);
std::optional<ShardingStrategy> strategy_from_name(std::string_view name);

struct DistributedConfig {
  ShardingStrategy strategy = ShardingStrategy::ddp;
  double bucket_mb = 25;    // gradient bucket size in MiB (PyTorch DDP's default)
  double timeout_s = 600;   // how long any collective may wait for the other ranks
  bool shard_base_weights = false;  // each rank keeps 1/N of each layer's NF4 projections
  // parallel.context: consecutive ranks that split each sequence along its length between them
  // (framework/context_parallel.h); the job's data-parallel replicas are the world size / context.
  int context = 1;
};

// The slice of the flat adapter layout whose optimizer state rank `rank` of `ranks` keeps and updates.
ShardIndex optimizer_shard(ShardingStrategy strategy, int rank, int ranks);

}  // namespace ssmtune
