// The validation loss of an MPI job of 2 or 3 ranks (3: uneven shares of the micro-batches) against
// rank 0 alone on the same global batch: the same evaluation steps, the same validation tokens and the
// same loss.
//
// Tolerance. The job trains adapters within ~1e-6 relative of the single process (test_data_parallel.cpp
// explains why), and sums the validation micro-batches' losses in another order (each rank its own, then
// across ranks): both move the validation loss by far less than 1e-6 relative. A micro-batch evaluated
// twice or not at all moves it by ~1e-2 (the demo micro-batches' losses differ by that much), and the
// token count then differs exactly.
#include "tests/distributed/training_runs.h"

using namespace ssmtune;
using namespace ssmtune::test;

TEST_CASE("a job of every rank evaluates the same validation loss as one process") {
  TrainingRuns runs("cpu");
  if (world().is_root()) write_token_dataset((runs.dir / "val.h5").string(), make_demo_dataset(6, 100));
  world_barrier();
  const std::vector<std::string> eval{"data.val_path=" + (runs.dir / "val.h5").string(), "eval.every=2",
                                      "eval.batches=5"};
  runs.train_alone(runs.recipe("alone", 1, "ddp", 3, eval));
  runs.train_together(runs.recipe("job", world().size(), "zero1", 3, eval));
  if (!world().is_root()) return;
  auto validation_lines = [&](const std::string& run) {
    std::vector<nlohmann::json> lines;
    for (const nlohmann::json& line : read_metrics(runs.dir / run / "metrics.jsonl"))
      if (line.contains("val_loss")) lines.push_back(line);
    return lines;
  };
  const std::vector<nlohmann::json> alone = validation_lines("alone"), job = validation_lines("job");
  REQUIRE(alone.size() == 2);  // steps 2 and 3 (the end)
  REQUIRE(job.size() == alone.size());
  for (size_t i = 0; i < alone.size(); ++i) {
    INFO("step " << alone[i]["step"] << ": val_loss " << job[i]["val_loss"] << " vs " << alone[i]["val_loss"]);
    CHECK(job[i]["step"] == alone[i]["step"]);
    CHECK(job[i]["val_tokens"] == alone[i]["val_tokens"]);
    const double a = alone[i]["val_loss"].get<double>(), b = job[i]["val_loss"].get<double>();
    CHECK(std::abs(a - b) <= 1e-5 * a);
  }
}
