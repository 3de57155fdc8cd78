// Context parallelism in ssmtune-bench-dist (--context): one sequence per step split over every rank of
// the job (parallel.context = ranks, framework/context_parallel.h), a random model (mamba-2.8b by
// default), NF4 base + LoRA r=16 on all four projections, layer recomputation with segment checkpoints,
// at each length asked for; then the same length on one GPU alone (rank 0), when it fits. The ratio of
// their tokens/s is the scaling of context parallelism (issue target: at least 1.8x on two GPUs at the
// longest length both run); the memory columns show what each GPU holds.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "distributed/communicator.h"
#include "framework/mamba_model.h"

namespace ssmtune::bench {

struct ContextStepOptions {
  std::vector<int64_t> lengths{65536, 131072, 262144};  // tokens of the one sequence of a step
  int64_t checkpoint_every = 8;                          // memory.checkpoint_every
  int64_t scan_chunk = 256;
  int warmup_steps = 1, timed_steps = 1;
  uint64_t seed = 0;
};

struct ContextStepResult {
  std::string setting;   // "context N" or "one GPU"
  int ranks = 1;
  int64_t seq_len = 0;   // the whole sequence
  double seconds = 0;    // the median timed step
  size_t planned_bytes = 0, in_use_bytes = 0;  // rank 0: Backend::allocated_bytes, cudaMemGetInfo in use
  std::string error;     // what failed (an allocation that did not fit), else empty

  double tokens_per_second() const { return seconds > 0 ? static_cast<double>(seq_len) / seconds : 0; }
};

// Collective over the world group: every rank passes its backend, the model's weights (the same on all)
// and the job's communicators (comm over the backend's memory).
std::vector<ContextStepResult> bench_context_parallel_steps(const ProcessGroup& world, Backend& backend,
                                                            const MambaWeights& weights, Communicator& host,
                                                            Communicator& comm, const ContextStepOptions& options);

void print_context_step_table(const std::vector<ContextStepResult>& results);

}  // namespace ssmtune::bench
