// Whole training steps on the CUDA backend: a randomly initialised model, LoRA r=16 alpha 32 on all
// four projections, AdamW, random token batches; tokens/s and memory beside HF + PEFT's figures.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "recipes/bench/report.h"

namespace ssmtune::bench {

struct StepOptions {
  std::vector<std::string> models;    // names of model_sizes.h with a batch size here: mamba-130m, -1.4b, -2.8b
  std::vector<bool> recompute;        // each setting is run on the same weights
  int warmup_steps = 2, timed_steps = 5;
  uint64_t seed = 0;
};

// The model names the step benchmark knows; "130m" is accepted for "mamba-130m".
std::vector<std::string> step_model_names();
std::string full_model_name(const std::string& name);  // Error naming the known ones

std::vector<StepResult> bench_training_steps(const StepOptions& options);

}  // namespace ssmtune::bench
