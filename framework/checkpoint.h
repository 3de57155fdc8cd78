// Training checkpoints: <output_dir>/checkpoints/step_<N>/ with the adapters, the AdamW moments and
// the state needed to continue exactly (step, data position, the resolved recipe). A checkpoint is
// written under a temporary name and renamed into place once every file is on disk, so a directory
// named step_<N> is always complete.
#pragma once
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

#include "data/token_dataset.h"
#include "framework/lora.h"

namespace ssmtune {

struct TrainingState {
  int64_t step = 0;  // updates done
  SamplerPosition sampler;
  uint64_t seed = 0;
  int world_size = 1;
};

inline constexpr const char* kAdapterFile = "adapter.safetensors";
inline constexpr const char* kOptimizerFile = "optimizer.safetensors";
inline constexpr const char* kStateFile = "state.json";
inline constexpr const char* kRecipeFile = "recipe.yaml";

std::filesystem::path save_checkpoint(const std::filesystem::path& output_dir, const LoraAdapters& adapters,
                                      const TrainingState& state, const std::string& resolved_recipe);

// The newest complete checkpoint under output_dir, if any.
std::optional<std::filesystem::path> latest_checkpoint(const std::filesystem::path& output_dir);

// Loads adapters and optimizer moments into `adapters` and returns the state; the checkpoint must
// match the adapters' layout (Error naming the file and tensor otherwise).
TrainingState load_checkpoint(const std::filesystem::path& dir, LoraAdapters& adapters);

}  // namespace ssmtune
