// Whole jobs of the ssmtune command under mpirun, started as a user starts them, going wrong on
// purpose: one of three ranks killed mid-step, one stopped mid-step (a hang that mpirun itself cannot
// see), and ranks started with different recipes. The other ranks must exit non-zero within the
// recipe's timeout, naming the rank at fault, instead of waiting forever.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>
#include <thread>

#include "data/demo_dataset.h"
#include "framework/atomic_file.h"
#include "framework/mamba_model.h"
#include "framework/model_sizes.h"
#include "tests/catch.h"
#include "tests/framework/scratch_dir.h"

using namespace ssmtune;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

constexpr double kTimeout = 4;  // distributed.timeout_s of these jobs

// mpirun started in a process group of its own, its output in a file; killed with its group when the
// test is done with it.
class MpiJob {
 public:
  MpiJob(const fs::path& log, const std::vector<std::string>& args) : log_(log) {
    std::vector<std::string> argv{SSMTUNE_MPIEXEC, "--oversubscribe", "--bind-to", "none"};
    argv.insert(argv.end(), args.begin(), args.end());
    pid_ = fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      setpgid(0, 0);
      setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
      setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
      setenv("OMP_NUM_THREADS", "1", 1);
      if (!freopen(log.c_str(), "w", stdout) || dup2(fileno(stdout), STDERR_FILENO) < 0) _exit(126);
      std::vector<char*> c_args;
      for (const std::string& a : argv) c_args.push_back(const_cast<char*>(a.c_str()));
      c_args.push_back(nullptr);
      execv(c_args[0], c_args.data());
      _exit(127);
    }
    setpgid(pid_, pid_);
  }
  ~MpiJob() {
    if (!exited_) {
      // The ranks first: mpirun may have put them in process groups of their own.
      for (int rank = 0; rank < 8; ++rank)
        if (const pid_t pid = rank_pid(rank); pid > 0) kill(pid, SIGKILL);
      kill(-pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }

  std::string output() const {
    std::ifstream in(log_);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }
  // Waits until the output contains `text`; false after `seconds` or when the job ended first.
  bool wait_for_output(const std::string& text, double seconds) {
    const auto deadline = Clock::now() + std::chrono::duration<double>(seconds);
    while (Clock::now() < deadline) {
      if (output().find(text) != std::string::npos) return true;
      if (ended(0)) return output().find(text) != std::string::npos;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }
  // Waits up to `seconds` for mpirun to exit; its exit code then (128 + signal when killed).
  bool ended(double seconds) {
    const auto deadline = Clock::now() + std::chrono::duration<double>(seconds);
    do {
      int status = 0;
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        exited_ = true;
        exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        return true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    } while (Clock::now() < deadline);
    return false;
  }
  int exit_code() const { return exit_code_; }

  // The process of MPI rank `rank`: a child of mpirun whose environment says so.
  pid_t rank_pid(int rank) const {
    const std::string wanted = "OMPI_COMM_WORLD_RANK=" + std::to_string(rank);
    for (const fs::directory_entry& entry : fs::directory_iterator("/proc")) {
      const std::string name = entry.path().filename().string();
      if (name.find_first_not_of("0123456789") != std::string::npos) continue;
      std::ifstream stat(entry.path() / "stat");
      std::string line;
      if (!std::getline(stat, line) || line.rfind(')') == std::string::npos) continue;
      std::istringstream after(line.substr(line.rfind(')') + 1));
      std::string state;
      pid_t parent = 0;
      after >> state >> parent;
      if (parent != pid_) continue;
      std::ifstream environ(entry.path() / "environ");
      std::string variable;
      while (std::getline(environ, variable, '\0'))
        if (variable == wanted) return static_cast<pid_t>(std::stol(name));
    }
    return -1;
  }

 private:
  fs::path log_;
  pid_t pid_ = -1;
  bool exited_ = false;
  int exit_code_ = -1;
};

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
  std::vector<std::string> train(int ranks) const {
    return {"-np", std::to_string(ranks), std::string(SSMTUNE_BINARY_DIR) + "/recipes/ssmtune", "train", "--config",
            (dir / "recipe.yaml").string()};
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
double seconds_to_stop_after(int signal, MpiJob& job, const Setup& setup) {
  REQUIRE(wait_for_logged_step(setup.dir / "out/metrics.jsonl", 3, 120));
  const pid_t rank1 = job.rank_pid(1);
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
  MpiJob job(setup.dir / "log.txt", setup.train(3));
  const double seconds = seconds_to_stop_after(SIGKILL, job, setup);
  INFO(job.output());
  CHECK(job.exit_code() != 0);
  CHECK(seconds < kTimeout * 1.25 + 30);
}

TEST_CASE("a rank that hangs mid-step makes the others stop within the timeout, naming it") {
  Setup setup;
  MpiJob job(setup.dir / "log.txt", setup.train(3));
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
  MpiJob job(setup.dir / "log.txt", args);
  const bool ended = job.ended(60);
  const std::string output = job.output();
  INFO(output);
  REQUIRE(ended);
  CHECK(job.exit_code() != 0);
  CHECK(output.find("rank 1 of 2 runs a different recipe (the resolved YAML after overrides) than rank 0") !=
        std::string::npos);
}
