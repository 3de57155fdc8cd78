// Training checkpoints: <output_dir>/checkpoints/step_<N>/ with the adapters, the AdamW moments and
// the state needed to continue exactly (step, data position, the resolved recipe). All ranks of a job
// write one together: rank 0 creates it under a temporary name, each rank holding a shard of the
// optimizer state writes that shard (with ddp, rank 0 writes the one whole state), and after a barrier
// rank 0 writes the adapters, the recipe and last state.json, the marker of a complete checkpoint,
// then renames the directory into place. A directory named step_<N> with a state.json is complete.
//
// The moments are stored as flat ranges of the adapter layout (framework/lora.h), so a checkpoint
// restores on any number of ranks with any strategy: each rank reads its range from whichever shard
// files hold it.
#pragma once
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

#include "data/token_dataset.h"
#include "distributed/communicator.h"
#include "distributed/sharding.h"
#include "framework/lora.h"

namespace ssmtune {

struct TrainingState {
  int64_t step = 0;  // updates done
  SamplerPosition sampler;
  uint64_t seed = 0;
  int world_size = 1;
  std::string strategy = "ddp";  // distributed.strategy of the run that wrote it
  int64_t global_batch = 0;      // sequences per step over all ranks and micro-batches
};

inline constexpr const char* kAdapterFile = "adapter.safetensors";
inline constexpr const char* kOptimizerFile = "optimizer.safetensors";  // the moments, when one file holds them
inline constexpr const char* kStateFile = "state.json";
inline constexpr const char* kRecipeFile = "recipe.yaml";

// The file of the moments of shard `shard`: kOptimizerFile for one shard, else
// optimizer-<index>-of-<count>.safetensors (tensors adam_m and adam_v over the shard's range).
std::string optimizer_file_name(ShardIndex shard);

// Collective over `ranks` (the job's MPI communicator). adapters.optimizer_range() must be shard
// `optimizer_shard` of the layout; every rank passes the same state. Returns the checkpoint directory.
std::filesystem::path save_checkpoint(Communicator& ranks, const std::filesystem::path& output_dir,
                                      const LoraAdapters& adapters, ShardIndex optimizer_shard,
                                      const TrainingState& state, const std::string& resolved_recipe);

// The newest complete checkpoint under output_dir, if any.
std::optional<std::filesystem::path> latest_checkpoint(const std::filesystem::path& output_dir);

// Loads the adapters and the moments of adapters.optimizer_range() and returns the state; the
// checkpoint must match the adapters' layout (Error naming the file and tensor otherwise).
TrainingState load_checkpoint(const std::filesystem::path& dir, LoraAdapters& adapters);

}  // namespace ssmtune
