// test_context_parallel.cpp through NCCL: sequences split over 2 GPU ranks (labels gpu and multi_gpu;
// skipped with fewer GPUs) train as one GPU with the whole sequences.
//
// Tolerance: as test_data_parallel_cuda.cpp argues for reordered fp32 sums, here the scan state entering
// the second slice comes through the fold (fp32, ~1e-7 relative apart from the recurrence) and the
// slices start their scan chunks at other positions; the bf16 activations then round differently where a
// value lies close to a rounding boundary (2^-9 relative each). Over four steps that stays below 1e-4
// relative in losses and norms; 1e-3 leaves a margin. Adapters and moments: 5e-3, as
// test_data_parallel_cuda.cpp argues (measured on 2 and 4 H200 ranks: up to 2.5e-3). The exchange logic
// itself is held to 1e-5 on the CPU (test_context_parallel.cpp); here it runs through NCCL and the
// CUDA kernels' boundary paths.
#include "tests/distributed/context_runs.h"

using namespace ssmtune;
using namespace ssmtune::test;

TEST_CASE("sequences split over GPU ranks through NCCL train as one GPU with the whole sequences") {
  TrainingRuns runs("cuda");
  runs.state_tolerance = 5e-3;
  check_context_parallel_trains_as_one_process(runs, 1e-3);
}
