#include "recipes/bench/data_parallel_steps.h"

#include <cuda_runtime.h>
#include <fmt/format.h>

#include <chrono>
#include <random>

#include "distributed/mpi_communicator.h"
#include "framework/lora.h"
#include "framework/optimizer.h"
#include "framework/train_step.h"
#include "kernels/cuda/check.h"
#include "recipes/bench/harness.h"

namespace ssmtune::bench {
namespace {

using Clock = std::chrono::steady_clock;

ParallelStepResult run_steps(Backend& backend, const MambaWeights& weights, Communicator& host, Communicator& comm,
                             ShardingStrategy strategy, const std::string& setting, const ParallelStepOptions& o) {
  ParallelStepResult r;
  r.setting = setting;
  r.ranks = comm.size();
  r.batch = o.batch;
  r.seq_len = o.seq_len;
  try {
    LoraConfig lora;  // all four projections by default
    lora.rank = 16;
    lora.alpha = 32;
    lora.dropout = 0;
    LoraAdapters adapters(backend, weights.config(), lora, optimizer_shard(strategy, comm.rank(), comm.size()));
    adapters.initialize(o.seed);
    StepShape shape;
    shape.batch = o.batch;
    shape.seq_len = o.seq_len;
    shape.scan_chunk = 64;
    shape.recompute = o.recompute;
    shape.loss_slice_rows = 1024;
    TrainStep step(backend, weights, adapters, shape, &comm);
    OptimizerConfig optimizer_config;
    optimizer_config.lr = 1e-4;
    optimizer_config.total_steps = o.warmup_steps + o.timed_steps;
    DistributedConfig distributed;
    distributed.strategy = strategy;
    distributed.bucket_mb = o.bucket_mb;
    distributed.timeout_s = o.timeout_s;
    DataParallelOptimizer optimizer(backend, adapters, comm, host, optimizer_config, distributed);

    const int64_t T = o.batch * o.seq_len;
    std::vector<uint32_t> tokens(static_cast<size_t>(o.batch * (o.seq_len + 1)));
    const std::vector<uint8_t> mask(static_cast<size_t>(T), 1);
    std::mt19937_64 rng(o.seed * 1000003 + static_cast<uint64_t>(comm.rank()));
    std::uniform_int_distribution<uint32_t> token(0, static_cast<uint32_t>(weights.config().vocab_size - 1));
    const double global_tokens = static_cast<double>(T) * comm.size();
    for (int i = 0; i < o.warmup_steps + o.timed_steps; ++i) {
      for (uint32_t& t : tokens) t = token(rng);
      backend.synchronize();
      host.barrier();  // every rank starts the step together
      const Clock::time_point start = Clock::now();
      backend.fill_zero(adapters.grads(), static_cast<size_t>(adapters.numel()) * dtype_size(adapters.dtype()));
      optimizer.start_step();
      double loss = step.forward_backward(tokens.data(), mask.data(), 1.0 / global_tokens, o.seed,
                                          static_cast<uint64_t>(i * comm.size() + comm.rank()), nullptr,
                                          [&](int64_t layer) { optimizer.layer_backward_done(layer); });
      host.all_reduce_sum(&loss, 1, Element::f64);
      optimizer.update(i);
      backend.synchronize();
      const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
      r.losses.push_back(loss / global_tokens);
      if (i >= o.warmup_steps) r.step_seconds.push_back(seconds);
    }
    r.median_seconds = median(r.step_seconds);
    r.planned_bytes = backend.allocated_bytes();
    size_t free = 0, total = 0;
    SSMTUNE_CUDA_CHECK(cudaMemGetInfo(&free, &total), "bench memory");
    r.in_use_bytes = total - free;
    if (comm.rank() == 0)
      fmt::print("  {} on {} GPU{}: {:.0f} tokens/s per GPU (median of {} steps, {:.1f} ms), loss {:.3f} -> {:.3f}, "
                 "planned {:.2f} GiB, in use {:.2f} GiB\n",
                 setting, r.ranks, r.ranks > 1 ? "s" : "", r.tokens_per_second_per_gpu(), r.step_seconds.size(),
                 r.median_seconds * 1e3, r.losses.front(), r.losses.back(), r.planned_bytes / 1073741824.0,
                 r.in_use_bytes / 1073741824.0);
  } catch (const std::exception& e) {
    cudaGetLastError();
    r.error = e.what();
    fmt::print("  rank {}: {} on {} GPUs: FAILED: {}\n", comm.rank(), setting, r.ranks, r.error);
  }
  std::fflush(stdout);
  return r;
}

}  // namespace

std::vector<ParallelStepResult> bench_data_parallel_steps(const ProcessGroup& world, Backend& backend,
                                                          const MambaWeights& weights, Communicator& host,
                                                          Communicator& comm, const ParallelStepOptions& options) {
  std::vector<ParallelStepResult> results;
  for (ShardingStrategy strategy : options.strategies)
    results.push_back(run_steps(backend, weights, host, comm, strategy, std::string(strategy_name(strategy)), options));
  // The baseline: rank 0 alone, with collectives that have nobody to talk to; the others wait.
  ParallelStepResult alone;
  if (world.is_root()) {
    ProcessGroup self(nullptr, nullptr, ProcessGroup::Ranks::this_process);
    Watchdog watchdog(self, options.timeout_s);
    MpiCommunicator nobody(self, watchdog);
    alone = run_steps(backend, weights, nobody, nobody, ShardingStrategy::ddp, "one GPU", options);
  }
  host.barrier();
  results.push_back(std::move(alone));
  return results;
}

ParallelStepResult bench_sharded_base_steps(Backend& backend, const MambaWeights& sharded, Communicator& host,
                                            Communicator& comm, const ParallelStepOptions& options) {
  return run_steps(backend, sharded, host, comm, ShardingStrategy::zero2, "zero2 sharded", options);
}

void print_parallel_step_table(const std::vector<ParallelStepResult>& results) {
  const ParallelStepResult& alone = results.back();
  const double baseline = alone.tokens_per_second_per_gpu();
  fmt::print("\n{:<13} {:>5} {:>9} {:>13} {:>8} {:>10} {:>9} {:>9} {:>7}\n", "setting", "GPUs", "per GPU",
             "tokens/s/GPU", "step_ms", "efficiency", "plan_GiB", "used_GiB", "loss");
  for (const ParallelStepResult& r : results) {
    if (!r.error.empty()) {
      fmt::print("{:<13} {:>5} FAILED: {}\n", r.setting, r.ranks, r.error.substr(0, 90));
      continue;
    }
    const double tokens = r.tokens_per_second_per_gpu();
    fmt::print("{:<13} {:>5} {:>9} {:>13.0f} {:>8.1f} {:>10} {:>9.2f} {:>9.2f} {:>7.3f}\n", r.setting, r.ranks,
               fmt::format("{}x{}", r.batch, r.seq_len), tokens, r.median_seconds * 1e3,
               baseline > 0 ? fmt::format("{:.1f}%", 100 * tokens / baseline) : "-", r.planned_bytes / 1073741824.0,
               r.in_use_bytes / 1073741824.0, r.losses.empty() ? 0.0 : r.losses.back());
  }
  fmt::print("(median over the timed steps of rank 0; efficiency: tokens/s per GPU over those of one GPU alone;\n"
             " plan: the memory plans on rank 0, the peak (nothing allocates in a step); used: all memory in use on\n"
             " rank 0's GPU, NCCL's included; zero2 sharded: zero2 with distributed.shard_base_weights)\n");
}

}  // namespace ssmtune::bench
