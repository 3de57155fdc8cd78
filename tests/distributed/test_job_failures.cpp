// Whole jobs of the ssmtune command under mpirun, started as a user starts them, going wrong on
// purpose: one of three ranks killed mid-step, one stopped mid-step (a hang that mpirun itself cannot
// see), and ranks started with different recipes. The other ranks must exit non-zero within the
// recipe's timeout, naming the rank at fault, instead of waiting forever.
#include <signal.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <thread>

#include "data/demo_dataset.h"
#include "framework/atomic_file.h"
#include "framework/mamba_model.h"
#include "framework/model_sizes.h"
#include "tests/catch.h"
#include "tests/framework/scratch_dir.h"
#include "tests/recipes/child_process.h"

using namespace ssmtune;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

constexpr double kTimeout = 4;  // distributed.timeout_s of these jobs

struct Setup {
  test::ScratchDir dir{"job-failures"};
  Setup() {
    write_random_mamba(dir / "model", model_size("demo"), 0);
    write_token_dataset((dir / "data.h5").string(), make_demo_dataset(0, 100));
    std::ofstream(dir / "recipe.yaml") << "device: cpu\nmodel:\n  path: " << (dir / "model").string()
                                       << "\ndata:\n  path: " << (dir / "data.h5").string()
                                       << "\n  seq_len: 32\ntrain:\n  output_dir: " << (dir / "out").string()
                                       << "\n  max_steps: 1000000\n  batch_size: 2\n  log_every: 1\n"
                                       << "distributed:\n  timeout_s: " << kTimeout << "\n";
  }
  // mpirun's arguments for `ranks` ranks of `ssmtune train`.
  std::vector<std::string> train(int ranks) const {
    return {"-np", std::to_string(ranks), std::string(SSMTUNE_BINARY_DIR) + "/recipes/ssmtune", "train", "--config",
            (dir / "recipe.yaml").string()};
  }
  // A job of mpirun with `args`, its output in log.txt.
  test::ChildProcess start(const std::vector<std::string>& args) const {
    return test::ChildProcess(dir / "log.txt", test::mpirun_argv(args), test::kMpiEnv);
  }
};

// Whether rank 0 has logged step `step` in metrics.jsonl within `seconds` (the progress line on the
// terminal is redrawn at most ten times a second, so the file, not the output, says which steps ran).
bool wait_for_logged_step(const std::filesystem::path& metrics, int step, double seconds) {
  const std::string line_of_step = "\"step\":" + std::to_string(step);
  const Clock::time_point start = Clock::now();
  while (std::chrono::duration<double>(Clock::now() - start).count() < seconds) {
    std::ifstream in(metrics);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    for (const char after : {',', '}'})
      if (text.find(line_of_step + after) != std::string::npos) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return false;
}

// Starts three ranks, lets them train a few steps, then sends `signal` to rank 1; returns the seconds
// until mpirun exited.
double seconds_to_stop_after(int signal, test::ChildProcess& job, const Setup& setup) {
  REQUIRE(wait_for_logged_step(setup.dir / "out/metrics.jsonl", 3, 120));
  const pid_t rank1 = job.child_with("OMPI_COMM_WORLD_RANK=1");
  REQUIRE(rank1 > 0);
  const Clock::time_point sent = Clock::now();
  REQUIRE(kill(rank1, signal) == 0);
  // Bound: the timeout, the Watchdog's grace period for answers (a quarter of it), and slack for a busy
  // machine; a job that hangs never gets there.
  const bool ended = job.ended(kTimeout * 1.25 + 30);
  INFO(job.output());
  REQUIRE(ended);
  return std::chrono::duration<double>(Clock::now() - sent).count();
}

}  // namespace

TEST_CASE("a rank killed mid-step ends the job with an error in bounded time") {
  Setup setup;
  test::ChildProcess job = setup.start(setup.train(3));
  const double seconds = seconds_to_stop_after(SIGKILL, job, setup);
  INFO(job.output());
  CHECK(job.exit_code() != 0);
  CHECK(seconds < kTimeout * 1.25 + 30);
}

TEST_CASE("a rank that hangs mid-step makes the others stop within the timeout, naming it") {
  Setup setup;
  test::ChildProcess job = setup.start(setup.train(3));
  const double seconds = seconds_to_stop_after(SIGSTOP, job, setup);
  const std::string output = job.output();
  INFO(output);
  CHECK(job.exit_code() != 0);
  CHECK(seconds >= kTimeout * 0.5);  // stopped by the watchdog, not by anything faster
  CHECK(output.find("within distributed.timeout_s = 4 s: no answer from rank 1 ") != std::string::npos);
}

TEST_CASE("ranks started with different recipes stop at once with an error naming them") {
  Setup setup;
  std::vector<std::string> args = setup.train(1);
  std::vector<std::string> other = setup.train(1);
  other.push_back("train.lr=0.002");
  args.push_back(":");
  args.insert(args.end(), other.begin(), other.end());
  test::ChildProcess job = setup.start(args);
  const bool ended = job.ended(60);
  const std::string output = job.output();
  INFO(output);
  REQUIRE(ended);
  CHECK(job.exit_code() != 0);
  CHECK(output.find("rank 1 of 2 runs a different recipe (the resolved YAML after overrides) than rank 0") !=
        std::string::npos);
}
