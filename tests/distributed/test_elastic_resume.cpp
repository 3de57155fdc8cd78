// Elastic resume, through the command line as a user runs it: a checkpoint written by N ranks under
// mpirun is resumed by M ranks with another strategy (2->1, 1->2, 2->3), the optimizer state
// resharded and the data position split anew, and continues as an uninterrupted run on M ranks with the
// same global batch: the same losses, gradient norms, adapters and moments.
//
// Tolerance 1e-5 relative, as in test_data_parallel.cpp: runs on different numbers of ranks see the
// same sequences with the same dropout streams and differ only in the order in which fp32 gradients are
// summed (~1e-6 relative after a few steps), while a wrong data position, a shard read from the wrong
// range or lost moments move losses and adapters by 1e-2 or more.
#include "tests/distributed/training_runs.h"
#include "tests/framework/scratch_dir.h"
#include "tests/recipes/child_process.h"

using namespace ssmtune;
namespace fs = std::filesystem;

namespace {

constexpr double kTolerance = 1e-5;
constexpr int kGlobalBatch = 12;  // sequences per step: 2 per micro-batch, divisible among 1, 2 and 3 ranks

struct Elastic {
  test::ScratchDir dir{"elastic"};
  MambaConfig model = [] {
    MambaConfig c = model_size("demo");
    c.n_layer = 4;
    return c;
  }();
  Elastic() {
    write_random_mamba(dir / "model", model, 3);
    write_token_dataset((dir / "data.h5").string(), make_demo_dataset(5, 300));
    std::ofstream(dir / "recipe.yaml") << "device: cpu\nmodel:\n  path: " << (dir / "model").string()
                                       << "\ndata:\n  path: " << (dir / "data.h5").string()
                                       << "\n  seq_len: 24\nlora:\n  dropout: 0.1\ntrain:\n  batch_size: 2\n"
                                       << "  max_steps: 6\n  save_every: 3\n  log_every: 1\n  warmup_steps: 0\n"
                                       << "  max_grad_norm: 0.05\ndistributed:\n  bucket_mb: 0.02\n";
  }
  // `ranks` ranks train run `name` with `strategy`; the output of a successful run.
  std::string train(const std::string& name, int ranks, const std::string& strategy, bool resume = false) const {
    const std::vector<std::string> argv = test::mpirun_argv(
        {"-np", std::to_string(ranks), std::string(SSMTUNE_BINARY_DIR) + "/recipes/ssmtune", "train", "--config",
         (dir / "recipe.yaml").string(), "train.output_dir=" + (dir / name).string(),
         "train.grad_accum=" + std::to_string(kGlobalBatch / (2 * ranks)), "distributed.strategy=" + strategy,
         "train.resume=" + std::string(resume ? "true" : "false")});
    test::ChildProcess run(dir / (name + ".log"), argv, test::kMpiEnv);
    const bool ended = run.ended(300);
    INFO(run.output());
    REQUIRE(ended);
    REQUIRE(run.exit_code() == 0);
    return run.output();
  }
  // Run `to` starts from checkpoint step_3 of run `from`.
  void copy_checkpoint(const std::string& from, const std::string& to) const {
    fs::create_directories(dir / to / "checkpoints");
    fs::copy(dir / from / "checkpoints/step_3", dir / to / "checkpoints/step_3", fs::copy_options::recursive);
  }
  test::Snapshot snapshot(const std::string& run) const {
    const std::unique_ptr<Backend> backend = make_cpu_backend();
    LoraAdapters adapters(*backend, model, LoraConfig{});
    load_checkpoint(dir / run / "checkpoints/step_6", adapters);
    return {adapters.download(adapters.params()), adapters.download(adapters.adam_m()),
            adapters.download(adapters.adam_v())};
  }
  // Steps 4..6 of `resumed` against those of the uninterrupted `reference`, and their final state.
  void compare(const std::string& resumed, const std::string& reference) const {
    const std::vector<nlohmann::json> a = test::read_metrics(dir / resumed / "metrics.jsonl");
    const std::vector<nlohmann::json> b = test::read_metrics(dir / reference / "metrics.jsonl");
    REQUIRE(a.size() == 3);
    REQUIRE(b.size() == 6);
    for (size_t i = 0; i < 3; ++i) {
      const nlohmann::json &la = a[i], &lb = b[i + 3];
      INFO(resumed << " vs " << reference << ": " << la.dump() << " vs " << lb.dump());
      CHECK(la["step"] == lb["step"]);
      CHECK(la["target_tokens"] == lb["target_tokens"]);
      CHECK(std::abs(la["loss"].get<double>() - lb["loss"].get<double>()) <= kTolerance * lb["loss"].get<double>());
      CHECK(std::abs(la["grad_norm"].get<double>() - lb["grad_norm"].get<double>()) <=
            kTolerance * lb["grad_norm"].get<double>());
    }
    const test::Snapshot sa = snapshot(resumed), sb = snapshot(reference);
    const double params = test::relative_difference(sa.params, sb.params), m = test::relative_difference(sa.m, sb.m),
                 v = test::relative_difference(sa.v, sb.v);
    INFO(resumed << " vs " << reference << ": relative differences: adapters " << params << ", adam_m " << m
                 << ", adam_v " << v);
    CHECK(params <= kTolerance);
    CHECK(m <= kTolerance);
    CHECK(v <= kTolerance);
  }
};

}  // namespace

TEST_CASE("a checkpoint of N ranks resumes on M ranks as an uninterrupted run on M ranks (2->1, 1->2, 2->3)") {
  Elastic e;
  e.train("one", 1, "ddp");
  e.train("two", 2, "zero2");
  e.train("three", 3, "zero1");

  e.copy_checkpoint("two", "two-to-one");
  const std::string to_one = e.train("two-to-one", 1, "ddp", true);
  CHECK(to_one.find("note: written by 2 ranks with zero2, resumed by 1 with ddp") != std::string::npos);
  e.compare("two-to-one", "one");

  e.copy_checkpoint("one", "one-to-two");
  e.train("one-to-two", 2, "zero2", true);
  e.compare("one-to-two", "two");

  e.copy_checkpoint("two", "two-to-three");
  const std::string to_three = e.train("two-to-three", 3, "zero1", true);
  CHECK(to_three.find("note: written by 2 ranks with zero2, resumed by 3 with zero1") != std::string::npos);
  e.compare("two-to-three", "three");
}
