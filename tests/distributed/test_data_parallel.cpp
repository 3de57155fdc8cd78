// Data-parallel training as an MPI job of 2 or 3 ranks (3: uneven shards) on the CPU backend, against
// one process (rank 0 alone) training the same global batch, for each strategy; checkpoints written by
// all ranks resume bit for bit, and restore on another number of ranks with another strategy.
//
// Tolerance. Each rank computes its micro-batches' gradients exactly as the single process computes the
// same micro-batches (same data, same dropout streams, same ops), so the runs differ only in the order
// in which the micro-batch gradients are summed in fp32: the single process accumulates them one after
// the other, the job sums each rank's own first and then across ranks (and, with ZeRO, the squared norm
// shard by shard). A reordered sum of k terms moves by at most about k * 2^-24 of the sum of their
// magnitudes, ~1e-6 relative here. AdamW divides by sqrt(v), so an update depends on the gradients'
// relative error, not on their size; a few steps therefore move the adapters, moments and losses apart
// by ~1e-6 relative (measured: at most 5e-7). 1e-5 leaves a factor of 20 over that, while a real error
// (a micro-batch counted twice or not at all, a shard updated twice or with another's moments, a wrong
// loss scale) moves them by 1e-2 or more.
#include "framework/atomic_file.h"
#include "tests/distributed/training_runs.h"

using namespace ssmtune;
using namespace ssmtune::test;

namespace {
constexpr double kTolerance = 1e-5;
}

TEST_CASE("each strategy trains as one process with the same global batch") {
  check_each_strategy_trains_as_one_process(TrainingRuns("cpu"), kTolerance);
}

TEST_CASE("a checkpoint written by all ranks resumes the run bit for bit") {
  TrainingRuns runs("cpu");
  const int ranks = world().size();
  for (const std::string strategy : {"ddp", "zero2"}) {
    runs.train_together(runs.recipe("full-" + strategy, ranks, strategy, 6, {"train.save_every=3"}));
    runs.copy_checkpoint("full-" + strategy, "resumed-" + strategy, 3);
    runs.train_together(runs.recipe("resumed-" + strategy, ranks, strategy, 6, {"train.save_every=3", "train.resume=true"}));
    if (!world().is_root()) continue;
    const fs::path full = runs.dir / ("full-" + strategy), resumed = runs.dir / ("resumed-" + strategy);
    const std::vector<nlohmann::json> a = read_metrics(full / "metrics.jsonl");
    const std::vector<nlohmann::json> b = read_metrics(resumed / "metrics.jsonl");
    REQUIRE(a.size() == 6);
    REQUIRE(b.size() == 3);
    for (size_t i = 0; i < 3; ++i) {
      CHECK(b[i]["loss"].get<double>() == a[i + 3]["loss"].get<double>());
      CHECK(b[i]["grad_norm"].get<double>() == a[i + 3]["grad_norm"].get<double>());
    }
    const int shards = strategy == "ddp" ? 1 : ranks;
    for (int i = 0; i < shards; ++i) {
      const std::string file = optimizer_file_name({i, shards});
      CHECK(read_text_file(full / "checkpoints/step_6" / file) == read_text_file(resumed / "checkpoints/step_6" / file));
    }
    CHECK(read_text_file(full / "checkpoints/step_6" / kAdapterFile) ==
          read_text_file(resumed / "checkpoints/step_6" / kAdapterFile));
  }
}

TEST_CASE("a checkpoint resumes on another number of ranks with another strategy") {
  check_resume_on_other_ranks(TrainingRuns("cpu"), kTolerance);
}
