// Training checkpoints: <output_dir>/checkpoints/step_<N>/ with the adapters, the AdamW moments and
// the state needed to continue exactly (step, data position, the resolved recipe). All ranks of a job
// write one together into the temporary directory .step_<N>.tmp: each rank holding a shard of the
// optimizer state writes that shard (with ddp, rank 0 writes the one whole state); after a barrier
// rank 0 writes the adapters, the recipe and state.json, and last manifest.json (framework/
// checkpoint_manifest.h) with every file's size and CRC-32, then renames the directory into place.
// Every file is flushed and fsynced before its rename, and every directory after one.
//
// The rule: a checkpoint is complete when its directory is named step_<N> and every file its manifest
// lists matches the manifest. Entries named .step_* under checkpoints/ are saves or deletions a
// crash interrupted; the next run removes them.
//
// The moments are stored as flat ranges of the adapter layout (framework/lora.h), so a checkpoint
// restores on any number of ranks with any strategy: each rank reads its range from whichever shard
// files hold it.
#pragma once
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

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
  int64_t bad_steps_in_a_row = 0;  // framework/bad_steps.h
  int64_t bad_steps_total = 0;
};

inline constexpr const char* kAdapterFile = "adapter.safetensors";
inline constexpr const char* kOptimizerFile = "optimizer.safetensors";  // the moments, when one file holds them
inline constexpr const char* kStateFile = "state.json";
inline constexpr const char* kRecipeFile = "recipe.yaml";

// The file of the moments of shard `shard`: kOptimizerFile for one shard, else
// optimizer-<index>-of-<count>.safetensors (tensors adam_m and adam_v over the shard's range).
std::string optimizer_file_name(ShardIndex shard);

// Collective over `ranks` (the job's MPI communicator). adapters.optimizer_range() must be shard
// `optimizer_shard` of the layout; every rank passes the same state. Once the new checkpoint is
// complete, rank 0 deletes the older ones beyond the keep_last newest (0: keeps all); checkpoints of
// later steps, left by an earlier run that got further, stay until this run saves those steps.
// Returns the checkpoint directory.
std::filesystem::path save_checkpoint(Communicator& ranks, const std::filesystem::path& output_dir,
                                      const LoraAdapters& adapters, ShardIndex optimizer_shard,
                                      const TrainingState& state, const std::string& resolved_recipe,
                                      int64_t keep_last = 0);

struct CheckpointSearch {
  std::optional<std::filesystem::path> latest;  // the newest complete checkpoint whose files all verify
  // Newer step_<N> directories passed over, each with the reason (the first file that does not match).
  std::vector<std::pair<std::filesystem::path, std::string>> skipped;
};

// Looks at the step_<N> directories under output_dir/checkpoints from the newest down, verifying each
// against its manifest, until one is complete.
CheckpointSearch find_latest_checkpoint(const std::filesystem::path& output_dir);

// Removes what interrupted saves and deletions left under output_dir/checkpoints (.step_* entries);
// returns their names.
std::vector<std::string> remove_interrupted_saves(const std::filesystem::path& output_dir);

// Verifies the files it reads against the checkpoint's manifest, then loads the adapters and the
// moments of adapters.optimizer_range() and returns the state. An Error names the file when one does
// not match the manifest, and the file and tensor when the checkpoint does not fit the adapters' layout.
TrainingState load_checkpoint(const std::filesystem::path& dir, LoraAdapters& adapters);

// What the exports (PEFT adapter, merged model) read of a checkpoint, the recipe and the adapters,
// verified against its manifest: an Error names the file when the checkpoint is unfinished (no manifest)
// or one of them does not match. The optimizer state and the training state, which only resuming reads,
// are not checked, so damage there does not keep the adapters from being exported.
void verify_exported_files(const std::filesystem::path& dir);

}  // namespace ssmtune
