// Non-finite steps (framework/bad_steps.h): the optimizer leaves adapters and moments bit for bit as
// they were when a gradient or the loss is not finite; in training the data moves on, the step counts,
// metrics.jsonl and the checkpoints count the bad steps, and train.max_bad_steps in a row stop the job
// with a message saying why.
#include <nlohmann/json.hpp>

#include <limits>
#include <random>

#include "data/demo_dataset.h"
#include "distributed/mpi_communicator.h"
#include "framework/atomic_file.h"
#include "framework/bad_steps.h"
#include "framework/checkpoint.h"
#include "framework/cpu_backend.h"
#include "framework/optimizer.h"
#include "framework/recipe_config.h"
#include "framework/trainer.h"
#include "tests/catch.h"
#include "tests/framework/demo_training.h"
#include "tests/framework/error_message.h"
#include "tests/framework/poisoned_model.h"
#include "tests/framework/scratch_dir.h"

using namespace ssmtune;
using test::contains;
using test::error_message;
namespace fs = std::filesystem;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

}  // namespace

TEST_CASE("a NaN or inf gradient, or a non-finite loss, leaves adapters and moments bit for bit as they were") {
  const std::unique_ptr<Backend> backend = make_cpu_backend();
  const MambaConfig model = model_size("demo");
  LoraAdapters adapters(*backend, model, LoraConfig{});
  adapters.initialize(1);
  Watchdog watchdog(test::process_group(), 60);
  MpiCommunicator host(test::process_group(), watchdog);
  const std::unique_ptr<Communicator> comm = make_communicator(test::process_group(), watchdog, host, nullptr);
  OptimizerConfig config;
  config.max_grad_norm = 1.0;
  config.total_steps = 100;  // a learning rate that is not 0 at the steps below
  DataParallelOptimizer optimizer(*backend, adapters, *comm, host, config, DistributedConfig{});
  std::mt19937_64 random(7);
  std::normal_distribution<double> normal;
  const auto step_with = [&](int64_t step, double poison, bool loss_is_finite) {
    std::vector<double> grads(static_cast<size_t>(adapters.numel()));
    for (double& g : grads) g = normal(random);
    grads[grads.size() / 3] = poison;
    adapters.upload(adapters.grads(), grads);
    optimizer.start_step();
    for (int64_t layer = model.n_layer - 1; layer >= 0; --layer) optimizer.layer_backward_done(layer);
    return optimizer.update(step, loss_is_finite);
  };
  // Two real updates first, so that the moments hold something to keep.
  for (int64_t step = 0; step < 2; ++step) CHECK_FALSE(step_with(step, 0.5, true).skipped);
  const std::vector<double> params = adapters.download(adapters.params()), m = adapters.download(adapters.adam_m()),
                            v = adapters.download(adapters.adam_v());
  for (const double poison : {std::nan(""), kInf, -kInf}) {
    INFO("poison " << poison);
    const UpdateStats stats = step_with(2, poison, true);
    CHECK(stats.skipped);
    CHECK_FALSE(std::isfinite(stats.grad_norm));
  }
  const UpdateStats finite_grads = step_with(2, 0.5, false);  // the loss was not finite
  CHECK(finite_grads.skipped);
  CHECK(std::isfinite(finite_grads.grad_norm));
  // Compared as bools: Catch would print the vectors.
  const bool same_params = adapters.download(adapters.params()) == params;
  const bool same_m = adapters.download(adapters.adam_m()) == m, same_v = adapters.download(adapters.adam_v()) == v;
  CHECK(same_params);
  CHECK(same_m);
  CHECK(same_v);
  CHECK_FALSE(step_with(2, 0.5, true).skipped);
  const bool moved = adapters.download(adapters.params()) != params;
  CHECK(moved);
}

TEST_CASE("BadSteps counts in a row and in all, and stops at max_bad_steps in a row") {
  BadSteps bad(3, 1, 4);  // as resumed from a checkpoint that counted 1 in a row, 4 in all
  bad.record(true);
  CHECK(bad.in_a_row() == 2);
  CHECK(bad.total() == 5);
  bad.stop_if_diverged(10, std::nan(""), std::nan(""));
  bad.record(false);
  CHECK(bad.in_a_row() == 0);
  CHECK(bad.total() == 5);
  for (int i = 0; i < 3; ++i) bad.record(true);
  CHECK(contains(error_message([&] { bad.stop_if_diverged(14, std::nan(""), kInf); }),
                 "step 14: the loss or gradient norm was not finite in 3 steps in a row (this one: loss nan, "
                 "grad_norm inf), train.max_bad_steps = 3: training has diverged. The adapters are as after step 11"));
}

namespace {

struct PoisonedRun {
  test::ScratchDir dir{"bad-steps"};
  PoisonedRun() {
    test::write_poisoned_demo_model(dir / "clean", dir / "model");
    write_token_dataset((dir / "data.h5").string(), make_demo_dataset(0, 200));
  }
  RecipeConfig recipe(std::vector<std::string> overrides) const {
    overrides.insert(overrides.begin(), {"device=cpu", "data.seq_len=24", "train.batch_size=2", "train.grad_accum=2",
                                         "train.log_every=1", "train.warmup_steps=0"});
    return test::demo_recipe(dir.path(), "out", overrides);
  }
};

std::string file_of_step(const fs::path& out, int64_t step, const char* file) {
  return read_text_file(out / ("checkpoints/step_" + std::to_string(step)) / file);
}

}  // namespace

TEST_CASE("training skips exactly the steps with a NaN loss, counts them, and the data moves on") {
  PoisonedRun run;
  constexpr int64_t kSteps = 14, kPerStep = 4;
  const RecipeConfig recipe = run.recipe({"train.max_steps=" + std::to_string(kSteps), "train.save_every=1"});
  const std::vector<bool> bad = test::poisoned_steps(run.dir / "data.h5", 24, recipe.seed, kPerStep, kSteps);
  const int64_t bad_count = std::count(bad.begin(), bad.end(), true);
  INFO(bad_count << " of " << kSteps << " steps see the poisoned token");
  REQUIRE(bad_count >= 2);  // the data set and seed give both kinds, with bad steps not all in a row
  REQUIRE(bad_count <= kSteps - 4);
  run_training(recipe, test::process_group());

  const fs::path out = run.dir / "out";
  const std::vector<nlohmann::json> metrics = test::read_metrics(out / "metrics.jsonl");
  REQUIRE(metrics.size() == kSteps);
  const std::unique_ptr<Backend> backend = make_cpu_backend();
  LoraAdapters initial(*backend, model_size("demo"), recipe.lora);
  initial.initialize(recipe.seed);
  int64_t in_a_row = 0, total = 0;
  for (int64_t step = 1; step <= kSteps; ++step) {
    const bool skipped = bad[static_cast<size_t>(step - 1)];
    in_a_row = skipped ? in_a_row + 1 : 0;
    total += skipped ? 1 : 0;
    const nlohmann::json& line = metrics[static_cast<size_t>(step - 1)];
    INFO("step " << step << ": " << line.dump());
    CHECK(line["step"] == step);
    CHECK(line.contains("skipped") == skipped);
    CHECK(line["loss"].is_null() == skipped);  // NaN is null in JSON
    if (skipped) {
      CHECK(line["bad_steps_in_a_row"] == in_a_row);
      CHECK(line["bad_steps_total"] == total);
    }
    // The checkpoint after a skipped step holds the adapters and moments of the step before, bit for bit.
    if (step == 1) {
      LoraAdapters after(*backend, model_size("demo"), recipe.lora);
      load_checkpoint(out / "checkpoints/step_1", after);
      const bool same = after.download(after.params()) == initial.download(initial.params());
      CHECK(same == skipped);
    } else {
      for (const char* file : {kAdapterFile, kOptimizerFile})
        CHECK((file_of_step(out, step, file) == file_of_step(out, step - 1, file)) == skipped);
    }
    const nlohmann::json state = nlohmann::json::parse(file_of_step(out, step, kStateFile));
    CHECK(state["sampler"]["index"] == step * kPerStep);  // the data moved on
    CHECK(state["bad_steps"]["in_a_row"] == in_a_row);
    CHECK(state["bad_steps"]["total"] == total);
  }
}

TEST_CASE("train.max_bad_steps non-finite steps in a row stop training with a message") {
  PoisonedRun run;
  // Every sequence sees the poisoned token: a data set of it alone.
  TokenDatasetContents contents;
  contents.tokens.assign(400, test::kPoisonedToken);
  contents.doc_offsets = {0, 400};
  contents.vocab_size = 64;
  write_token_dataset((run.dir / "all-bad.h5").string(), contents);
  const RecipeConfig recipe =
      run.recipe({"train.max_steps=20", "train.max_bad_steps=3", "data.path=" + (run.dir / "all-bad.h5").string()});
  const std::string error = error_message([&] { run_training(recipe, test::process_group()); });
  CHECK(contains(error, "step 3: the loss or gradient norm was not finite in 3 steps in a row (this one: loss nan, "
                        "grad_norm nan), train.max_bad_steps = 3: training has diverged. The adapters are as after "
                        "step 0"));
  const std::vector<nlohmann::json> metrics = test::read_metrics(run.dir / "out/metrics.jsonl");
  REQUIRE(metrics.size() == 3);
  for (int i = 0; i < 3; ++i) {
    CHECK(metrics[static_cast<size_t>(i)]["skipped"] == true);
    CHECK(metrics[static_cast<size_t>(i)]["bad_steps_in_a_row"] == i + 1);
  }
}
