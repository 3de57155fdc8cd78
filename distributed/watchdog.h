// Bounded waiting. Every wait of a job for its collectives goes through one Watchdog, so a rank that
// died or hangs stops the others within the recipe's distributed.timeout_s instead of hanging them
// forever:
//  - the wait polls its operation (an MPI request, a CUDA event, NCCL's asynchronous error state) and
//    meanwhile answers the other ranks' "are you alive?" queries;
//  - past the timeout it sends that query to every other rank over point-to-point messages on a
//    communicator of its own, collects answers for a short grace period (a rank waiting in any
//    collective answers at once; a dead, hung or runaway one does not), runs the caller's abort action
//    (NCCL aborts its communicator) and throws an Error naming the ranks not heard from.
// The command line turns that Error into MPI_Abort, which ends every rank of the job.
#pragma once
#include <mpi.h>

#include <cstdint>
#include <functional>
#include <string_view>

#include "distributed/process_group.h"

namespace ssmtune {

class Watchdog {
 public:
  // Collective over the group (it duplicates the group's communicator).
  Watchdog(const ProcessGroup& group, double timeout_seconds);
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  double timeout_seconds() const { return timeout_; }
  int rank() const { return rank_; }
  int size() const { return size_; }

  // Polls `done` until it returns true. `what` names the operation in the error message; `on_timeout`
  // runs before the Error is thrown.
  void wait(std::string_view what, const std::function<bool()>& done,
            const std::function<void()>& on_timeout = nullptr);

 private:
  void answer_queries();
  [[noreturn]] void time_out(std::string_view what, const std::function<void()>& on_timeout);

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  double timeout_;
  int64_t waits_ = 0;     // waits begun by this rank: the same sequence on every rank of a healthy job
  int64_t in_wait_ = -1;  // the wait in progress (answers carry it), -1 between waits
  int64_t query_ = 0;     // the payload of this rank's queries, alive until the job ends
};

}  // namespace ssmtune
