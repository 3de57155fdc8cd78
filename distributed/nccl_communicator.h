// NCCL for the CUDA backend's device buffers. The communicator runs on a stream of its own (the
// device's highest priority, so that its kernels are scheduled while compute is running); each
// collective waits for an event recorded on the backend's stream, so it sees every op issued before
// it, and records an event that wait() polls under the Watchdog together with NCCL's asynchronous
// error state (the last 16 collectives' events are kept, for order_compute_after). The communicator is
// non-blocking (ncclConfig_t::blocking = 0): no NCCL call can hang the host, and on a timeout or an
// asynchronous error it is aborted (ncclCommAbort) before the Error.
// Uneven reduce-scatters and all-gathers, which NCCL lacks, are grouped ncclReduce / ncclBroadcast
// calls, one per rank's piece.
#pragma once
#include <memory>

#include "distributed/communicator.h"

namespace ssmtune {

// The CUDA device current on this thread is the rank's GPU; compute_stream is the backend's
// cudaStream_t. Rank 0 creates NCCL's unique id and broadcasts it through `host`.
std::unique_ptr<Communicator> make_nccl_communicator(const ProcessGroup& group, Watchdog& watchdog,
                                                     Communicator& host, void* compute_stream);

}  // namespace ssmtune
