// `ssmtune info --config <recipe> [overrides] [--ranks N]`: what a recipe will take before any GPU is
// touched (framework/model_info.h): parameter counts, memory per GPU for its shape and parallelism,
// and FLOPs per token, from the model's config.json alone.
#pragma once
#include <string>
#include <vector>

#include "framework/model_info.h"

namespace CLI {
class App;
}

namespace ssmtune {

struct InfoOptions {
  std::string config;                  // recipe YAML
  std::vector<std::string> overrides;  // dotted.key=value
  int ranks = 1;                       // the mpirun -np the recipe is meant for
};

// Declares the subcommand's options on `command` (created by the caller as app.add_subcommand("info")).
void add_info_options(CLI::App& command, InfoOptions& options);

// The report as `info` prints it.
std::string format_model_info(const ModelInfo& info, const RecipeConfig& recipe);

// Prints the report to stdout. Errors (ssmtune::Error) name the recipe key or config.json.
void run_info(const InfoOptions& options);

}  // namespace ssmtune
