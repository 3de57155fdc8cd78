// What tests that train the demo recipe share: the recipe pointed at a test's model, data and output
// directory, a scratch directory holding the demo model and data, the process group of a test program
// started without mpirun, and metrics.jsonl read back.
#pragma once
#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "data/demo_dataset.h"
#include "distributed/process_group.h"
#include "framework/mamba_model.h"
#include "framework/model_sizes.h"
#include "framework/recipe_config.h"
#include "tests/framework/scratch_dir.h"

namespace ssmtune::test {

// This process alone (MPI's world when no mpirun started it).
inline const ProcessGroup& process_group() {
  static ProcessGroup group(nullptr, nullptr);
  return group;
}

// recipes/configs/demo.yaml for a run in `dir`, which holds the model (model/) and the data (data.h5):
// train.output_dir is dir/output, then `overrides` in order.
inline RecipeConfig demo_recipe(const std::filesystem::path& dir, const std::string& output,
                                const std::vector<std::string>& overrides) {
  std::vector<std::string> all{"model.path=" + (dir / "model").string(), "data.path=" + (dir / "data.h5").string(),
                               "train.output_dir=" + (dir / output).string()};
  all.insert(all.end(), overrides.begin(), overrides.end());
  return load_recipe(std::filesystem::path(SSMTUNE_SOURCE_DIR) / "recipes/configs/demo.yaml", all);
}

// A scratch directory with the demo model (model/) and `documents` demo documents (data.h5), and the
// recipes of runs in it: `settings` for every run, then each run's own overrides.
struct DemoRun {
  ScratchDir dir;
  std::vector<std::string> settings;

  DemoRun(const std::string& name, uint64_t documents, std::vector<std::string> run_settings = {})
      : dir(name), settings(std::move(run_settings)) {
    write_random_mamba(dir / "model", model_size("demo"), 0);
    write_token_dataset((dir / "data.h5").string(), make_demo_dataset(0, documents));
  }
  RecipeConfig recipe(const std::string& output, const std::vector<std::string>& overrides) const {
    std::vector<std::string> all = settings;
    all.insert(all.end(), overrides.begin(), overrides.end());
    return demo_recipe(dir.path(), output, all);
  }
};

// Every line of a metrics.jsonl, parsed.
inline std::vector<nlohmann::json> read_metrics(const std::filesystem::path& path) {
  std::vector<nlohmann::json> lines;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) lines.push_back(nlohmann::json::parse(line));
  return lines;
}

}  // namespace ssmtune::test
