#include "distributed/process_group.h"

#include <mpi.h>

#include <cstdlib>

namespace ssmtune {

ProcessGroup::ProcessGroup(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    MPI_Init(argc, argv);
    owns_mpi_ = true;
  }
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
}

ProcessGroup::~ProcessGroup() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (owns_mpi_ && !finalized) MPI_Finalize();
}

void ProcessGroup::all_reduce_sum(double* values, size_t count) const {
  if (size_ > 1) MPI_Allreduce(MPI_IN_PLACE, values, static_cast<int>(count), MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
}
void ProcessGroup::all_reduce_sum(float* values, size_t count) const {
  if (size_ > 1) MPI_Allreduce(MPI_IN_PLACE, values, static_cast<int>(count), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
}
void ProcessGroup::all_reduce_sum(int64_t* values, size_t count) const {
  if (size_ > 1) MPI_Allreduce(MPI_IN_PLACE, values, static_cast<int>(count), MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
}
void ProcessGroup::broadcast(void* bytes, size_t size, int root) const {
  if (size_ > 1) MPI_Bcast(bytes, static_cast<int>(size), MPI_BYTE, root, MPI_COMM_WORLD);
}
void ProcessGroup::barrier() const {
  if (size_ > 1) MPI_Barrier(MPI_COMM_WORLD);
}
void ProcessGroup::abort(int exit_code) const {
  if (size_ > 1) MPI_Abort(MPI_COMM_WORLD, exit_code);
  std::exit(exit_code);
}

}  // namespace ssmtune
