// Collectives over host memory through MPI: the CPU backend's communicator and the scalars (token
// counts, losses, norms) of every job. Each call posts MPI's non-blocking collective and completes it
// under the Watchdog, so no call waits past the recipe's timeout.
#pragma once
#include <mpi.h>

#include "distributed/communicator.h"

namespace ssmtune {

class MpiCommunicator final : public Communicator {
 public:
  // Collective over the group (it duplicates the group's communicator).
  MpiCommunicator(const ProcessGroup& group, Watchdog& watchdog);
  ~MpiCommunicator() override;

  std::string name() const override { return "MPI"; }
  void all_reduce_sum(void* buffer, size_t count, Element element) override;
  void reduce_scatter_sum(void* buffer, std::span<const size_t> counts, Element element) override;
  void all_gather(void* buffer, std::span<const size_t> counts, Element element) override;
  void broadcast(void* buffer, size_t count, Element element, int root) override;
  void barrier() override;
  void wait() override {}  // every call has completed when it returns
  uint64_t collectives_issued() const override { return 0; }
  void order_compute_after(uint64_t) override {}

 private:
  void complete(MPI_Request request, std::string_view what);
  MPI_Comm comm_ = MPI_COMM_NULL;
  Watchdog& watchdog_;
};

}  // namespace ssmtune
