// The ssmtune command: train, init, export and demo-data. Every error a user can cause ends here as
// one line naming the file, key or tensor, and a non-zero exit.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <filesystem>

#include "data/demo_dataset.h"
#include "data/token_dataset.h"
#include "distributed/process_group.h"
#include "framework/error.h"
#include "framework/mamba_model.h"
#include "framework/peft_export.h"
#include "framework/recipe_config.h"
#include "framework/trainer.h"
#include "framework/model_sizes.h"

namespace {

using namespace ssmtune;

int train(const std::string& config, const std::vector<std::string>& overrides, const ProcessGroup& group) {
  const RecipeConfig recipe = load_recipe(config, overrides);
  const TrainingSummary s = run_training(recipe, group);
  if (group.is_root() && s.last_step > s.first_step)
    fmt::print("trained steps {}..{}: loss {:.4f} -> {:.4f}, {:.0f} tokens/s\n", s.first_step + 1, s.last_step,
               s.first_loss, s.last_loss, s.tokens_per_second);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  ProcessGroup group(&argc, &argv);
  CLI::App app{"ssmtune: QLoRA fine-tuning of Mamba language models"};
  app.require_subcommand(1);

  std::string config;
  std::vector<std::string> overrides;
  CLI::App* train_cmd = app.add_subcommand("train", "train LoRA adapters on a frozen NF4 base model");
  train_cmd->add_option("--config", config, "recipe YAML file")->required();
  train_cmd->add_option("overrides", overrides, "dotted.key=value overrides of recipe keys");

  std::string size, out, checkpoint, format = "peft";
  uint64_t seed = 0;
  uint64_t documents = 4000;
  CLI::App* init_cmd = app.add_subcommand("init", "write a randomly initialised base model in HF format");
  init_cmd->add_option("--size", size, "model size: " + fmt::format("{}", fmt::join(model_size_names(), ", ")))
      ->required();
  init_cmd->add_option("--out", out, "output directory")->required();
  init_cmd->add_option("--seed", seed, "random seed");

  CLI::App* export_cmd = app.add_subcommand("export", "export a checkpoint for other tools");
  export_cmd->add_option("--checkpoint", checkpoint, "checkpoint directory (…/checkpoints/step_N)")->required();
  export_cmd->add_option("--format", format, "peft")->check(CLI::IsMember({"peft"}));
  export_cmd->add_option("--out", out, "output directory")->required();

  CLI::App* demo_cmd = app.add_subcommand("demo-data", "write the synthetic demo data set (HDF5)");
  demo_cmd->add_option("--out", out, "output .h5 file")->required();
  demo_cmd->add_option("--seed", seed, "random seed");
  demo_cmd->add_option("--documents", documents, "number of documents");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return group.is_root() ? app.exit(e) : (e.get_exit_code() == 0 ? 0 : 2);
  }

  try {
    if (*train_cmd) return train(config, overrides, group);
    if (!group.is_root()) return 0;  // the other commands are single-process
    if (*init_cmd) {
      write_random_mamba(out, model_size(size), seed);
      fmt::print("wrote a random {} model to {}\n", size, out);
    } else if (*export_cmd) {
      for (const std::string& warning : export_peft_adapter(checkpoint, out)) fmt::print(stderr, "warning: {}\n", warning);
      fmt::print("wrote a PEFT adapter to {}\n", out);
    } else if (*demo_cmd) {
      if (std::filesystem::path(out).has_parent_path()) std::filesystem::create_directories(std::filesystem::path(out).parent_path());
      write_token_dataset(out, make_demo_dataset(seed, documents));
      fmt::print("wrote the demo data set to {}\n", out);
    }
    return 0;
  } catch (const Error& e) {
    std::fflush(stdout);  // what was printed before comes before the error
    const std::string prefix = group.size() > 1 ? fmt::format("rank {}: ", group.rank()) : "";
    fmt::print(stderr, "ssmtune: error: {}{}\n", prefix, e.what());
    if (group.size() > 1) group.abort(1);
    return 1;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    fmt::print(stderr, "ssmtune: error: {}\n", e.what());
    if (group.size() > 1) group.abort(1);
    return 1;
  }
}
