// The runner of the tests against HF references: where there are none (the fixtures not yet
// committed, or $SSMTUNE_HF_DIR without any) it exits with 77, which ctest reports as skipped
// (SKIP_RETURN_CODE); built with SSMTUNE_HF_CUDA, it does the same without a CUDA device. Listing the
// tests works everywhere.
#include <cstdio>

#include "tests/catch_runner.h"
#include "tests/hf/hf_reference.h"
#ifdef SSMTUNE_HF_CUDA
#include "framework/cuda_backend.h"
#endif

int main(int argc, char** argv) {
  if (!ssmtune::test::listing_tests(argc, argv)) {
    const std::filesystem::path root = ssmtune::test::hf_reference_root();
    if (ssmtune::test::hf_reference_dirs(root).empty()) {
      std::printf("no HF references under %s (tests/hf/run_hf.sh fixtures writes them): skipped\n", root.c_str());
      return 77;
    }
#ifdef SSMTUNE_HF_CUDA
    if (ssmtune::cuda_device_count() == 0) {
      std::puts("no CUDA device: skipped");
      return 77;
    }
#endif
  }
  return Catch::Session().run(argc, argv);
}
