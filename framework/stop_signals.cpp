#include "framework/stop_signals.h"

#include <unistd.h>

#include <csignal>
#include <cstdint>
#include <cstring>
#include <vector>

namespace ssmtune {
namespace {

// The signal received first: set by the handler, cleared when the handlers are installed;
// sig_atomic_t so that the write is indivisible.
volatile std::sig_atomic_t g_received = 0;

void write_line(const char* text) {
  // write(2) is async-signal-safe; a short or failed write of this message is of no consequence.
  [[maybe_unused]] const ssize_t ignored = ::write(STDERR_FILENO, text, std::strlen(text));
}

void on_stop_signal(int signal) {
  if (g_received != 0) {
    write_line("ssmtune: second stop signal: exiting now without a checkpoint; the last complete one is kept\n");
    ::_exit(128 + signal);
  }
  g_received = signal;
  write_line("ssmtune: stop signal received: saving a checkpoint after this step, then exiting "
             "(send it again to exit at once)\n");
}

}  // namespace

StopSignals::StopSignals() {
  g_received = 0;
  struct sigaction action {};
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;  // a signal during a read or write resumes it instead of failing it
  sigaction(SIGTERM, &action, &previous_term_);
  sigaction(SIGINT, &action, &previous_int_);
}

StopSignals::~StopSignals() {
  sigaction(SIGTERM, &previous_term_, nullptr);
  sigaction(SIGINT, &previous_int_, nullptr);
}

int StopSignals::agreed(Communicator& ranks) const {
  // Each rank's signal in its slot: every rank sees the same vector and picks the same one.
  const int64_t signal = g_received;
  std::vector<int64_t> by_rank(static_cast<size_t>(ranks.size()), 0);
  by_rank[static_cast<size_t>(ranks.rank())] = signal;
  ranks.all_reduce_sum(by_rank.data(), by_rank.size(), Element::i64);
  for (int64_t s : by_rank)
    if (s != 0) return static_cast<int>(s);
  return 0;
}

}  // namespace ssmtune
