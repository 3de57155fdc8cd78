// Sharded base weights through NCCL, as an MPI job of 2 ranks with a GPU each (labels gpu and multi_gpu;
// skipped with fewer GPUs): sharded_base_checks.h lists what is checked. Here the gathers run on the
// communicator's stream while the compute stream works, and each layer's bytes are copied on the compute
// stream right after acquire(): a gather that compute did not wait for shows up as another layer's bytes.
//
// Tolerance, against one GPU and between the same job with sharded and whole base weights: 1e-3, as in
// test_data_parallel_cuda.cpp (bf16 activations flip their rounding where the fp32 gradient sums differ
// in order, below 1e-4 relative over four steps; here three). The gathered bytes are the same, so the
// same job with sharded weights differs from it with whole ones at most by the run-to-run order of
// NCCL's and the kernels' sums; a stale or wrong layer moves the losses by 1e-2 or more.
#include "framework/error.h"
#include "tests/distributed/sharded_base_checks.h"

using namespace ssmtune;
using namespace ssmtune::test;

namespace {
constexpr double kTolerance = 1e-3;
}  // namespace

TEST_CASE("each GPU rank's shard of a layer is its piece of the whole NF4 block") {
  const std::unique_ptr<Backend> backend = make_backend("cuda", world().local_rank());
  check_shards_are_pieces_of_the_whole(*backend, sharded_test_model());
}

TEST_CASE("NCCL gathers the layers ahead of the compute stream, in forward and backward order") {
  const std::unique_ptr<Backend> backend = make_backend("cuda", world().local_rank());
  Watchdog watchdog(world(), 60);
  MpiCommunicator host(world(), watchdog);
  const std::unique_ptr<Communicator> comm = make_communicator(world(), watchdog, host, backend->stream());
  REQUIRE(comm->name() == "NCCL");
  check_gathered_layers_are_whole(*backend, *comm, sharded_test_model());
}

TEST_CASE("sharded base weights train on GPUs as whole ones, and fit a budget that one GPU exceeds") {
  check_sharded_training(TrainingRuns("cuda", kShardedTestLayers), kTolerance, kTolerance);
}
