// Context parallelism as an MPI job on the CPU backend: every sequence split along its length over the
// ranks of a context group (framework/context_parallel.h), alone (context = every rank) and combined with
// data parallelism (4 ranks: 2 replicas of 2 slices), against one process training the same global batch
// unsplit (tests/distributed/context_runs.h). Packed documents cross the slice boundaries (sequences of 24
// tokens over documents of a few dozen), so the conv history, the carried scan state and the document
// restarts are all exercised; without packing each sequence is one document carried across the slices.
//
// Tolerance. The split run computes the same sums as the whole one except the scan state at each slice
// boundary, which arrives through the fold h = final + decay * h instead of the step-by-step recurrence:
// the same products in another order, ~1e-7 relative in fp32. Through a few AdamW steps (which normalise
// the gradients) the losses, adapters and moments stay within ~1e-6 (as the data-parallel tests' reordered
// sums do); 1e-5 leaves a margin, while a slice that misses its history or its state (a document's
// context lost at the boundary) moves the loss by 1e-3 or more. Dropout is off: its masks are drawn per
// position within a slice, so they differ from the unsplit run's by design.
#include "tests/distributed/context_runs.h"
#include "tests/framework/error_message.h"

using namespace ssmtune;
using namespace ssmtune::test;

namespace {
constexpr double kTolerance = 1e-5;
}  // namespace

TEST_CASE("sequences split over context ranks train as one process with the whole sequences") {
  check_context_parallel_trains_as_one_process(TrainingRuns("cpu"), kTolerance);
}

TEST_CASE("parallel.context must divide the ranks and the sequence length") {
  TrainingRuns runs("cpu");
  const int ranks = world().size();
  int odd_context = 2;  // one that divides the sequence but not the job
  while (ranks % odd_context == 0 || 24 % odd_context != 0) ++odd_context;
  const RecipeConfig odd = runs.recipe("odd", 1, "ddp", 1, {"parallel.context=" + std::to_string(odd_context)});
  CHECK(contains(error_message([&] { run_training(odd, world()); }),
                 "does not divide the " + std::to_string(ranks) + " ranks"));
  // A sequence length the context does not divide is refused when the recipe is read.
  CHECK(contains(error_message([&] { runs.recipe("len", 1, "ddp", 1, {"parallel.context=5"}); }),
                 "data.seq_len 24 must be a multiple of parallel.context 5"));
  world_barrier();
}
