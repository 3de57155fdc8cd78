#include "recipes/bench/train_steps.h"

#include <cuda_runtime.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <chrono>
#include <random>
#include <utility>
#include <vector>

#include "framework/cuda_backend.h"
#include "framework/error.h"
#include "framework/lora.h"
#include "framework/mamba_model.h"
#include "framework/model_info.h"
#include "framework/model_sizes.h"
#include "framework/optimizer.h"
#include "framework/train_step.h"
#include "kernels/cuda/check.h"
#include "recipes/bench/harness.h"
#include "recipes/bench/peers.h"

namespace ssmtune::bench {
namespace {

using Clock = std::chrono::steady_clock;

// The batch sizes are HF + PEFT's, so that the tokens/s and the memory compare like with like.
const peers::HfStep& hf_figure(const std::string& model) {
  for (const peers::HfStep& hf : peers::kHfPeft)
    if (hf.model == model) return hf;
  fail("no step benchmark for model '{}' (known: {})", model, fmt::join(step_model_names(), ", "));
}

// Rows of documents of 300 to 1000 tokens end to end (each row's first continues from before it), as
// SequenceSampler packs them: doc_start, and a mask that excludes each document's first token as a target.
void pack_documents(std::mt19937_64& rng, int64_t batch, int64_t len, std::vector<int32_t>& doc_start,
                    std::vector<uint8_t>& mask) {
  std::uniform_int_distribution<int64_t> length(300, 1000), rest(1, 1000);
  for (int64_t b = 0; b < batch; ++b) {
    int64_t start = 0, next = rest(rng);
    for (int64_t t = 0; t < len; ++t) {
      if (t == next) {
        start = t;
        next = t + length(rng);
      }
      doc_start[b * len + t] = static_cast<int32_t>(start);
      mask[b * len + t] = t + 1 != next;
    }
  }
}

struct MemorySetting {
  bool recompute = false;
  int64_t checkpoint_every = 1;
  bool keep_layer_outputs = false;
};

// Recompute off, and on with each checkpoint_every (each k > 1 with each keep_layer_outputs).
std::vector<MemorySetting> memory_settings(const StepOptions& options) {
  std::vector<MemorySetting> settings;
  for (bool recompute : options.recompute) {
    if (!recompute) settings.push_back({});
    else
      for (int64_t k : options.checkpoint_every) {
        if (k == 1) settings.push_back({true, 1, false});
        else
          for (bool keep : options.keep_layer_outputs) settings.push_back({true, k, keep});
      }
  }
  return settings;
}

StepResult unrun_step(const peers::HfStep& hf, const MemorySetting& memory, bool packed) {
  StepResult r;
  r.model = std::string(hf.model);
  r.recompute = memory.recompute;
  r.checkpoint_every = memory.checkpoint_every;
  r.keep_layer_outputs = memory.keep_layer_outputs;
  r.packed = packed;
  r.batch = hf.batch;
  r.seq_len = peers::kHfSeqLen;
  return r;
}

StepResult run_steps(Backend& backend, const MambaWeights& weights, LoraAdapters& adapters, const peers::HfStep& hf,
                     const MemorySetting& memory, bool packed, const StepOptions& options) {
  StepResult r = unrun_step(hf, memory, packed);
  r.hf_tokens_per_second = hf.tokens_per_second;
  r.hf_peak_bytes = hf.peak_gib * 1024.0 * 1024.0 * 1024.0;
  try {
    StepShape shape;
    shape.batch = r.batch;
    shape.seq_len = r.seq_len;
    shape.scan_chunk = 64;
    shape.recompute = memory.recompute;
    shape.checkpoint_every = memory.checkpoint_every;
    shape.keep_layer_outputs = memory.keep_layer_outputs;
    shape.loss_slice_rows = 1024;
    TrainStep step(backend, weights, adapters, shape);
    TimedSteps run = run_timed_steps(backend, step, adapters, weights.config().vocab_size, packed,
                                     options.warmup_steps, options.timed_steps,
                                     options.seed + (memory.recompute ? 1 : 0), options.seed);
    r.losses = std::move(run.losses);
    r.step_seconds = std::move(run.step_seconds);
    r.median_seconds = run.median_seconds;
    r.in_use_bytes = run.in_use_bytes;
    r.model_flops_per_token = flops_per_token(weights.config(), adapters.config()).step(false);
    r.planned_bytes = backend.allocated_bytes();
    r.weights_bytes = weights.bytes();
    r.adapter_params = static_cast<size_t>(adapters.numel());
    r.activation_bytes = step.activation_bytes();
    fmt::print("  {} recompute {}{}: {:.0f} tokens/s (median of {} steps, {:.1f} ms), loss {:.3f} -> {:.3f}, "
               "planned {:.2f} GiB (activations {:.2f}), in use {:.2f} GiB\n",
               r.model, r.recompute_label(), packed ? " packed" : "", r.tokens_per_second(), r.step_seconds.size(), r.median_seconds * 1e3,
               r.losses.front(), r.losses.back(), r.planned_bytes / 1073741824.0, r.activation_bytes / 1073741824.0,
               r.in_use_bytes / 1073741824.0);
  } catch (const std::exception& e) {
    cudaGetLastError();  // an allocation failure must not surface in the next setting's launch checks
    r.error = e.what();
    fmt::print("  {} recompute {}{}: FAILED: {}\n", r.model, r.recompute_label(), packed ? " packed" : "", r.error);
  }
  std::fflush(stdout);
  return r;
}

}  // namespace

TimedStep timed_training_step(Backend& backend, TrainStep& step, LoraAdapters& adapters,
                              const OptimizerConfig& optimizer, int index, const uint32_t* tokens, const uint8_t* mask, const int32_t* doc_start,
                              uint64_t seed) {
  const double step_tokens = static_cast<double>(step.shape().batch * step.shape().seq_len);
  backend.synchronize();
  const Clock::time_point start = Clock::now();
  backend.fill_zero(adapters.grads(), static_cast<size_t>(adapters.numel()) * dtype_size(adapters.dtype()));
  const double loss =
      step.forward_backward(tokens, mask, 1.0 / step_tokens, seed, static_cast<uint64_t>(index), doc_start);
  apply_update(backend, adapters, optimizer, index);
  backend.synchronize();
  return {loss / step_tokens, seconds_since(start)};
}

TimedSteps run_timed_steps(Backend& backend, TrainStep& step, LoraAdapters& adapters, int64_t vocab, bool packed,
                           int warmup, int timed, uint64_t rng_seed, uint64_t dropout_seed) {
  const int64_t batch = step.shape().batch, len = step.shape().seq_len;
  std::vector<uint32_t> tokens(static_cast<size_t>(batch * (len + 1)));
  std::vector<uint8_t> mask(static_cast<size_t>(batch * len), 1);
  std::vector<int32_t> doc_start(packed ? mask.size() : 0);
  std::mt19937_64 rng(rng_seed);
  std::uniform_int_distribution<uint32_t> token(0, static_cast<uint32_t>(vocab - 1));
  OptimizerConfig optimizer;
  optimizer.lr = 1e-4;
  optimizer.total_steps = warmup + timed;
  TimedSteps run;
  for (int i = 0; i < warmup + timed; ++i) {
    for (uint32_t& t : tokens) t = token(rng);
    if (packed) pack_documents(rng, batch, len, doc_start, mask);
    // Timed with the step: TrainStep checks and uploads doc_start inside it.
    const TimedStep step_time = timed_training_step(backend, step, adapters, optimizer, i, tokens.data(), mask.data(),
                                                    packed ? doc_start.data() : nullptr, dropout_seed);
    run.losses.push_back(step_time.mean_loss);
    if (i >= warmup) run.step_seconds.push_back(step_time.seconds);
  }
  run.median_seconds = median(run.step_seconds);
  size_t free = 0, total = 0;
  SSMTUNE_CUDA_CHECK(cudaMemGetInfo(&free, &total), "bench memory");
  run.in_use_bytes = total - free;
  return run;
}

std::vector<std::string> step_model_names() {
  std::vector<std::string> names;
  for (const peers::HfStep& hf : peers::kHfPeft) names.emplace_back(hf.model);
  return names;
}

std::string full_model_name(const std::string& name) {
  const std::string full = name.starts_with("mamba-") ? name : "mamba-" + name;
  return std::string(hf_figure(full).model);
}

std::vector<StepResult> bench_training_steps(const StepOptions& options) {
  std::vector<StepResult> results;
  for (const std::string& model : options.models) {
    const peers::HfStep& hf = hf_figure(model);
    fmt::print("{}: building random weights and adapters\n", model);
    std::fflush(stdout);
    try {
      const Clock::time_point start = Clock::now();
      // Declared in this order so that they are destroyed in reverse: the step's memory is gone before
      // the next model is built, and the backend outlives everything allocated through it.
      const std::unique_ptr<Backend> backend = make_cuda_backend();
      const MambaWeights weights = MambaWeights::random(model_size(model), *backend, options.seed);
      LoraConfig lora;  // all four projections by default
      lora.rank = 16;
      lora.alpha = 32;
      lora.dropout = 0;
      LoraAdapters adapters(*backend, weights.config(), lora);
      adapters.initialize(options.seed);
      fmt::print("  built in {:.1f} s: NF4 base {:.2f} GiB, {} adapter parameters\n", seconds_since(start),
                 weights.bytes() / 1073741824.0, adapters.numel());
      for (const MemorySetting& memory : memory_settings(options))
        for (bool packed : options.packing)
          results.push_back(run_steps(*backend, weights, adapters, hf, memory, packed, options));
    } catch (const std::exception& e) {
      cudaGetLastError();
      fmt::print("  {}: FAILED to build: {}\n", model, e.what());
      for (const MemorySetting& memory : memory_settings(options))
        for (bool packed : options.packing) {
          StepResult r = unrun_step(hf, memory, packed);
          r.error = std::string("building the model: ") + e.what();
          results.push_back(std::move(r));
        }
    }
    std::fflush(stdout);
  }
  return results;
}

}  // namespace ssmtune::bench
