// The ssmtune command: train, init, quantize, export, generate, prepare and demo-data. Every error a user can cause ends
// here as one line naming the file, key or tensor, and a non-zero exit.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <filesystem>

#include "data/demo_dataset.h"
#include "data/token_dataset.h"
#include "distributed/process_group.h"
#include "framework/error.h"
#include "framework/mamba_model.h"
#include "framework/merged_export.h"
#include "framework/peft_export.h"
#include "framework/progress.h"
#include "framework/quantize_model.h"
#include "framework/recipe_config.h"
#include "framework/trainer.h"
#include "framework/model_sizes.h"
#include "recipes/generate_command.h"
#include "recipes/info_command.h"
#include "recipes/plot_command.h"
#ifdef SSMTUNE_WITH_TOKENIZER
#include "recipes/prepare_command.h"
#endif

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

// --dtype of the merged export.
DType merged_dtype(const std::string& name) {
  if (name == "f32") return DType::F32;
  if (name == "f16") return DType::F16;
  return DType::BF16;  // CLI11 has checked it is one of the three
}

void export_checkpoint(const std::string& checkpoint, const std::string& format, const std::string& out,
                       const MergedExportOptions& merged, const std::vector<std::string>& merged_only_options) {
  if (format == "peft") {
    if (!merged_only_options.empty())
      fail("{} only applies to --format merged", fmt::join(merged_only_options, ", "));
    for (const std::string& warning : export_peft_adapter(checkpoint, out)) print_warning(warning);
    fmt::print("wrote a PEFT adapter to {}\n", out);
    return;
  }
  export_merged_model(checkpoint, out, merged);
  fmt::print("wrote the merged model to {}\n", out);
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

  std::string size, out, checkpoint, model, format = "peft", dtype = "bf16", max_shard_size = "5GB";
  uint64_t seed = 0;
  uint64_t documents = 4000;
  CLI::App* init_cmd = app.add_subcommand("init", "write a randomly initialised base model in HF format");
  init_cmd->add_option("--size", size, "model size: " + fmt::format("{}", fmt::join(model_size_names(), ", ")))
      ->required();
  init_cmd->add_option("--out", out, "output directory")->required();
  init_cmd->add_option("--seed", seed, "random seed");

  CLI::App* quantize_cmd =
      app.add_subcommand("quantize", "write a base model as a bitsandbytes NF4 checkpoint (HF format)");
  quantize_cmd->add_option("--model", model, "base model directory (HF format)")->required();
  quantize_cmd->add_option("--out", out, "output directory (new or empty)")->required();
  quantize_cmd->add_option("--max-shard-size", max_shard_size, "largest safetensors file, e.g. 5GB, 500MB");

  CLI::App* export_cmd = app.add_subcommand("export", "export a checkpoint for other tools");
  export_cmd->add_option("--checkpoint", checkpoint, "checkpoint directory (…/checkpoints/step_N)")->required();
  export_cmd
      ->add_option("--format", format,
                   "peft: the adapter for PEFT; merged: the base model with the adapters merged in (HF format)")
      ->check(CLI::IsMember({"peft", "merged"}));
  export_cmd->add_option("--out", out, "output directory (merged: new or empty)")->required();
  CLI::Option* model_opt =
      export_cmd->add_option("--model", model, "merged: the base model (default: model.path of the checkpoint's recipe)");
  CLI::Option* dtype_opt = export_cmd->add_option("--dtype", dtype, "merged: dtype of the weights (default bf16)")
                               ->check(CLI::IsMember({"f32", "bf16", "f16"}));
  CLI::Option* shard_opt =
      export_cmd->add_option("--max-shard-size", max_shard_size, "merged: largest safetensors file (default 5GB)");

  GenerateOptions generate_options;
  CLI::App* generate_cmd = app.add_subcommand("generate", "continue a prompt with the base model and its adapters");
  add_generate_options(*generate_cmd, generate_options);

#ifdef SSMTUNE_WITH_TOKENIZER
  PrepareCommandOptions prepare_options;
  CLI::App* prepare_cmd = app.add_subcommand("prepare", "tokenize a JSONL file into HDF5 training (and validation) sets");
  add_prepare_options(*prepare_cmd, prepare_options);
#endif

  PlotOptions plot_options;
  CLI::App* plot_cmd = app.add_subcommand("plot", "draw <output_dir>/metrics.svg from the run's metrics.jsonl");
  add_plot_options(*plot_cmd, plot_options);

  InfoOptions info_options;
  CLI::App* info_cmd =
      app.add_subcommand("info", "parameters, memory per GPU and FLOPs per token of a recipe, before any GPU is used");
  add_info_options(*info_cmd, info_options);

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
#ifdef SSMTUNE_WITH_TOKENIZER
    if (*prepare_cmd) run_prepare(prepare_options);
#endif
    if (*init_cmd) {
      write_random_mamba(out, model_size(size), seed);
      fmt::print("wrote a random {} model to {}\n", size, out);
    } else if (*quantize_cmd) {
      write_quantized_model(model, out, parse_byte_size(max_shard_size, "--max-shard-size"));
      fmt::print("wrote the NF4-quantized model to {}\n", out);
    } else if (*export_cmd) {
      std::vector<std::string> merged_only;
      for (const CLI::Option* option : {model_opt, dtype_opt, shard_opt})
        if (option->count() > 0) merged_only.push_back(option->get_name());
      const MergedExportOptions merged{model, merged_dtype(dtype), parse_byte_size(max_shard_size, "--max-shard-size")};
      export_checkpoint(checkpoint, format, out, merged, merged_only);
    } else if (*generate_cmd) {
      run_generate(generate_options);
    } else if (*plot_cmd) {
      run_plot(plot_options);
    } else if (*info_cmd) {
      run_info(info_options);
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
