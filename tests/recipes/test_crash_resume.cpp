// The crash test: `ssmtune train` on the CPU backend (the demo model, short sequences, a checkpoint
// every 5 of 200 steps, train.keep_last 3) is killed with SIGKILL a dozen times and resumed each time.
// The kills rotate through three kinds, their moments drawn by a seeded generator: at a random moment
// after the start (often still in start-up or resume), at a random moment after the first step, and
// as soon as the temporary directory of a checkpoint save appears, so that it lands inside the write.
// After the 4th and the 8th kill (or the first later one with a complete checkpoint) the test damages
// the newest checkpoint (one flipped bit in the adapters; the manifest deleted), which the next resume
// must pass over, saying so. The adapters and moments at the end
// must equal, byte for byte, those of a run that was never interrupted, and so must every logged loss.
#include <nlohmann/json.hpp>

#include <cstdio>
#include <fstream>
#include <random>

#include "data/demo_dataset.h"
#include "framework/atomic_file.h"
#include "framework/checkpoint.h"
#include "framework/checkpoint_manifest.h"
#include "framework/mamba_model.h"
#include "framework/model_sizes.h"
#include "tests/catch.h"
#include "tests/framework/demo_training.h"
#include "tests/framework/scratch_dir.h"
#include "tests/recipes/child_process.h"

using namespace ssmtune;
namespace fs = std::filesystem;
using test::read_metrics;

namespace {

constexpr int kSteps = 200;
constexpr int kKills = 12;

struct CrashSetup {
  test::ScratchDir dir{"crash"};
  CrashSetup() {
    write_random_mamba(dir / "model", model_size("demo"), 0);
    write_token_dataset((dir / "data.h5").string(), make_demo_dataset(0, 300));
    std::ofstream(dir / "recipe.yaml") << "device: cpu\nmodel:\n  path: " << (dir / "model").string()
                                       << "\ndata:\n  path: " << (dir / "data.h5").string()
                                       << "\n  seq_len: 32\nlora:\n  rank: 4\n  dropout: 0.1\ntrain:\n"
                                       << "  max_steps: " << kSteps << "\n  batch_size: 2\n  save_every: 5\n"
                                       << "  keep_last: 3\n  log_every: 1\n  resume: true\n";
  }
  std::vector<std::string> train(const std::string& output) const {
    return {std::string(SSMTUNE_BINARY_DIR) + "/recipes/ssmtune", "train", "--config", (dir / "recipe.yaml").string(),
            "train.output_dir=" + (dir / output).string()};
  }
};

// The .step_* entries under a run's checkpoints/: saves (or deletions) in progress or interrupted.
std::vector<std::string> temporaries(const fs::path& checkpoints) {
  std::vector<std::string> names;
  std::error_code error;
  for (fs::directory_iterator it(checkpoints, error), end; !error && it != end; it.increment(error))
    if (const std::string name = it->path().filename().string(); name.starts_with(".step_")) names.push_back(name);
  return names;
}

// The newest step_<N> directory with a manifest, if any.
std::optional<fs::path> newest_complete(const fs::path& checkpoints) {
  std::optional<fs::path> best;
  int64_t best_step = -1;
  if (!fs::is_directory(checkpoints)) return best;
  for (const fs::directory_entry& entry : fs::directory_iterator(checkpoints)) {
    const std::string name = entry.path().filename().string();
    if (!name.starts_with("step_") || !fs::exists(entry.path() / kManifestFile)) continue;
    if (const int64_t step = std::stoll(name.substr(5)); step > best_step) best_step = step, best = entry.path();
  }
  return best;
}

}  // namespace

TEST_CASE("training killed a dozen times, some kills inside a checkpoint save, ends bit for bit as the "
          "uninterrupted run") {
  CrashSetup setup;
  {
    test::ChildProcess reference(setup.dir / "reference.log", setup.train("reference"), test::kMpiEnv);
    REQUIRE(reference.ended(300));
    INFO(reference.output());
    REQUIRE(reference.exit_code() == 0);
  }

  const fs::path checkpoints = setup.dir / "crashed/checkpoints";
  std::mt19937_64 random(20240609);
  int kills = 0, during_save = 0, restarts = 0;
  std::vector<std::string> faults;
  std::string expect_skipped;  // the damaged checkpoint the next restart must pass over
  while (kills < kKills) {
    REQUIRE(restarts++ < 4 * kKills);  // a run that finishes before its kill is restarted; bounded anyway
    const std::vector<std::string> stale = temporaries(checkpoints);  // left by the previous kill
    test::ChildProcess run(setup.dir / "crashed.log", setup.train("crashed"), test::kMpiEnv);
    if (!expect_skipped.empty()) {
      // The skip is printed before the first step; wait for it (output is flushed with each step).
      const bool said = run.wait_for_output("skipping checkpoint " + expect_skipped, 60);
      INFO(run.output());
      REQUIRE(said);
      expect_skipped.clear();
    }
    const int kind = kills % 3;  // 0: any moment, 1: while training, 2: inside a save
    // A kill after which a fault is due waits for a complete checkpoint to damage: a slow build (the
    // sanitized one) may not reach one within the random moments below.
    const bool fault_due = faults.size() < 2 && kills + 1 >= 4 * static_cast<int>(faults.size() + 1);
    while (fault_due && !run.poll() && !newest_complete(checkpoints))
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    if (kind == 0) {
      run.ended(std::uniform_real_distribution<double>(0.05, 1.5)(random));
    } else if (kind == 1) {
      if (run.wait_for_output("loss ", 120)) run.ended(std::uniform_real_distribution<double>(0.0, 1.0)(random));
    } else {
      // The trainer first removes what earlier kills left; then the next save's directory appears.
      while (!run.poll() && !stale.empty() && temporaries(checkpoints) == stale)
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      while (!run.poll() && temporaries(checkpoints).empty())
        std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    if (run.poll()) {  // finished before the kill came: start over from scratch
      INFO(run.output());
      REQUIRE(run.exit_code() == 0);
      fs::remove_all(setup.dir / "crashed");
      continue;
    }
    kill(-run.pid(), SIGKILL);
    REQUIRE(run.ended(30));
    ++kills;
    // Inside a save when a temporary is there that the previous kill did not leave.
    if (!temporaries(checkpoints).empty() && (kind == 2 || stale.empty())) ++during_save;

    if (kills >= 4 * static_cast<int>(faults.size() + 1) && faults.size() < 2) {
      if (const std::optional<fs::path> newest = newest_complete(checkpoints)) {
        if (faults.empty()) {
          // One bit of the adapters flipped, as a bad disk or a faulty copy would.
          std::fstream file(*newest / kAdapterFile, std::ios::in | std::ios::out | std::ios::binary);
          file.seekg(-7, std::ios::end);
          const char byte = static_cast<char>(file.get() ^ 0x10);
          file.seekp(-7, std::ios::end);
          file.put(byte);
          faults.push_back("flipped a bit of " + (*newest / kAdapterFile).string());
        } else {
          fs::remove(*newest / kManifestFile);
          faults.push_back("deleted " + (*newest / kManifestFile).string());
        }
        expect_skipped = newest->string();
      }
    }
  }

  test::ChildProcess last(setup.dir / "crashed.log", setup.train("crashed"), test::kMpiEnv);
  REQUIRE(last.ended(300));
  INFO(last.output());
  REQUIRE(last.exit_code() == 0);
  std::printf("crash test: %d SIGKILLs (%d inside a checkpoint save), %d restarts", kills, during_save, restarts + 1);
  for (const std::string& fault : faults) std::printf("; %s", fault.c_str());
  std::printf("\n");
  CHECK(kills == kKills);
  CHECK(during_save >= kKills / 3);
  CHECK(faults.size() == 2);

  const std::string last_step = "checkpoints/step_" + std::to_string(kSteps);
  for (const char* file : {kAdapterFile, kOptimizerFile}) {
    INFO(file);
    CHECK(read_text_file(setup.dir / "reference" / last_step / file) == read_text_file(setup.dir / "crashed" / last_step / file));
  }
  const std::vector<nlohmann::json> reference = read_metrics(setup.dir / "reference/metrics.jsonl");
  const std::vector<nlohmann::json> crashed = read_metrics(setup.dir / "crashed/metrics.jsonl");
  REQUIRE(reference.size() == kSteps);
  REQUIRE(crashed.size() == reference.size());
  for (size_t i = 0; i < reference.size(); ++i) {
    INFO("line " << i);
    CHECK(crashed[i]["step"] == reference[i]["step"]);
    CHECK(crashed[i]["loss"].get<double>() == reference[i]["loss"].get<double>());
    CHECK(crashed[i]["grad_norm"].get<double>() == reference[i]["grad_norm"].get<double>());
  }
  // keep_last: the three newest, nothing else left behind.
  std::vector<std::string> left;
  for (const fs::directory_entry& entry : fs::directory_iterator(checkpoints)) left.push_back(entry.path().filename().string());
  std::sort(left.begin(), left.end());
  CHECK(left == std::vector<std::string>{"step_190", "step_195", "step_200"});
}
