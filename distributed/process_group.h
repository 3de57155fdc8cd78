// The ranks of one training job. Started under mpirun it is MPI's world; started alone it is a group
// of one, so every command also runs as a plain process.
#pragma once
#include <cstddef>
#include <cstdint>

namespace ssmtune {

class ProcessGroup {
 public:
  // Initialises MPI when the process was launched by mpirun (or MPI is otherwise available).
  ProcessGroup(int* argc, char*** argv);
  ~ProcessGroup();
  ProcessGroup(const ProcessGroup&) = delete;
  ProcessGroup& operator=(const ProcessGroup&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  bool is_root() const { return rank_ == 0; }

  // Host-buffer collectives (the CPU backend's communicator).
  void all_reduce_sum(double* values, size_t count) const;
  void all_reduce_sum(float* values, size_t count) const;
  void all_reduce_sum(int64_t* values, size_t count) const;
  void broadcast(void* bytes, size_t size, int root) const;
  void barrier() const;
  // Stops every rank; used when one rank hits an error the others cannot know about.
  [[noreturn]] void abort(int exit_code) const;

 private:
  int rank_ = 0;
  int size_ = 1;
  bool owns_mpi_ = false;
};

}  // namespace ssmtune
