// Stopping a training job cleanly on SIGTERM or SIGINT (a scheduler's preemption, Ctrl-C): the first
// signal only sets a flag, which the trainer reads at the next step boundary, where it saves a
// checkpoint and exits 0; a second signal ends the process at once (exit status 128 + signal) without
// touching the last complete checkpoint: a save it interrupts leaves only a temporary directory, which
// the next resume removes. The handler does nothing but what is async-signal-safe: set the flag, or
// write(2) a line and _exit.
#pragma once
#include <signal.h>

#include "distributed/communicator.h"

namespace ssmtune {

class StopSignals {
 public:
  // Installs the handlers for SIGTERM and SIGINT, with the flag cleared; the destructor restores the
  // handlers there were before.
  StopSignals();
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

  // Collective over `ranks` at a step boundary: whether any rank has received a stop signal, so that
  // every rank stops after the same step. The signal of the lowest rank that received one, else 0.
  int agreed(Communicator& ranks) const;

 private:
  struct sigaction previous_term_ {};
  struct sigaction previous_int_ {};
};

}  // namespace ssmtune
