#include "distributed/mpi_communicator.h"

#include <climits>
#include <cstring>
#include <vector>

#include "framework/error.h"

namespace ssmtune {
namespace {

MPI_Datatype mpi_type(Element element) {
  switch (element) {
    case Element::f32: return MPI_FLOAT;
    case Element::f64: return MPI_DOUBLE;
    case Element::i64: return MPI_INT64_T;
    case Element::u64: return MPI_UINT64_T;
    case Element::byte: return MPI_BYTE;
  }
  return MPI_DATATYPE_NULL;
}

int mpi_count(size_t count, std::string_view what) {
  if (count > static_cast<size_t>(INT_MAX))
    fail("{} of {} elements: MPI takes at most {} in one collective", what, count, INT_MAX);
  return static_cast<int>(count);
}

// Per-rank counts and offsets as MPI's v-collectives take them.
struct Pieces {
  std::vector<int> counts, offsets;
};
Pieces pieces(std::span<const size_t> counts, int ranks, std::string_view what) {
  if (static_cast<int>(counts.size()) != ranks)
    fail("internal: {} with {} counts for {} ranks", what, counts.size(), ranks);
  Pieces p;
  size_t offset = 0;
  for (size_t c : counts) {
    p.counts.push_back(mpi_count(c, what));
    p.offsets.push_back(mpi_count(offset, what));
    offset += c;
  }
  mpi_count(offset, what);
  return p;
}

}  // namespace

MpiCommunicator::MpiCommunicator(const ProcessGroup& group, Watchdog& watchdog)
    : Communicator(group.rank(), group.size()), watchdog_(watchdog) {
  MPI_Comm_dup(group.comm(), &comm_);
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Comm_free(&comm_);
}

void MpiCommunicator::complete(MPI_Request request, std::string_view what) {
  watchdog_.wait(what, [&request] {
    int done = 0;
    MPI_Test(&request, &done, MPI_STATUS_IGNORE);
    return done != 0;
  });
}

void MpiCommunicator::all_reduce_sum(void* buffer, size_t count, Element element) {
  if (size() == 1 || count == 0) return;
  if (element == Element::byte) fail("internal: MPI all_reduce_sum over bytes");
  MPI_Request request;
  MPI_Iallreduce(MPI_IN_PLACE, buffer, mpi_count(count, "MPI all_reduce"), mpi_type(element), MPI_SUM, comm_, &request);
  complete(request, "MPI all_reduce");
}

void MpiCommunicator::reduce_scatter_sum(void* buffer, std::span<const size_t> counts, Element element) {
  if (size() == 1) return;
  if (element == Element::byte) fail("internal: MPI reduce_scatter_sum over bytes");
  const Pieces p = pieces(counts, size(), "MPI reduce_scatter");
  MPI_Request request;
  MPI_Ireduce_scatter(MPI_IN_PLACE, buffer, p.counts.data(), mpi_type(element), MPI_SUM, comm_, &request);
  complete(request, "MPI reduce_scatter");
  // In place, MPI leaves this rank's piece at the start of the buffer.
  const size_t bytes = element_size(element);
  if (p.offsets[rank()] > 0 && p.counts[rank()] > 0)
    std::memmove(static_cast<std::byte*>(buffer) + p.offsets[rank()] * bytes, buffer, p.counts[rank()] * bytes);
}

void MpiCommunicator::all_gather(void* buffer, std::span<const size_t> counts, Element element) {
  if (size() == 1) return;
  const Pieces p = pieces(counts, size(), "MPI all_gather");
  MPI_Request request;
  MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buffer, p.counts.data(), p.offsets.data(), mpi_type(element),
                  comm_, &request);
  complete(request, "MPI all_gather");
}

void MpiCommunicator::broadcast(void* buffer, size_t count, Element element, int root) {
  if (size() == 1 || count == 0) return;
  MPI_Request request;
  MPI_Ibcast(buffer, mpi_count(count, "MPI broadcast"), mpi_type(element), root, comm_, &request);
  complete(request, "MPI broadcast");
}

void MpiCommunicator::barrier() {
  if (size() == 1) return;
  MPI_Request request;
  MPI_Ibarrier(comm_, &request);
  complete(request, "MPI barrier");
}

}  // namespace ssmtune
