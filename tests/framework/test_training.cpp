// The train recipe end to end on the CPU backend with the demo model and data: the loss falls,
// checkpoints are complete, a resumed run reproduces the uninterrupted one bit for bit, and the PEFT
// export has PEFT's names, shapes and config; the validation loss is forward_loss over fixed batches
// and leaves training as it was.
#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>

#include "data/demo_dataset.h"
#include "framework/atomic_file.h"
#include "framework/checkpoint.h"
#include "framework/cpu_backend.h"
#include "framework/error.h"
#include "framework/mamba_model.h"
#include "framework/peft_export.h"
#include "framework/recipe_config.h"
#include "framework/safetensors.h"
#include "framework/train_step.h"
#include "framework/trainer.h"
#include "framework/model_sizes.h"
#include "tests/catch.h"
#include "tests/framework/demo_training.h"
#include "tests/framework/error_message.h"
#include "tests/framework/scratch_dir.h"

using namespace ssmtune;
namespace fs = std::filesystem;
using test::process_group;
using test::read_metrics;

namespace {

struct TrainingRun : test::DemoRun {
  TrainingRun() : DemoRun("training", 600) {}
};

}  // namespace

TEST_CASE("the demo recipe trains: the loss falls and metrics.jsonl has every field") {
  TrainingRun run;
  const TrainingSummary s = run_training(
      run.recipe("out", {"train.max_steps=60", "train.log_every=1", "train.batch_size=4"}), process_group());
  // The untrained model scores about 6.2 nats; the task's floor is about 0.24 (data/README.md).
  CHECK(s.first_loss > 5.5);
  CHECK(s.last_loss < s.first_loss - 1.5);
  const std::vector<nlohmann::json> metrics = read_metrics(run.dir / "out/metrics.jsonl");
  REQUIRE(metrics.size() == 60);
  for (const char* key : {"step", "loss", "lr", "grad_norm", "tokens_per_s"}) CHECK(metrics.back().contains(key));
  CHECK(fs::exists(run.dir / "out/checkpoints/step_60" / kStateFile));
}

TEST_CASE("resuming from a checkpoint reproduces the uninterrupted run bit for bit") {
  TrainingRun run;
  const std::vector<std::string> common{"train.max_steps=12", "train.save_every=5", "train.log_every=1",
                                        "train.batch_size=2", "lora.dropout=0.1", "train.grad_accum=2"};
  run_training(run.recipe("full", common), process_group());

  // A run that died after step 5: only its first checkpoint (and a half-written one) survived.
  fs::create_directories(run.dir / "crashed/checkpoints");
  fs::copy(run.dir / "full/checkpoints/step_5", run.dir / "crashed/checkpoints/step_5", fs::copy_options::recursive);
  fs::create_directories(run.dir / "crashed/checkpoints/.step_10.tmp.1");
  std::vector<std::string> resume = common;
  resume.push_back("train.resume=true");
  run_training(run.recipe("crashed", resume), process_group());

  const std::vector<nlohmann::json> full = read_metrics(run.dir / "full/metrics.jsonl");
  const std::vector<nlohmann::json> resumed = read_metrics(run.dir / "crashed/metrics.jsonl");
  REQUIRE(resumed.size() == 7);
  for (size_t i = 0; i < resumed.size(); ++i) {
    CHECK(resumed[i]["step"] == full[i + 5]["step"]);
    CHECK(resumed[i]["loss"].get<double>() == full[i + 5]["loss"].get<double>());
    CHECK(resumed[i]["grad_norm"].get<double>() == full[i + 5]["grad_norm"].get<double>());
  }
  for (const char* file : {kAdapterFile, kOptimizerFile})
    CHECK(read_text_file(run.dir / "full/checkpoints/step_12" / file) ==
          read_text_file(run.dir / "crashed/checkpoints/step_12" / file));
}

TEST_CASE("a fresh run refuses an output directory that already holds checkpoints") {
  TrainingRun run;
  run_training(run.recipe("out", {"train.max_steps=1", "train.batch_size=1"}), process_group());
  try {
    run_training(run.recipe("out", {"train.max_steps=1", "train.batch_size=1"}), process_group());
    FAIL("expected an error");
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("train.resume=true") != std::string::npos);
  }
}

TEST_CASE("the PEFT export has PEFT's keys, shapes, dtype, metadata and config") {
  TrainingRun run;
  run_training(run.recipe("out", {"train.max_steps=2", "train.batch_size=1", "lora.rank=4", "lora.alpha=8",
                                  "lora.targets=[in_proj, dt_proj, out_proj]"}),
               process_group());
  const std::vector<std::string> warnings = export_peft_adapter(run.dir / "out/checkpoints/step_2", run.dir / "peft");
  // Targets in_proj, dt_proj and out_proj: transformers ignores a dt_proj adapter, PEFT refuses out_proj.
  REQUIRE(warnings.size() == 2);
  CHECK(warnings[0].find("dt_proj") != std::string::npos);
  CHECK(warnings[1].find("out_proj") != std::string::npos);

  const SafetensorsFile adapter = SafetensorsFile::open(run.dir / "peft/adapter_model.safetensors");
  const MambaConfig c = model_size("demo");
  CHECK(static_cast<int64_t>(adapter.names().size()) == 2 * 3 * c.n_layer);
  CHECK(adapter.metadata().at("format") == "pt");
  const TensorInfo& a = adapter.info("base_model.model.backbone.layers.1.mixer.in_proj.lora_A.weight");
  CHECK(a.dtype == DType::F32);
  CHECK(a.shape == std::vector<int64_t>{4, c.d_model});
  const TensorInfo& b = adapter.info("base_model.model.backbone.layers.0.mixer.dt_proj.lora_B.weight");
  CHECK(b.shape == std::vector<int64_t>{c.d_inner, 4});
  CHECK(!adapter.contains("base_model.model.backbone.layers.0.mixer.x_proj.lora_A.weight"));

  const nlohmann::json config = nlohmann::json::parse(read_text_file(run.dir / "peft/adapter_config.json"));
  CHECK(config["peft_type"] == "LORA");
  CHECK(config["task_type"] == "CAUSAL_LM");
  CHECK(config["r"] == 4);
  CHECK(config["lora_alpha"] == 8.0);
  CHECK(config["target_modules"] == nlohmann::json::array({"in_proj", "dt_proj", "out_proj"}));
  CHECK(config["base_model_name_or_path"] == (run.dir / "model").string());
  CHECK(config["bias"] == "none");
  CHECK(config["use_rslora"] == false);
}

TEST_CASE("the PEFT export refuses a checkpoint file that does not match the manifest, naming it") {
  TrainingRun run;
  run_training(run.recipe("out", {"train.max_steps=1", "train.batch_size=1"}), process_group());
  const fs::path checkpoint = run.dir / "out/checkpoints/step_1", adapter = checkpoint / kAdapterFile;
  const std::string intact = read_text_file(adapter);
  std::string corrupt = intact;
  corrupt[corrupt.size() - 5] ^= 0x01;  // one bit of the last tensor's values
  std::ofstream(adapter, std::ios::binary) << corrupt;
  const std::string message = test::error_message([&] { export_peft_adapter(checkpoint, run.dir / "peft"); });
  INFO(message);
  CHECK(message.find(adapter.string() + ": CRC-32") != std::string::npos);
  CHECK(!fs::exists(run.dir / "peft"));

  std::ofstream(adapter, std::ios::binary) << intact;
  export_peft_adapter(checkpoint, run.dir / "peft");
  CHECK(SafetensorsFile::open(run.dir / "peft" / kPeftWeightsFile).names() == SafetensorsFile::open(adapter).names());
}

namespace {

// The validation loss computed directly: the adapters of checkpoint step_<step>, forward_loss over the
// first `batches` micro-batches of the validation sampler (fixed seed 0), summed and divided by their
// unmasked target tokens.
double direct_validation_loss(const RecipeConfig& r, int64_t step, int64_t batches) {
  const std::unique_ptr<Backend> backend = make_cpu_backend(DType::F32);
  const MambaWeights weights = MambaWeights::load(r.model_path, *backend);
  LoraAdapters adapters(*backend, weights.config(), r.lora);
  load_checkpoint(r.output_dir / ("checkpoints/step_" + std::to_string(step)), adapters);
  TrainStep runner(*backend, weights, adapters, r.step);
  const TokenDataset val = TokenDataset::open(r.val_path.string());
  SequenceSampler sampler(val, r.step.seq_len, 0, r.packing);
  const int64_t B = r.step.batch, L = r.step.seq_len;
  std::vector<uint32_t> tokens(static_cast<size_t>(B * (L + 1)));
  std::vector<uint8_t> mask(static_cast<size_t>(B * L));
  std::vector<int32_t> doc_start(mask.size());
  double loss_sum = 0;
  int64_t target_tokens = 0;
  for (int64_t micro = 0; micro < batches; ++micro) {
    for (int64_t s = 0; s < B; ++s) sampler.next(&tokens[s * (L + 1)], &mask[s * L], &doc_start[s * L]);
    for (uint8_t m : mask) target_tokens += m;
    loss_sum += runner.forward_loss(tokens.data(), mask.data(), doc_start.data());
  }
  return loss_sum / static_cast<double>(target_tokens);
}

}  // namespace

TEST_CASE("the validation loss is forward_loss over fixed micro-batches and leaves training unchanged") {
  TrainingRun run;
  write_token_dataset((run.dir / "val.h5").string(), make_demo_dataset(1, 100));
  const std::vector<std::string> common{"device=cpu", "train.max_steps=5", "train.save_every=2",
                                        "train.log_every=1", "train.batch_size=2", "train.grad_accum=2",
                                        "lora.dropout=0.1", "data.val_path=" + (run.dir / "val.h5").string()};
  run_training(run.recipe("plain", common), process_group());
  std::vector<std::string> with_eval = common;
  with_eval.insert(with_eval.end(), {"eval.every=2", "eval.batches=3"});
  const RecipeConfig evaluated = run.recipe("evaluated", with_eval);
  run_training(evaluated, process_group());

  // Training is the same bit for bit: evaluation runs no dropout and touches no gradient or state.
  const std::vector<nlohmann::json> plain = read_metrics(run.dir / "plain/metrics.jsonl");
  std::vector<nlohmann::json> train_lines, val_lines;
  for (const nlohmann::json& line : read_metrics(run.dir / "evaluated/metrics.jsonl"))
    (line.contains("val_loss") ? val_lines : train_lines).push_back(line);
  REQUIRE(train_lines.size() == plain.size());
  for (size_t i = 0; i < plain.size(); ++i) {
    CHECK(train_lines[i]["loss"].get<double>() == plain[i]["loss"].get<double>());
    CHECK(train_lines[i]["grad_norm"].get<double>() == plain[i]["grad_norm"].get<double>());
  }
  for (const char* file : {kAdapterFile, kOptimizerFile})
    CHECK(read_text_file(run.dir / "plain/checkpoints/step_5" / file) ==
          read_text_file(run.dir / "evaluated/checkpoints/step_5" / file));

  // Every eval.every steps and at the end; the same operations in the same order on the same backend
  // as the direct computation, so the numbers are equal exactly.
  REQUIRE(val_lines.size() == 3);
  const int64_t steps[] = {2, 4, 5};
  for (size_t i = 0; i < 3; ++i) {
    CHECK(val_lines[i]["step"] == steps[i]);
    const double loss = val_lines[i]["val_loss"].get<double>();
    CHECK(val_lines[i]["val_perplexity"].get<double>() == std::exp(loss));
    CHECK(val_lines[i]["val_tokens"].get<int64_t>() > 0);
  }
  CHECK(val_lines[0]["val_loss"].get<double>() == direct_validation_loss(evaluated, 2, 3));
  CHECK(val_lines[2]["val_loss"].get<double>() == direct_validation_loss(evaluated, 5, 3));
  // Training moved the adapters between the evaluations, so the comparisons above see them.
  CHECK(val_lines[2]["val_loss"].get<double>() < val_lines[0]["val_loss"].get<double>());
}

TEST_CASE("evaluation keys: defaults and errors naming the key") {
  TrainingRun run;
  const RecipeConfig defaults = run.recipe("out", {});
  CHECK(defaults.eval_every == 0);
  CHECK(defaults.eval_batches == 8);
  auto error_of = [&](const std::vector<std::string>& overrides) {
    return test::error_message([&] { run_training(run.recipe("bad", overrides), process_group()); });
  };
  CHECK(test::contains(error_of({"eval.every=5"}), "'data.val_path'"));
  CHECK(test::contains(error_of({"eval.every=-1"}), "eval.every must be 0 (off)"));
  CHECK(test::contains(error_of({"eval.batches=0"}), "eval.batches must be positive"));
  CHECK(test::contains(error_of({"eval.every=x"}), "'eval.every' must be an integer"));
  // A validation set too small for eval.batches, found before any training step.
  write_token_dataset((run.dir / "small.h5").string(), make_demo_dataset(1, 3));
  const std::string small = error_of({"device=cpu", "eval.every=1", "eval.batches=100", "train.batch_size=2",
                                      "data.val_path=" + (run.dir / "small.h5").string()});
  CHECK(test::contains(small, "small.h5 (data.val_path)"));
  CHECK(test::contains(small, "lower eval.batches"));
  CHECK(!fs::exists(run.dir / "bad/metrics.jsonl"));
}
