// Sharded base weights (distributed.shard_base_weights) as an MPI job of 2 or 3 ranks (3: a block that
// 3 ranks share) on the CPU backend: sharded_base_checks.h lists what is checked.
//
// Tolerance. Against one process: the job sums the micro-batch gradients in another order (each rank its
// own, then across ranks), ~1e-6 relative after three steps, as test_data_parallel.cpp explains; 1e-5
// leaves a factor of 20, and a wrong layer's weights or a stale gather moves the loss by 1e-2 or more.
// Between the same job with sharded and with whole base weights: 0. The gathered bytes are the whole
// weights' bytes and every operation is the same, so the results are the same bits.
#include "framework/cpu_backend.h"
#include "tests/distributed/sharded_base_checks.h"

using namespace ssmtune;
using namespace ssmtune::test;

namespace {
constexpr double kTolerance = 1e-5;
}  // namespace

TEST_CASE("each rank's shard of a layer is its piece of the whole NF4 block") {
  const std::unique_ptr<Backend> backend = make_cpu_backend();
  check_shards_are_pieces_of_the_whole(*backend, sharded_test_model());
}

TEST_CASE("the layers gathered in forward and backward order are the whole weights") {
  const std::unique_ptr<Backend> backend = make_cpu_backend();
  Watchdog watchdog(world(), 60);
  MpiCommunicator comm(world(), watchdog);
  check_gathered_layers_are_whole(*backend, comm, sharded_test_model());
}

TEST_CASE("sharded base weights train as whole ones, and fit a budget that one process exceeds") {
  check_sharded_training(TrainingRuns("cpu", kShardedTestLayers), kTolerance, 0.0);
}
