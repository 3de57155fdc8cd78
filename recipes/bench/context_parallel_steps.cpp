#include "recipes/bench/context_parallel_steps.h"

#include <cuda_runtime.h>
#include <fmt/format.h>

#include <chrono>
#include <memory>
#include <optional>
#include <random>

#include "framework/context_parallel.h"
#include "framework/lora.h"
#include "framework/optimizer.h"
#include "framework/train_step.h"
#include "kernels/cuda/check.h"
#include "recipes/bench/harness.h"

namespace ssmtune::bench {
namespace {

using Clock = std::chrono::steady_clock;
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// Timed steps of one sequence of `seq_len` tokens, this rank's slice of it when `context` is given (the
// exchange with the other slices), the whole of it otherwise. Adapter gradients are summed over comm's
// ranks when split, as the trainer's data-parallel optimizer would.
ContextStepResult run_steps(Backend& backend, const MambaWeights& weights, Communicator* comm, int ranks,
                            int64_t seq_len, const ContextStepOptions& options) {
  ContextStepResult r;
  r.setting = ranks > 1 ? fmt::format("context {}", ranks) : "one GPU";
  r.ranks = ranks;
  r.seq_len = seq_len;
  const MambaConfig& c = weights.config();
  LoraConfig lora;  // all four projections
  lora.rank = 16;
  lora.alpha = 32;
  lora.dropout = 0;
  try {
    LoraAdapters adapters(backend, c, lora);
    adapters.initialize(options.seed);
    StepShape shape;
    shape.batch = 1;
    shape.seq_len = seq_len / ranks;
    shape.scan_chunk = options.scan_chunk;
    shape.recompute = true;
    shape.checkpoint_every = options.checkpoint_every;
    shape.context_ranks = ranks;
    std::optional<ContextExchange> exchange;
    if (ranks > 1) exchange.emplace(backend, *comm, ContextSliceShape{1, shape.seq_len, c.d_inner, c.d_state, c.conv_kernel});
    TrainStep step(backend, weights, adapters, shape, nullptr, exchange ? &*exchange : nullptr);

    std::vector<uint32_t> tokens(static_cast<size_t>(shape.seq_len + 1));
    const std::vector<uint8_t> mask(static_cast<size_t>(shape.seq_len), 1);
    std::mt19937_64 rng(options.seed + static_cast<uint64_t>(seq_len) + static_cast<uint64_t>(comm ? comm->rank() : 0));
    std::uniform_int_distribution<uint32_t> token(0, static_cast<uint32_t>(c.vocab_size - 1));
    OptimizerConfig optimizer;
    optimizer.lr = 1e-4;
    optimizer.total_steps = options.warmup_steps + options.timed_steps;
    std::vector<double> seconds;
    for (int i = 0; i < options.warmup_steps + options.timed_steps; ++i) {
      for (uint32_t& t : tokens) t = token(rng);
      backend.synchronize();
      if (comm) comm->barrier();
      const Clock::time_point start = Clock::now();
      backend.fill_zero(adapters.grads(), static_cast<size_t>(adapters.numel()) * dtype_size(adapters.dtype()));
      step.forward_backward(tokens.data(), mask.data(), 1.0 / static_cast<double>(seq_len), options.seed,
                            static_cast<uint64_t>(i));
      if (ranks > 1) {
        comm->all_reduce_sum(adapters.grads(), static_cast<size_t>(adapters.numel()), Element::f32);
        comm->wait();
      }
      apply_update(backend, adapters, optimizer, i);
      backend.synchronize();
      if (i >= options.warmup_steps) seconds.push_back(std::chrono::duration<double>(Clock::now() - start).count());
    }
    r.seconds = median(seconds);
    r.planned_bytes = backend.allocated_bytes();
    size_t free = 0, total = 0;
    SSMTUNE_CUDA_CHECK(cudaMemGetInfo(&free, &total), "bench memory");
    r.in_use_bytes = total - free;  // nothing allocates inside a step: also the peak
  } catch (const std::exception& e) {
    cudaGetLastError();  // a failed allocation must not surface in a later launch check
    r.error = e.what();
  }
  return r;
}

void print_row(const ContextStepResult& r) {
  if (r.error.empty())
    fmt::print("  {:>9} tokens, {:<10}: {:>8.0f} tokens/s ({:.2f} s per step), planned {:.1f} GiB, in use {:.1f} GiB "
               "per GPU\n",
               r.seq_len, r.setting, r.tokens_per_second(), r.seconds, r.planned_bytes / kGiB, r.in_use_bytes / kGiB);
  else
    fmt::print("  {:>9} tokens, {:<10}: FAILED: {}\n", r.seq_len, r.setting, r.error);
  std::fflush(stdout);
}

}  // namespace

std::vector<ContextStepResult> bench_context_parallel_steps(const ProcessGroup& world, Backend& backend,
                                                            const MambaWeights& weights, Communicator& host,
                                                            Communicator& comm, const ContextStepOptions& options) {
  std::vector<ContextStepResult> results;
  for (const int64_t length : options.lengths) {
    if (length % world.size() != 0) fail("--context-lengths: {} is not a multiple of the {} ranks", length, world.size());
    // Every rank runs the split steps; a rank whose plan does not fit fails the same way as the others
    // (same shapes), so the collectives stay matched.
    ContextStepResult split = run_steps(backend, weights, &comm, world.size(), length, options);
    host.barrier();
    if (world.is_root()) print_row(split);
    ContextStepResult alone;
    if (world.is_root()) {
      alone = run_steps(backend, weights, nullptr, 1, length, options);
      print_row(alone);
    }
    host.barrier();
    results.push_back(std::move(split));
    if (world.is_root()) results.push_back(std::move(alone));
  }
  return results;
}

void print_context_step_table(const std::vector<ContextStepResult>& results) {
  fmt::print("\ncontext parallelism: one sequence per step split over the ranks, against one GPU alone\n");
  fmt::print("| tokens | setting | tokens/s | s/step | in use GiB/GPU | vs one GPU |\n|---|---|---|---|---|---|\n");
  for (size_t i = 0; i < results.size(); ++i) {
    const ContextStepResult& r = results[i];
    std::string ratio = "";
    if (r.ranks > 1 && i + 1 < results.size() && results[i + 1].ranks == 1 && results[i + 1].error.empty() &&
        r.error.empty())
      ratio = fmt::format("{:.2f}x", r.tokens_per_second() / results[i + 1].tokens_per_second());
    if (r.error.empty())
      fmt::print("| {} | {} | {:.0f} | {:.2f} | {:.1f} | {} |\n", r.seq_len, r.setting, r.tokens_per_second(), r.seconds,
                 r.in_use_bytes / kGiB, ratio);
    else
      fmt::print("| {} | {} | does not fit | | | |\n", r.seq_len, r.setting);
  }
}

}  // namespace ssmtune::bench
