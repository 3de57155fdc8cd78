// Collectives over the buffers of a backend, with one interface for both kinds of memory:
//   MPI  (distributed/mpi_communicator.h)  host memory: the CPU backend, and scalars of any job;
//   NCCL (distributed/nccl_communicator.h) device memory of the CUDA backend, on a stream of its own.
// Every collective is in place and starts after the work already issued on the backend's stream; it
// may still run when the call returns (NCCL), and wait() blocks until all of them have completed.
// Call wait() before the host reads a result, before backend work touches a buffer in flight, and
// before blocking on the backend's stream: a dead rank then ends in the Watchdog's error rather than
// in a wait without end. Until then compute may go on (gradient buckets overlap the backward).
//
// Uneven splits are allowed: `counts` gives each rank's number of elements, in rank order, of a buffer
// holding them one after the other (distributed/sharding.h).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "distributed/process_group.h"
#include "distributed/watchdog.h"

namespace ssmtune {

enum class Element { f32, f64, i64, u64, byte };
size_t element_size(Element element);

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual std::string name() const = 0;
  int rank() const { return rank_; }
  int size() const { return size_; }

  // buffer[count] = the sum over ranks.
  virtual void all_reduce_sum(void* buffer, size_t count, Element element) = 0;
  // buffer holds sum(counts) elements; on completion this rank's piece (at offset counts[0] + ... +
  // counts[rank-1]) holds the sum over ranks of that piece; the rest of the buffer is undefined.
  virtual void reduce_scatter_sum(void* buffer, std::span<const size_t> counts, Element element) = 0;
  // buffer holds sum(counts) elements; each rank's piece, at its offset, goes to every rank.
  virtual void all_gather(void* buffer, std::span<const size_t> counts, Element element) = 0;
  virtual void broadcast(void* buffer, size_t count, Element element, int root) = 0;
  virtual void barrier() = 0;
  // Blocks until every collective issued so far has completed, within the Watchdog's timeout.
  virtual void wait() = 0;

  // Prefetching (framework/layer_weights.h): a buffer gathered ahead of its use, with compute going on
  // meanwhile. collectives_issued() numbers the collective issued last (a communicator's collectives
  // complete in the order issued; 0: none is outstanding); order_compute_after(n) makes the work issued on
  // the backend's stream from now on wait, on the device and without blocking the host, until collective
  // n has completed, while later collectives (gradient buckets) may still run. The host still calls
  // wait() before it blocks on the backend's stream. MPI's collectives have completed when they return,
  // so it has nothing to order.
  virtual uint64_t collectives_issued() const = 0;
  virtual void order_compute_after(uint64_t collective) = 0;

 protected:
  Communicator(int rank, int size) : rank_(rank), size_(size) {}

 private:
  int rank_, size_;
};

// The communicator for a backend: MPI when compute_stream is null (host memory), NCCL on the CUDA
// device current on this thread otherwise. One rank needs no messages and always gets MPI, whose
// collectives are then no-ops on any memory. host: an MPI communicator of the same group, through
// which rank 0 hands NCCL's unique id to the others. Collective over the group.
std::unique_ptr<Communicator> make_communicator(const ProcessGroup& group, Watchdog& watchdog, Communicator& host,
                                                void* compute_stream);

}  // namespace ssmtune
