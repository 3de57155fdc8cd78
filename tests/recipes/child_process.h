// A command (the ssmtune program, or mpirun starting it) run as a child process in a process group of
// its own, its stdout and stderr in a log file, for tests that signal, kill and restart training the
// way a user or a scheduler does. Killed with its children and its group when the test is done with it.
#pragma once
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "tests/catch.h"

namespace ssmtune::test {

// The environment these tests start ssmtune and mpirun with: Open MPI may run as root (containers), and
// each process uses one OpenMP thread, so that jobs of several ranks share a small machine.
inline const std::vector<std::string> kMpiEnv{"OMPI_ALLOW_RUN_AS_ROOT=1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1",
                                              "OMP_NUM_THREADS=1"};

#ifdef SSMTUNE_MPIEXEC  // defined for the tests that start mpirun
// mpirun with `args` (-np N program ...): more ranks than cores allowed, none bound to a core.
inline std::vector<std::string> mpirun_argv(const std::vector<std::string>& args) {
  std::vector<std::string> argv{SSMTUNE_MPIEXEC, "--oversubscribe", "--bind-to", "none"};
  argv.insert(argv.end(), args.begin(), args.end());
  return argv;
}
#endif

class ChildProcess {
 public:
  using Clock = std::chrono::steady_clock;

  // Starts argv[0] (a path) with argv, environment variables `env` ("NAME=value") added.
  ChildProcess(const std::filesystem::path& log, const std::vector<std::string>& argv,
               const std::vector<std::string>& env = {})
      : log_(log) {
    pid_ = fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      setpgid(0, 0);
      for (const std::string& variable : env) putenv(const_cast<char*>(variable.c_str()));
      if (!freopen(log.c_str(), "w", stdout) || dup2(fileno(stdout), STDERR_FILENO) < 0) _exit(126);
      std::vector<char*> c_args;
      for (const std::string& a : argv) c_args.push_back(const_cast<char*>(a.c_str()));
      c_args.push_back(nullptr);
      execv(c_args[0], c_args.data());
      _exit(127);
    }
    setpgid(pid_, pid_);
  }
  ~ChildProcess() {
    if (!exited_) {
      // Its children first: mpirun may have put the ranks in process groups of their own.
      for (const pid_t child : children()) kill(child, SIGKILL);
      kill(-pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;

  pid_t pid() const { return pid_; }
  bool exited() const { return exited_; }
  int exit_code() const { return exit_code_; }  // 128 + signal when a signal ended it

  std::string output() const {
    std::ifstream in(log_);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
  }
  // Waits up to `seconds` for the process to exit; whether it did.
  bool ended(double seconds) {
    const auto deadline = Clock::now() + std::chrono::duration<double>(seconds);
    do {
      if (poll()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    } while (Clock::now() < deadline);
    return false;
  }
  // Whether the process has exited, without waiting.
  bool poll() {
    if (exited_) return true;
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) != pid_) return false;
    exited_ = true;
    exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    return true;
  }
  // Waits until the output contains `text`; false after `seconds` or when the process ended first.
  bool wait_for_output(const std::string& text, double seconds) {
    const auto deadline = Clock::now() + std::chrono::duration<double>(seconds);
    while (Clock::now() < deadline) {
      if (output().find(text) != std::string::npos) return true;
      if (poll()) return output().find(text) != std::string::npos;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  }
  // Sends `signal` to the process alone (not its group).
  void signal(int signal) const { REQUIRE(kill(pid_, signal) == 0); }

  // The child of this process (mpirun) whose environment holds `variable` ("NAME=value"), or -1.
  pid_t child_with(const std::string& variable) const {
    for (const pid_t child : children()) {
      std::ifstream environ("/proc/" + std::to_string(child) + "/environ");
      std::string found;
      while (std::getline(environ, found, '\0'))
        if (found == variable) return child;
    }
    return -1;
  }

 private:
  // The processes whose parent is this one.
  std::vector<pid_t> children() const {
    std::vector<pid_t> found;
    for (const std::filesystem::directory_entry& entry : std::filesystem::directory_iterator("/proc")) {
      const std::string name = entry.path().filename().string();
      if (name.find_first_not_of("0123456789") != std::string::npos) continue;
      std::ifstream stat(entry.path() / "stat");
      std::string line;
      if (!std::getline(stat, line) || line.rfind(')') == std::string::npos) continue;
      std::istringstream after(line.substr(line.rfind(')') + 1));
      std::string state;
      pid_t parent = 0;
      after >> state >> parent;
      if (parent == pid_) found.push_back(static_cast<pid_t>(std::stol(name)));
    }
    return found;
  }

  std::filesystem::path log_;
  pid_t pid_ = -1;
  bool exited_ = false;
  int exit_code_ = -1;
};

}  // namespace ssmtune::test
