// What the cases of an MPI test program share: the job's ranks, and helpers for cases that every rank
// runs together (see mpi_test_main.cpp).
#pragma once
#include <mpi.h>

#include <exception>
#include <filesystem>
#include <string>

#include "distributed/process_group.h"
#include "tests/catch.h"

namespace ssmtune::test {

// Every rank of the job (mpirun's world).
const ProcessGroup& world();

inline void world_barrier() { MPI_Barrier(world().comm()); }

// Runs `body`, turning an exception into a failed check instead of leaving the test case, so that this
// rank still reaches the collectives that follow and the other ranks do not wait for it in vain.
template <typename Body>
void without_leaving(Body&& body) {
  try {
    body();
  } catch (const std::exception& e) {
    FAIL_CHECK("rank " << world().rank() << ": " << e.what());
  }
}

// A scratch directory that every rank of the job shares: rank 0 makes it and removes it at the end.
class SharedScratchDir {
 public:
  explicit SharedScratchDir(const std::string& name);
  ~SharedScratchDir();
  SharedScratchDir(const SharedScratchDir&) = delete;
  SharedScratchDir& operator=(const SharedScratchDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& file) const { return path_ / file; }

 private:
  std::filesystem::path path_;
};

}  // namespace ssmtune::test
