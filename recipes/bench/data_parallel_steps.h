// Training throughput of a data-parallel job on GPUs: a randomly initialised model, LoRA r=16 alpha 32
// on all four projections, AdamW, each rank its own random batch per step, for each strategy of
// distributed/strategy.h, and zero2 with sharded base weights (distributed.shard_base_weights); and the
// same steps on one GPU alone (rank 0 by itself), against which the tokens/s per GPU give the scaling
// efficiency. The memory columns show what each setting plans per GPU.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "distributed/communicator.h"
#include "distributed/strategy.h"
#include "framework/mamba_model.h"

namespace ssmtune::bench {

struct ParallelStepOptions {
  std::string model = "mamba-1.4b";  // a name of framework/model_sizes.h
  int64_t batch = 4, seq_len = 2048;  // per rank
  bool recompute = true;
  std::vector<ShardingStrategy> strategies{ShardingStrategy::ddp, ShardingStrategy::zero1, ShardingStrategy::zero2};
  int warmup_steps = 2, timed_steps = 5;
  double bucket_mb = 25;
  double timeout_s = 1800;
  uint64_t seed = 0;
};

struct ParallelStepResult {
  std::string setting;               // the strategy, "zero2 sharded" (base weights too), or "one GPU"
  int ranks = 1;
  int64_t batch = 0, seq_len = 0;    // per rank
  std::vector<double> step_seconds;  // rank 0's timed steps, synchronised at both ends
  double median_seconds = 0;
  std::vector<double> losses;        // mean token loss of the global batch, every step
  size_t planned_bytes = 0;          // Backend::allocated_bytes on rank 0
  size_t in_use_bytes = 0;           // cudaMemGetInfo total - free on rank 0, NCCL's buffers included
  std::string error;

  double tokens_per_second_per_gpu() const {
    return median_seconds > 0 ? static_cast<double>(batch * seq_len) / median_seconds : 0;
  }
};

// Collective over the world group: every rank passes its backend, the model's weights (the same on all)
// and the job's communicators. The last result is the one-GPU baseline.
std::vector<ParallelStepResult> bench_data_parallel_steps(const ProcessGroup& world, Backend& backend,
                                                          const MambaWeights& weights, Communicator& host,
                                                          Communicator& comm, const ParallelStepOptions& options);

// The same steps with zero2 and sharded base weights: `sharded` was built with projection_shard {rank,
// size} (and nothing else of the model is alive, so that the memory columns show what sharding saves).
// Collective over comm's ranks.
ParallelStepResult bench_sharded_base_steps(Backend& backend, const MambaWeights& sharded, Communicator& host,
                                            Communicator& comm, const ParallelStepOptions& options);

// The table; the last result is the one-GPU baseline.
void print_parallel_step_table(const std::vector<ParallelStepResult>& results);

}  // namespace ssmtune::bench
