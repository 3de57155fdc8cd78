// The runner of tests labelled gpu: on a machine without a CUDA device it exits with 77, which ctest
// reports as skipped (SKIP_RETURN_CODE); listing the tests works everywhere.
#include <cuda_runtime.h>

#include <cstdio>

#include "tests/catch_runner.h"

int main(int argc, char** argv) {
  int devices = 0;
  if (!ssmtune::test::listing_tests(argc, argv) && (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0)) {
    std::puts("no CUDA device: skipped");
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
