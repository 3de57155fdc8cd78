#include "recipes/bench/long_sequences.h"

#include <cuda_runtime.h>
#include <fmt/format.h>

#include <chrono>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>

#include "framework/cuda_backend.h"
#include "framework/lora.h"
#include "framework/mamba_model.h"
#include "framework/model_sizes.h"
#include "framework/train_step.h"
#include "recipes/bench/harness.h"
#include "recipes/bench/train_steps.h"

namespace ssmtune::bench {
namespace {

using Clock = std::chrono::steady_clock;
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// One length of one series: the step's plan first (reported even when it does not fit), then the steps.
LongResult run_length(Backend& backend, const MambaWeights& weights, LoraAdapters& adapters, int64_t checkpoint_every,
                      int64_t seq_len, const LongOptions& options) {
  LongResult r;
  r.model = options.model;
  r.checkpoint_every = checkpoint_every;
  r.seq_len = seq_len;
  r.scan_chunk = options.scan_chunk;
  StepShape shape;
  shape.batch = 1;
  shape.seq_len = seq_len;
  shape.scan_chunk = options.scan_chunk;
  shape.recompute = true;
  shape.loss_slice_rows = 1024;
  shape.checkpoint_every = checkpoint_every;
  const StepPlanBytes planned = TrainStep::planned_bytes(backend, weights.config(), adapters.config(), shape);
  r.planned_step_bytes = planned.total();
  r.planned_activation_bytes = planned.activations;
  const std::string setting = fmt::format("  checkpoint_every {}, {} tokens", checkpoint_every, seq_len);
  fmt::print("{}: step plan {:.2f} GiB ({:.1f} KiB per token)\n", setting, r.planned_step_bytes / kGiB,
             static_cast<double>(r.planned_step_bytes) / 1024.0 / static_cast<double>(seq_len));
  std::fflush(stdout);

  std::unique_ptr<TrainStep> step;
  try {
    step = std::make_unique<TrainStep>(backend, weights, adapters, shape);
    r.fits = true;
  } catch (const std::exception& e) {
    cudaGetLastError();  // the failed allocation must not surface in a later launch check
    r.error = std::string("does not fit: ") + e.what();
    fmt::print("{}: {}\n", setting, r.error);
    std::fflush(stdout);
    return r;
  }
  try {
    TimedSteps run = run_timed_steps(backend, *step, adapters, weights.config().vocab_size, false,
                                     options.warmup_steps, options.timed_steps,
                                     options.seed + static_cast<uint64_t>(seq_len), options.seed);
    r.losses = std::move(run.losses);
    r.step_seconds = std::move(run.step_seconds);
    r.median_seconds = run.median_seconds;
    r.in_use_bytes = run.in_use_bytes;
    r.allocated_bytes = backend.allocated_bytes();
    fmt::print("{}: {:.0f} tokens/s (median of {} steps, {:.2f} s), loss {:.3f} -> {:.3f}, allocated {:.2f} GiB, "
               "in use {:.2f} GiB\n",
               setting, r.tokens_per_second(), r.step_seconds.size(), r.median_seconds, r.losses.front(),
               r.losses.back(), r.allocated_bytes / kGiB, r.in_use_bytes / kGiB);
  } catch (const std::exception& e) {
    cudaGetLastError();
    r.error = std::string("FAILED: ") + e.what();
    fmt::print("{}: {}\n", setting, r.error);
  }
  std::fflush(stdout);
  return r;
}

}  // namespace

std::vector<LongResult> bench_long_sequences(const LongOptions& options) {
  const Clock::time_point start = Clock::now();
  // Declared in this order so that they are destroyed in reverse, the backend last.
  const std::unique_ptr<Backend> backend = make_cuda_backend();
  const MambaWeights weights = MambaWeights::random(model_size(options.model), *backend, options.seed);
  LoraConfig lora;  // all four projections by default
  lora.rank = 16;
  lora.alpha = 32;
  lora.dropout = 0;
  LoraAdapters adapters(*backend, weights.config(), lora);
  adapters.initialize(options.seed);
  fmt::print("  {} built in {:.1f} s: NF4 base {:.2f} GiB, {} adapter parameters\n", options.model,
             seconds_since(start), weights.bytes() / kGiB, adapters.numel());
  std::fflush(stdout);
  std::vector<LongResult> results;
  for (const int64_t k : options.checkpoint_every)
    for (int64_t seq_len = options.start; seq_len <= options.last; seq_len *= 2) {
      results.push_back(run_length(*backend, weights, adapters, k, seq_len, options));
      if (!results.back().error.empty()) break;  // a longer one would not fit either
    }
  return results;
}

void print_long_table(const std::vector<LongResult>& results) {
  if (results.empty()) return;
  fmt::print("\n{} one sequence per step, recompute on, scan chunk {}\n", results.front().model,
             results.front().scan_chunk);
  fmt::print("{:>5} {:>8} {:>9} {:>8} {:>8} {:>9} {:>8}\n", "k", "seq_len", "tokens/s", "step_s", "plan_GiB",
             "KiB/token", "used_GiB");
  std::map<int64_t, std::vector<const LongResult*>> series;  // by checkpoint_every
  for (const LongResult& r : results) {
    series[r.checkpoint_every].push_back(&r);
    const double per_token = static_cast<double>(r.planned_step_bytes) / 1024.0 / static_cast<double>(r.seq_len);
    if (!r.error.empty())
      fmt::print("{:>5} {:>8} {:>9} {:>8} {:>8.2f} {:>9.1f} {}\n", r.checkpoint_every, r.seq_len, "-", "-",
                 r.planned_step_bytes / kGiB, per_token, r.error);
    else
      fmt::print("{:>5} {:>8} {:>9.0f} {:>8.2f} {:>8.2f} {:>9.1f} {:>8.2f}\n", r.checkpoint_every, r.seq_len,
                 r.tokens_per_second(), r.median_seconds, r.planned_step_bytes / kGiB, per_token,
                 r.in_use_bytes / kGiB);
  }
  fmt::print("(k: memory.checkpoint_every; plan: the step's activations and workspaces, TrainStep::planned_bytes;\n"
             " used: cudaMemGetInfo total-free after the timed steps, weights, optimizer and CUDA context included)\n");
  for (const auto& [k, rows] : series) {
    std::string longest = "none", baseline;
    for (const LongResult* r : rows)
      if (r->error.empty()) {
        longest = fmt::format("{} tokens", r->seq_len);
        baseline += fmt::format(" {}:{:.0f}", r->seq_len, r->tokens_per_second());
      }
    fmt::print("longest that fits with checkpoint_every {}: {}\n", k, longest);
    fmt::print("single GPU (parallel.context baseline), {} checkpoint_every {}, seq_len:tokens/s{}\n",
               rows.front()->model, k, baseline.empty() ? " none" : baseline);
  }
}

void write_long_json(const std::filesystem::path& path, const DeviceInfo& device,
                     const std::vector<LongResult>& results) {
  nlohmann::json j;
  j["device"] = {{"name", device.name}, {"memory_bytes", device.memory_bytes}};
  j["long_sequences"] = nlohmann::json::array();
  for (const LongResult& r : results)
    j["long_sequences"].push_back({{"model", r.model},
                                   {"checkpoint_every", r.checkpoint_every},
                                   {"seq_len", r.seq_len},
                                   {"scan_chunk", r.scan_chunk},
                                   {"planned_step_bytes", r.planned_step_bytes},
                                   {"planned_activation_bytes", r.planned_activation_bytes},
                                   {"allocated_bytes", r.allocated_bytes},
                                   {"in_use_bytes", r.in_use_bytes},
                                   {"step_seconds", r.step_seconds},
                                   {"median_seconds", r.median_seconds},
                                   {"tokens_per_second", r.tokens_per_second()},
                                   {"losses", r.losses},
                                   {"error", r.error}});
  std::ofstream(path) << j.dump(2) << "\n";
}

}  // namespace ssmtune::bench
