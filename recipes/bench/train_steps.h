// Whole training steps on the CUDA backend: a randomly initialised model, LoRA r=16 alpha 32 on all
// four projections, AdamW, random token batches; tokens/s and memory beside HF + PEFT's figures. Packed
// settings run the same rows as documents of 300 to 1000 tokens (doc_start, first tokens masked), for
// the cost of packing against the unpacked rows of the same length.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "framework/lora.h"
#include "framework/optimizer.h"
#include "framework/train_step.h"
#include "recipes/bench/report.h"

namespace ssmtune::bench {

struct StepOptions {
  std::vector<std::string> models;    // names of model_sizes.h with a batch size here: mamba-130m, -1.4b, -2.8b
  std::vector<bool> recompute;        // each setting is run on the same weights
  std::vector<int64_t> checkpoint_every{1};  // memory.checkpoint_every of the recompute-on settings
  std::vector<bool> keep_layer_outputs{false};  // memory.keep_layer_outputs of those with checkpoint_every > 1
  std::vector<bool> packing{false};   // unpacked rows, and/or rows packing documents of 300-1000 tokens
  int warmup_steps = 2, timed_steps = 5;
  uint64_t seed = 0;
};

// The model names the step benchmark knows; "130m" is accepted for "mamba-130m".
std::vector<std::string> step_model_names();
std::string full_model_name(const std::string& name);  // Error naming the known ones

std::vector<StepResult> bench_training_steps(const StepOptions& options);

// One training step as the step benchmarks time it, synchronised at both ends: the adapter gradients
// zeroed, forward_backward with the loss scaled by 1/tokens (dropout stream `index`), the AdamW update of
// step `index`. doc_start may be null (TrainStep::forward_backward).
struct TimedStep {
  double mean_loss = 0;  // over the step's tokens
  double seconds = 0;
};
TimedStep timed_training_step(Backend& backend, TrainStep& step, LoraAdapters& adapters,
                              const OptimizerConfig& optimizer, int index, const uint32_t* tokens, const uint8_t* mask, const int32_t* doc_start,
                              uint64_t seed);

// `warmup` then `timed` training steps (timed_training_step, AdamW at lr 1e-4) on batches of the step's
// shape drawn from rng_seed: tokens uniform over the vocab, every target counted; `packed` rows are
// documents of 300 to 1000 tokens instead (doc_start, first tokens masked).
struct TimedSteps {
  std::vector<double> losses;        // mean token loss of every step, warm-up included
  std::vector<double> step_seconds;  // the timed steps
  double median_seconds = 0;
  size_t in_use_bytes = 0;           // cudaMemGetInfo total - free after them; nothing allocates inside a
                                     // step, so also the peak
};
TimedSteps run_timed_steps(Backend& backend, TrainStep& step, LoraAdapters& adapters, int64_t vocab, bool packed,
                           int warmup, int timed, uint64_t rng_seed, uint64_t dropout_seed);

}  // namespace ssmtune::bench
