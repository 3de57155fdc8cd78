// The long-sequence benchmark of ssmtune-bench (--long): one sequence per step on one GPU, a random
// model (mamba-2.8b by default), NF4 base + LoRA r=16 on all four projections, layer recomputation with
// segment checkpoints (memory.checkpoint_every), at lengths doubling from a start until a length's memory
// plan does not fit (the failed allocation is reported) or the last length is done. Per length: tokens/s,
// the step's planned bytes and the GPU memory in use. The tokens/s per length are also the single-GPU
// baseline that context parallelism (parallel.context, ssmtune-bench-dist) is compared against.
#pragma once
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "recipes/bench/report.h"

namespace ssmtune::bench {

struct LongOptions {
  std::string model = "mamba-2.8b";            // a name of framework/model_sizes.h
  int64_t start = 8192, last = 262144;         // the first length, and the most tried (doubling)
  std::vector<int64_t> checkpoint_every{8, 1}; // each a series of lengths of its own
  // 256, not the 64 of the short-sequence steps: the scan's carry passes walk the chunks one after another
  // (512 of them at 131,072 tokens instead of 2048), its chunk states take a quarter of the memory, and
  // the per-chunk kernels still have 32 chunks x 40 blocks of channels at 8192 tokens (mamba-2.8b).
  int64_t scan_chunk = 256;
  int warmup_steps = 1, timed_steps = 2;
  uint64_t seed = 0;
};

struct LongResult {
  std::string model;
  int64_t checkpoint_every = 1, seq_len = 0, scan_chunk = 0;
  size_t planned_step_bytes = 0;      // TrainStep::planned_bytes: activations and workspaces of the step
  size_t planned_activation_bytes = 0;
  size_t allocated_bytes = 0;         // Backend::allocated_bytes with the step: weights, adapters, optimizer, step
  size_t in_use_bytes = 0;            // cudaMemGetInfo total - free after the timed steps (CUDA context included)
  std::vector<double> step_seconds;   // the timed steps
  double median_seconds = 0;
  std::vector<double> losses;         // mean token loss of every step
  bool fits = false;                  // the step's memory plan was allocated
  std::string error;                  // the failed allocation when it does not fit, else a failed step

  double tokens_per_second() const { return median_seconds > 0 ? static_cast<double>(seq_len) / median_seconds : 0; }
};

std::vector<LongResult> bench_long_sequences(const LongOptions& options);

// The table: one line per length, then the longest length of each series and the single-GPU baseline row.
void print_long_table(const std::vector<LongResult>& results);
void write_long_json(const std::filesystem::path& path, const DeviceInfo& device,
                     const std::vector<LongResult>& results);

}  // namespace ssmtune::bench
