// Training runs of the data-parallel tests: the job of every rank against rank 0 alone with the same
// global batch, and the comparison of two runs' metrics and final checkpoints. Shared by the CPU
// (test_data_parallel.cpp) and the NCCL (test_data_parallel_cuda.cpp) programs.
#pragma once
#include <nlohmann/json.hpp>

#include <cmath>

#include "data/demo_dataset.h"
#include "framework/checkpoint.h"
#include "framework/cpu_backend.h"
#include "framework/lora.h"
#include "framework/mamba_model.h"
#include "framework/model_sizes.h"
#include "framework/recipe_config.h"
#include "framework/trainer.h"
#include "tests/distributed/mpi_job.h"
#include "tests/framework/demo_training.h"

namespace ssmtune::test {

namespace fs = std::filesystem;

inline constexpr int kAccum = 2;  // micro-batches per rank and step of a job of every rank

// The demo model with four layers (so several gradient buckets) and the demo data, shared by the ranks.
struct TrainingRuns {
  SharedScratchDir dir{"data-parallel"};
  std::string device;
  // The tolerance of compare_runs for adapters and AdamW moments, when it must differ from that of the
  // losses and norms (bf16 activations on GPUs: see test_data_parallel_cuda.cpp); 0: the same.
  double state_tolerance = 0;
  MambaConfig model = [] {
    MambaConfig c = model_size("demo");
    c.n_layer = 4;
    return c;
  }();

  explicit TrainingRuns(std::string device_name, int64_t layers = 4) : device(std::move(device_name)) {
    model.n_layer = layers;
    if (world().is_root()) {
      write_random_mamba(dir / "model", model, 3);
      write_token_dataset((dir / "data.h5").string(), make_demo_dataset(5, 300));
    }
    world_barrier();
  }
  // A recipe of `steps` steps on `ranks` ranks, all with the same global batch of 2 * kAccum * (world
  // size) sequences: each rank's share is grad_accum micro-batches of 2.
  RecipeConfig recipe(const std::string& output, int ranks, const std::string& strategy, int steps,
                      const std::vector<std::string>& extra = {}) const {
    std::vector<std::string> overrides{
        "device=" + device, "data.seq_len=24", "train.batch_size=2",
        "train.grad_accum=" + std::to_string(kAccum * world().size() / ranks), "train.max_steps=" + std::to_string(steps),
        "train.log_every=1", "train.warmup_steps=0", "lora.dropout=0.1", "train.max_grad_norm=0.05",
        "distributed.strategy=" + strategy,
        "distributed.bucket_mb=0.02",  // about one layer per bucket
        "distributed.timeout_s=60"};
    overrides.insert(overrides.end(), extra.begin(), extra.end());
    return demo_recipe(dir.path(), output, overrides);
  }
  // Training by every rank together; this rank's summary.
  TrainingSummary train_together(const RecipeConfig& recipe) const {
    TrainingSummary summary;
    without_leaving([&] { summary = run_training(recipe, world()); });
    world_barrier();
    return summary;
  }
  // Training by rank 0 alone, the others waiting; rank 0's summary (the others get an empty one).
  TrainingSummary train_alone(const RecipeConfig& recipe) const {
    TrainingSummary summary;
    if (world().is_root())
      without_leaving([&] {
        ProcessGroup alone(nullptr, nullptr, ProcessGroup::Ranks::this_process);
        summary = run_training(recipe, alone);
      });
    world_barrier();
    return summary;
  }
  // Rank 0 copies checkpoint step_<step> of run `from` into the output directory of run `to`.
  void copy_checkpoint(const std::string& from, const std::string& to, int step) const {
    if (world().is_root()) {
      const std::string name = "checkpoints/step_" + std::to_string(step);
      fs::create_directories(dir / to / "checkpoints");
      fs::copy(dir / from / name, dir / to / name, fs::copy_options::recursive);
    }
    world_barrier();
  }
};

// The lines of training steps (those with a loss), without the validation lines.
inline std::vector<nlohmann::json> read_step_metrics(const fs::path& path) {
  std::vector<nlohmann::json> lines;
  for (nlohmann::json& line : read_metrics(path))
    if (line.contains("loss")) lines.push_back(std::move(line));
  return lines;
}

inline double relative_difference(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double diff = 0, norm = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(b[i])) return INFINITY;
    diff += (a[i] - b[i]) * (a[i] - b[i]);
    norm += b[i] * b[i];
  }
  return std::sqrt(diff / norm);
}

// The whole training state of a checkpoint, read back through load_checkpoint by one process.
struct Snapshot {
  std::vector<double> params, m, v;
};
inline Snapshot snapshot(const TrainingRuns& runs, const fs::path& checkpoint) {
  const std::unique_ptr<Backend> backend = make_cpu_backend();
  LoraAdapters adapters(*backend, runs.model, runs.recipe("unused", 1, "ddp", 1).lora);
  load_checkpoint(checkpoint, adapters);
  return {adapters.download(adapters.params()), adapters.download(adapters.adam_m()),
          adapters.download(adapters.adam_v())};
}

// Rank 0 compares run a's step metrics from line `skip_a` on with run b's, and their checkpoints of `step`:
// the same steps skipped as non-finite, losses, gradient norms, adapters and both moments within
// `tolerance`, relative.
inline void compare_runs(const TrainingRuns& runs, const std::string& a, const std::string& b, int step,
                         double tolerance, size_t skip_a = 0) {
  if (!world().is_root()) return;
  const std::vector<nlohmann::json> ma = read_step_metrics(runs.dir / a / "metrics.jsonl");
  const std::vector<nlohmann::json> mb = read_step_metrics(runs.dir / b / "metrics.jsonl");
  REQUIRE(ma.size() == mb.size() + skip_a);
  for (size_t i = 0; i < mb.size(); ++i) {
    const nlohmann::json& la = ma[i + skip_a];
    const nlohmann::json& lb = mb[i];
    INFO(a << " vs " << b << ", step " << lb["step"] << ": loss " << la["loss"] << " vs " << lb["loss"]
           << ", grad_norm " << la["grad_norm"] << " vs " << lb["grad_norm"]);
    CHECK(la["step"] == lb["step"]);
    CHECK(la["target_tokens"] == lb["target_tokens"]);
    CHECK(la.contains("skipped") == lb.contains("skipped"));
    if (lb.contains("skipped")) continue;  // a non-finite step: its loss and norm are null in JSON
    CHECK(std::abs(la["loss"].get<double>() - lb["loss"].get<double>()) <= tolerance * std::abs(lb["loss"].get<double>()));
    CHECK(std::abs(la["grad_norm"].get<double>() - lb["grad_norm"].get<double>()) <=
          tolerance * std::abs(lb["grad_norm"].get<double>()));
  }
  const std::string last = "checkpoints/step_" + std::to_string(step);
  const Snapshot sa = snapshot(runs, runs.dir / a / last), sb = snapshot(runs, runs.dir / b / last);
  const double params = relative_difference(sa.params, sb.params), m = relative_difference(sa.m, sb.m),
               v = relative_difference(sa.v, sb.v);
  INFO(a << " vs " << b << ": relative differences: adapters " << params << ", adam_m " << m << ", adam_v " << v);
  const double state = runs.state_tolerance > 0 ? runs.state_tolerance : tolerance;
  CHECK(params <= state);
  CHECK(m <= state);
  CHECK(v <= state);
}

// Training moved the adapters of run `name` (checkpoint of `step`) from their initial values by far more
// than `tolerance`, so that comparisons within it have something to see.
inline void check_adapters_moved(const TrainingRuns& runs, const std::string& name, int step, double tolerance) {
  if (!world().is_root()) return;
  const RecipeConfig recipe = runs.recipe(name, 1, "ddp", step);
  const std::unique_ptr<Backend> backend = make_cpu_backend();
  LoraAdapters initial(*backend, runs.model, recipe.lora);
  initial.initialize(recipe.seed);
  const double moved = relative_difference(
      snapshot(runs, runs.dir / name / ("checkpoints/step_" + std::to_string(step))).params,
      initial.download(initial.params()));
  INFO(name << ": the adapters moved by " << moved << " relative");
  CHECK(moved > 20 * tolerance);
}


// Rank 0 alone, then every rank with each strategy, four steps of the same global batch: the same
// losses, norms, adapters and moments within `tolerance`, and only the shards written (one file per rank
// with ZeRO, one whole state with ddp).
inline void check_each_strategy_trains_as_one_process(const TrainingRuns& runs, double tolerance) {
  const int ranks = world().size();
  runs.train_alone(runs.recipe("alone", 1, "ddp", 4));
  for (const std::string strategy : {"ddp", "zero1", "zero2"}) {
    runs.train_together(runs.recipe(strategy, ranks, strategy, 4));
    compare_runs(runs, strategy, "alone", 4, tolerance);
    check_adapters_moved(runs, strategy, 4, tolerance);
    if (world().is_root()) {
      const fs::path last = runs.dir / strategy / "checkpoints/step_4";
      const bool sharded = strategy != "ddp";
      CHECK(fs::exists(last / optimizer_file_name({0, sharded ? ranks : 1})));
      CHECK(fs::exists(last / optimizer_file_name({ranks - 1, ranks})) == sharded);
      CHECK(fs::exists(last / kOptimizerFile) == !sharded);
    }
  }
}

// A zero2 checkpoint of every rank resumed by rank 0 alone, and rank 0's resumed by every rank with
// zero1: each continues as the run it came from within `tolerance`.
inline void check_resume_on_other_ranks(const TrainingRuns& runs, double tolerance) {
  const int ranks = world().size();
  runs.train_together(runs.recipe("job", ranks, "zero2", 6, {"train.save_every=3"}));
  runs.train_alone(runs.recipe("alone", 1, "ddp", 6, {"train.save_every=3"}));
  runs.copy_checkpoint("job", "alone-from-job", 3);
  runs.copy_checkpoint("alone", "job-from-alone", 3);
  const std::vector<std::string> resume{"train.save_every=3", "train.resume=true"};
  runs.train_alone(runs.recipe("alone-from-job", 1, "ddp", 6, resume));
  runs.train_together(runs.recipe("job-from-alone", ranks, "zero1", 6, resume));
  compare_runs(runs, "alone", "alone-from-job", 6, tolerance, 3);
  compare_runs(runs, "job", "job-from-alone", 6, tolerance, 3);
}

}  // namespace ssmtune::test
