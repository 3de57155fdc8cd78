// A training recipe: a YAML file plus `dotted.key=value` overrides from the command line (torchtune's
// syntax). Every key is known here; an unknown one is an error naming it and the file.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "distributed/strategy.h"
#include "framework/lora.h"
#include "framework/optimizer.h"
#include "framework/train_step.h"

namespace ssmtune {

struct RecipeConfig {
  std::string source;              // the YAML file, for messages
  std::string device = "auto";     // auto, cpu or cuda
  std::filesystem::path model_path;
  std::filesystem::path data_path;
  std::filesystem::path val_path;  // validation set; required when eval_every > 0
  bool packing = true;             // documents packed into sequences, restarting at each (data/README.md)
  LoraConfig lora;
  OptimizerConfig optimizer;
  StepShape step;                  // batch, seq_len and memory options
  int64_t grad_accum = 1;
  int64_t max_steps = 100;
  int64_t save_every = 0;          // 0: only at the end
  int64_t log_every = 1;
  int64_t eval_every = 0;          // steps between validation losses (and at the end); 0: off
  int64_t eval_batches = 8;        // validation micro-batches per evaluation, over all ranks
  uint64_t seed = 0;
  std::filesystem::path output_dir;
  bool resume = false;
  int64_t keep_last = 0;           // complete checkpoints kept, the newest; 0: all
  int64_t max_bad_steps = 10;      // non-finite steps in a row that stop the job (framework/bad_steps.h)
  DistributedConfig distributed;   // how the ranks of an mpirun job share the work
  double memory_budget_mb = 0;     // the most MiB each rank's memory plans may take (Backend); 0: no budget
  std::string resolved_yaml;       // the whole recipe after overrides, saved with checkpoints
};

RecipeConfig load_recipe(const std::filesystem::path& yaml_file, const std::vector<std::string>& overrides);
// The same from YAML text (source names it in messages).
RecipeConfig parse_recipe(const std::string& yaml_text, const std::string& source,
                          const std::vector<std::string>& overrides);

}  // namespace ssmtune
