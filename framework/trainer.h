// The training loop of the `train` recipe: setup (backend, base model, adapters, data, memory plans),
// steps of gradient accumulation, clipping and AdamW, logging to <output_dir>/metrics.jsonl, and
// checkpoints; resume continues from the newest complete checkpoint exactly. Under mpirun the ranks
// train one job data-parallel (distributed.* recipe keys): each reads its slice of every global batch,
// the loss is normalised by the unmasked tokens of the whole global batch, and gradients and (with
// ZeRO) the optimizer state are shared as distributed/strategy.h describes.
#pragma once
#include <memory>

#include "distributed/process_group.h"
#include "framework/backend.h"
#include "framework/recipe_config.h"

namespace ssmtune {

// The backend a recipe's `device` asks for (auto: CUDA when built and a GPU is present, else CPU). The
// rank's place on its host chooses its GPU: one rank per GPU, or device 0 when the launcher shows each
// rank a single GPU (CUDA_VISIBLE_DEVICES).
std::unique_ptr<Backend> make_backend(const std::string& device, int local_rank = 0);

struct TrainingSummary {
  int64_t first_step = 0;  // the step training started from (non-zero after resume)
  int64_t last_step = 0;
  double first_loss = 0, last_loss = 0;
  double tokens_per_second = 0;  // over the whole run
  size_t peak_memory_bytes = 0;  // the most this rank's memory plans took (Backend::peak_allocated_bytes)
};

TrainingSummary run_training(const RecipeConfig& recipe, const ProcessGroup& group);

}  // namespace ssmtune
