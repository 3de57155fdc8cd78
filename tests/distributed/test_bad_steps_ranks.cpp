// A non-finite step on one rank only (framework/bad_steps.h): rank 1 alone gets a NaN loss and NaN
// gradients at one step, from a sequence of its share of the batch. Every rank must skip that update
// (the loss and the gradient norm are global), leaving adapters and every rank's optimizer shard as
// they were, while the data moves on and metrics.jsonl counts the step; the job then goes on as one
// process that skipped the same step: the same losses, norms, adapters and moments within the
// tolerance of test_data_parallel.cpp. A rank that updated alone would have moved its shard of the
// moments (zero2), or its own copy of the adapters and with them every later gradient (ddp).
#include <algorithm>
#include <random>

#include "framework/checkpoint_manifest.h"
#include "framework/error.h"
#include "tests/distributed/training_runs.h"
#include "tests/framework/poisoned_model.h"

using namespace ssmtune;
using namespace ssmtune::test;

namespace {

constexpr double kTolerance = 1e-5;
constexpr int kSteps = 5;
constexpr int kBadStep = 3;               // 1-based
constexpr int64_t kSeqLen = 24;           // data.seq_len of TrainingRuns::recipe
constexpr int64_t kPerRank = 2 * kAccum;  // sequences a rank takes in a step of a job of every rank

// Data of random tokens in the demo documents (the demo's periodic patterns repeat, so a sequence would
// not be known by its tokens) with the poisoned token once: as an input of the first sequence that rank
// 1 of `ranks` takes at step kBadStep, in no other sequence of the run.
void write_data_poisoned_on_rank_1(const fs::path& path, uint64_t seed, int ranks) {
  TokenDatasetContents contents = make_demo_dataset(5, 300);
  std::mt19937 random(5);
  for (uint32_t& token : contents.tokens)
    if (token != contents.eos_id) token = 1 + random() % (kPoisonedToken - 1);
  write_token_dataset(path.string(), contents);
  std::vector<uint32_t> tokens(kSeqLen + 1);
  {
    const TokenDataset dataset = TokenDataset::open(path.string());
    SequenceSampler sampler(dataset, kSeqLen, seed);
    std::vector<uint8_t> mask(kSeqLen);
    sampler.skip((kBadStep - 1) * kPerRank * ranks + kPerRank);
    sampler.next(tokens.data(), mask.data());
  }
  // Packed sequence i holds tokens [i * seq_len, (i + 1) * seq_len]: its input 1 is in no other sequence.
  std::vector<size_t> starts;
  for (size_t start = 0; start + kSeqLen < contents.tokens.size(); start += kSeqLen)
    if (std::equal(tokens.begin(), tokens.end(), contents.tokens.begin() + static_cast<ptrdiff_t>(start)))
      starts.push_back(start);
  if (starts.size() != 1)
    fail("the sequence of rank 1 at step {} is found {} times in the data", kBadStep, starts.size());
  contents.tokens[starts[0] + 1] = kPoisonedToken;
  write_token_dataset(path.string(), contents);
  const std::vector<bool> bad = poisoned_steps(path, kSeqLen, seed, kPerRank * ranks, kSteps);
  for (int step = 1; step <= kSteps; ++step)
    if (bad[static_cast<size_t>(step - 1)] != (step == kBadStep))
      fail("step {} of the run is {}", step, step == kBadStep ? "not bad" : "bad as well");
}

std::string file_of_step(const fs::path& run, int step, const std::string& file) {
  return read_text_file(run / ("checkpoints/step_" + std::to_string(step)) / file);
}

// Rank 0 checks run `name` with the global batch of `ranks` ranks: step kBadStep alone skipped and
// counted, its checkpoint's adapters and optimizer files those of the step before, bit for bit, the
// other steps' adapters moved; every step took its share of the data.
void check_skipped_once(const TrainingRuns& runs, const std::string& name, int ranks) {
  const fs::path run = runs.dir / name;
  const std::vector<nlohmann::json> metrics = read_metrics(run / "metrics.jsonl");
  REQUIRE(metrics.size() == kSteps);
  std::vector<std::string> kept;  // the files a skipped step leaves as they were
  for (const fs::directory_entry& entry : fs::directory_iterator(run / "checkpoints/step_1"))
    if (const std::string file = entry.path().filename().string(); file != kStateFile && file != kManifestFile)
      kept.push_back(file);
  REQUIRE(kept.size() >= 3);  // adapters, recipe, optimizer state
  for (int step = 1; step <= kSteps; ++step) {
    const nlohmann::json& line = metrics[static_cast<size_t>(step - 1)];
    INFO(name << ", step " << step << ": " << line.dump());
    const bool skipped = step == kBadStep;
    CHECK(line.contains("skipped") == skipped);
    CHECK(line["loss"].is_null() == skipped);  // NaN is null in JSON
    if (skipped) {
      CHECK(line["bad_steps_in_a_row"] == 1);
      CHECK(line["bad_steps_total"] == 1);
    }
    const nlohmann::json state = nlohmann::json::parse(file_of_step(run, step, kStateFile));
    CHECK(state["sampler"]["index"] == step * kPerRank * ranks);
    CHECK(state["bad_steps"]["total"] == (step >= kBadStep ? 1 : 0));
    if (step == 1) continue;
    for (const std::string& file : kept) {
      INFO(file);
      const bool same = file_of_step(run, step, file) == file_of_step(run, step - 1, file);
      if (skipped) CHECK(same);
      else if (file == kAdapterFile) CHECK_FALSE(same);
    }
  }
}

}  // namespace

TEST_CASE("a NaN loss on rank 1 alone skips the update on every rank, and the job goes on as one process would") {
  TrainingRuns runs("cpu", 2);  // two layers, as the poisoned demo model has
  const int ranks = world().size();
  const std::vector<std::string> poisoned{"model.path=" + (runs.dir / "poisoned").string(),
                                          "data.path=" + (runs.dir / "poisoned.h5").string(), "train.save_every=1"};
  if (world().is_root())
    without_leaving([&] {
      write_poisoned_demo_model(runs.dir / "clean", runs.dir / "poisoned");
      write_data_poisoned_on_rank_1(runs.dir / "poisoned.h5", runs.recipe("unused", 1, "ddp", 1).seed, ranks);
    });
  world_barrier();

  runs.train_alone(runs.recipe("alone", 1, "ddp", kSteps, poisoned));
  if (world().is_root()) check_skipped_once(runs, "alone", ranks);
  for (const std::string strategy : {"ddp", "zero2"}) {
    runs.train_together(runs.recipe(strategy, ranks, strategy, kSteps, poisoned));
    if (!world().is_root()) continue;
    check_skipped_once(runs, strategy, ranks);
    compare_runs(runs, strategy, "alone", kSteps, kTolerance);
  }
}
