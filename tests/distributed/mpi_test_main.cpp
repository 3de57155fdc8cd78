// The runner of the MPI test programs (tests/distributed/CMakeLists.txt: ssmtune_mpi_test): every rank
// runs the same Catch2 cases in the same order, since the cases are collective, and the job fails when
// any rank does. Built with SSMTUNE_MPI_TEST_GPUS, every rank needs a GPU of its own; with fewer
// visible every rank exits with 77, which ctest reports as skipped.
#include <unistd.h>

#include <cstdio>

#ifdef SSMTUNE_MPI_TEST_GPUS
#include <cuda_runtime.h>
#endif

#if __has_include(<catch2/catch_session.hpp>)
#include <catch2/catch_session.hpp>
#else
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#endif

#include "tests/distributed/mpi_job.h"

namespace ssmtune::test {
namespace {
const ProcessGroup* job = nullptr;
}

const ProcessGroup& world() { return *job; }

SharedScratchDir::SharedScratchDir(const std::string& name) {
  char buffer[4096] = {};
  if (world().is_root()) {
    const std::filesystem::path dir = std::filesystem::temp_directory_path() /
                                      ("ssmtune-" + name + "-" + std::to_string(::getpid()));
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
    std::snprintf(buffer, sizeof buffer, "%s", dir.c_str());
  }
  MPI_Bcast(buffer, sizeof buffer, MPI_CHAR, 0, world().comm());
  path_ = buffer;
}

SharedScratchDir::~SharedScratchDir() {
  world_barrier();
  std::error_code ignored;
  if (world().is_root()) std::filesystem::remove_all(path_, ignored);
}

}  // namespace ssmtune::test

int main(int argc, char** argv) {
  ssmtune::ProcessGroup group(&argc, &argv);
#ifdef SSMTUNE_MPI_TEST_GPUS
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;
  if (devices < group.local_size()) {
    if (group.is_root()) std::printf("%d ranks on this host need as many GPUs, %d visible: skipped\n", group.local_size(), devices);
    return 77;
  }
#endif
  ssmtune::test::job = &group;
  return Catch::Session().run(argc, argv);
}
