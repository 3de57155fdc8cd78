// The ranks of one training job. Started under mpirun it is MPI's world; started alone it is a group
// of one, so every command also runs as a plain process. Each rank also knows its place on its host
// (local rank), which chooses its GPU. Collectives live in the communicators (distributed/
// communicator.h), which wait for the other ranks only as long as the recipe allows.
#pragma once
#include <mpi.h>

namespace ssmtune {

class ProcessGroup {
 public:
  enum class Ranks {
    world,         // every process mpirun started (or this one alone)
    this_process,  // this process alone, e.g. a single-process reference run beside a multi-rank one
  };
  // Initialises MPI if nobody has yet.
  ProcessGroup(int* argc, char*** argv, Ranks ranks = Ranks::world);
  // The ranks of parent that pass the same color, in parent's rank order (e.g. the ranks that share one
  // sequence under context parallelism). Collective over parent.
  ProcessGroup(const ProcessGroup& parent, int color);
  ~ProcessGroup();
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  bool is_root() const { return rank_ == 0; }
  // The rank among the ranks on this host (MPI_COMM_TYPE_SHARED), and how many there are.
  int local_rank() const { return local_rank_; }
  int local_size() const { return local_size_; }
  MPI_Comm comm() const { return comm_; }

  // Stops every rank; used when one rank hits an error the others cannot know about.
  [[noreturn]] void abort(int exit_code) const;

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1, local_rank_ = 0, local_size_ = 1;
  bool owns_mpi_ = false;
  bool owns_comm_ = false;  // a split of another group's communicator
  void find_local_rank();
};

}  // namespace ssmtune
