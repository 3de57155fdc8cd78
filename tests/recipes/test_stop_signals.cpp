// SIGTERM and SIGINT sent to `ssmtune train` (framework/stop_signals.h): the first saves a checkpoint
// at the next step boundary and exits 0; a second exits at once, non-zero, leaving the last complete
// checkpoint as it was; under mpirun a signal to one rank stops every rank after the same step.
#include <nlohmann/json.hpp>

#include <fstream>
#include <regex>

#include "data/demo_dataset.h"
#include "framework/atomic_file.h"
#include "framework/checkpoint.h"
#include "framework/checkpoint_manifest.h"
#include "framework/mamba_model.h"
#include "framework/model_sizes.h"
#include "tests/catch.h"
#include "tests/framework/scratch_dir.h"
#include "tests/recipes/child_process.h"

using namespace ssmtune;
namespace fs = std::filesystem;

namespace {

struct Setup {
  test::ScratchDir dir{"stop-signals"};
  Setup() {
    write_random_mamba(dir / "model", model_size("demo"), 0);
    write_token_dataset((dir / "data.h5").string(), make_demo_dataset(0, 300));
    std::ofstream(dir / "recipe.yaml") << "device: cpu\nmodel:\n  path: " << (dir / "model").string()
                                       << "\ndata:\n  path: " << (dir / "data.h5").string()
                                       << "\n  seq_len: 32\ntrain:\n  output_dir: " << (dir / "out").string()
                                       << "\n  max_steps: 1000000\n  batch_size: 2\n  log_every: 1\n"
                                       << "distributed:\n  strategy: zero2\n";
  }
  std::vector<std::string> train(const std::vector<std::string>& overrides = {}) const {
    std::vector<std::string> argv{std::string(SSMTUNE_BINARY_DIR) + "/recipes/ssmtune", "train", "--config",
                                  (dir / "recipe.yaml").string()};
    argv.insert(argv.end(), overrides.begin(), overrides.end());
    return argv;
  }
  std::vector<std::string> mpirun(int ranks) const {
    std::vector<std::string> args{"-np", std::to_string(ranks)};
    const std::vector<std::string> command = train();
    args.insert(args.end(), command.begin(), command.end());
    return test::mpirun_argv(args);
  }
  // Waits until metrics.jsonl has `lines` lines (each is flushed as its step ends).
  bool wait_for_steps(test::ChildProcess& run, size_t lines) const {
    for (int i = 0; i < 30000 && !run.poll(); ++i) {  // 300 s: the sanitized build's steps are slow
      std::ifstream in(dir / "out/metrics.jsonl");
      size_t n = 0;
      std::string line;
      while (std::getline(in, line)) ++n;
      if (n >= lines) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  }
};

// The step named by "stopped by signal <signal> (...) after step <N>", or -1.
int64_t stopped_after(const std::string& output, int signal) {
  std::smatch match;
  const std::regex line("stopped by signal " + std::to_string(signal) + R"( \([^)]*\) after step (\d+))");
  return std::regex_search(output, match, line) ? std::stoll(match[1].str()) : -1;
}

std::vector<std::string> checkpoint_entries(const fs::path& out) {
  std::vector<std::string> names;
  for (const fs::directory_entry& entry : fs::directory_iterator(out / "checkpoints"))
    names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace

TEST_CASE("SIGTERM saves a checkpoint at the next step boundary and exits 0, and resume continues from it") {
  Setup setup;
  int64_t step = -1;
  {
    test::ChildProcess run(setup.dir / "log.txt", setup.train(), test::kMpiEnv);
    REQUIRE(setup.wait_for_steps(run, 3));
    run.signal(SIGTERM);
    REQUIRE(run.ended(60));
    const std::string output = run.output();
    INFO(output);
    CHECK(run.exit_code() == 0);
    step = stopped_after(output, SIGTERM);
    REQUIRE(step >= 3);
  }
  const fs::path checkpoint = setup.dir / ("out/checkpoints/step_" + std::to_string(step));
  CHECK(checkpoint_entries(setup.dir / "out") == std::vector<std::string>{checkpoint.filename().string()});
  CheckpointManifest::read(checkpoint).verify_all();

  test::ChildProcess resumed(setup.dir / "log2.txt",
                             setup.train({"train.resume=true", "train.max_steps=" + std::to_string(step + 2)}),
                             test::kMpiEnv);
  REQUIRE(resumed.ended(60));
  INFO(resumed.output());
  CHECK(resumed.exit_code() == 0);
  CHECK(resumed.output().find("resuming from " + checkpoint.string()) != std::string::npos);
}

TEST_CASE("a second SIGINT exits at once, non-zero, and leaves the last complete checkpoint as it was") {
  Setup setup;
  // Steps long enough (about 0.1 s here) that both signals arrive within one.
  const std::vector<std::string> slow{"data.seq_len=512", "train.batch_size=8", "train.save_every=2"};
  test::ChildProcess run(setup.dir / "log.txt", setup.train(slow), test::kMpiEnv);
  REQUIRE(setup.wait_for_steps(run, 3));
  const std::vector<std::string> before = checkpoint_entries(setup.dir / "out");
  REQUIRE(before == std::vector<std::string>{"step_2"});
  const std::string adapter = read_text_file(setup.dir / "out/checkpoints/step_2" / kAdapterFile);
  run.signal(SIGINT);
  REQUIRE(run.wait_for_output("stop signal received", 30));
  run.signal(SIGINT);
  REQUIRE(run.ended(30));
  const std::string output = run.output();
  INFO(output);
  CHECK(run.exit_code() == 128 + SIGINT);
  CHECK(output.find("second stop signal: exiting now") != std::string::npos);
  CHECK(stopped_after(output, SIGINT) == -1);
  // step_2 untouched; at most the temporary directory of a save the second signal cut short.
  std::vector<std::string> after = checkpoint_entries(setup.dir / "out");
  std::erase_if(after, [](const std::string& name) { return name.starts_with(".step_"); });
  CHECK(after == before);
  CHECK(read_text_file(setup.dir / "out/checkpoints/step_2" / kAdapterFile) == adapter);
  CheckpointManifest::read(setup.dir / "out/checkpoints/step_2").verify_all();
}

TEST_CASE("under mpirun, SIGTERM to one rank stops every rank after the same step, with a checkpoint") {
  Setup setup;
  test::ChildProcess job(setup.dir / "log.txt", setup.mpirun(2), test::kMpiEnv);
  REQUIRE(setup.wait_for_steps(job, 3));
  const pid_t rank1 = job.child_with("OMPI_COMM_WORLD_RANK=1");
  REQUIRE(rank1 > 0);
  REQUIRE(kill(rank1, SIGTERM) == 0);
  REQUIRE(job.ended(60));
  const std::string output = job.output();
  INFO(output);
  CHECK(job.exit_code() == 0);
  const int64_t step = stopped_after(output, SIGTERM);
  REQUIRE(step >= 3);
  const fs::path checkpoint = setup.dir / ("out/checkpoints/step_" + std::to_string(step));
  CheckpointManifest::read(checkpoint).verify_all();
  CHECK(fs::exists(checkpoint / optimizer_file_name({0, 2})));
  CHECK(fs::exists(checkpoint / optimizer_file_name({1, 2})));
  const nlohmann::json state = nlohmann::json::parse(read_text_file(checkpoint / kStateFile));
  CHECK(state["world_size"] == 2);
  CHECK(state["step"] == step);
}
