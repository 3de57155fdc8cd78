#include "distributed/process_group.h"

#include <cstdlib>

namespace ssmtune {

ProcessGroup::ProcessGroup(int* argc, char*** argv, Ranks ranks) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    MPI_Init(argc, argv);
    owns_mpi_ = true;
  }
  comm_ = ranks == Ranks::world ? MPI_COMM_WORLD : MPI_COMM_SELF;
  find_local_rank();
}

ProcessGroup::ProcessGroup(const ProcessGroup& parent, int color) : owns_comm_(true) {
  MPI_Comm_split(parent.comm_, color, parent.rank_, &comm_);
  find_local_rank();
}

void ProcessGroup::find_local_rank() {
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &size_);
  if (size_ > 1) {
    MPI_Comm host;
    MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &host);
    MPI_Comm_rank(host, &local_rank_);
    MPI_Comm_size(host, &local_size_);
    MPI_Comm_free(&host);
  }
}

ProcessGroup::~ProcessGroup() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (owns_comm_ && !finalized) MPI_Comm_free(&comm_);
  if (owns_mpi_ && !finalized) MPI_Finalize();
}

void ProcessGroup::abort(int exit_code) const {
  if (size_ > 1) MPI_Abort(comm_, exit_code);
  std::exit(exit_code);
}

}  // namespace ssmtune
