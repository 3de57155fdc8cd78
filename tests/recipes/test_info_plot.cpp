// `ssmtune info` and `ssmtune plot` as a user runs them, and what `train` shows when its output is not
// a terminal: plain progress lines, and metrics.svg written at the end.
#include <filesystem>
#include <fstream>
#include <string>

#include "data/demo_dataset.h"
#include "data/token_dataset.h"
#include "framework/mamba_model.h"
#include "framework/model_sizes.h"
#include "tests/catch.h"
#include "tests/framework/scratch_dir.h"
#include "tests/recipes/child_process.h"

using namespace ssmtune;
namespace fs = std::filesystem;

namespace {

const std::string kSsmtune = std::string(SSMTUNE_BINARY_DIR) + "/recipes/ssmtune";
const std::string kDemoRecipe = std::string(SSMTUNE_SOURCE_DIR) + "/recipes/configs/demo.yaml";

struct Finished {
  int exit_code;
  std::string output;  // stdout and stderr
};

Finished run(const test::ScratchDir& dir, const std::vector<std::string>& args) {
  std::vector<std::string> argv{kSsmtune};
  argv.insert(argv.end(), args.begin(), args.end());
  test::ChildProcess child(dir / "log.txt", argv);
  REQUIRE(child.ended(120));
  return {child.exit_code(), child.output()};
}

}  // namespace

TEST_CASE("info prints parameters, memory per GPU and FLOPs from config.json alone") {
  test::ScratchDir dir("info-cli");
  write_random_mamba(dir / "model", model_size("demo"), 0);
  fs::remove(dir / "model/model.safetensors");  // no weights are read
  const std::string model = "model.path=" + (dir / "model").string();
  const Finished r = run(dir, {"info", "--config", kDemoRecipe, model, "device=cpu", "--ranks", "4",
                               "distributed.strategy=zero2"});
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  for (const char* part : {"base model (frozen)", "LoRA adapters (trainable)", "backend cpu", "memory per GPU (rank 0 of 4, zero2)", "1/4 of them (zero2)", "activations",
                           "with memory.recompute=false", "FLOPs per token", "training step"})
    CHECK(r.output.find(part) != std::string::npos);

  const Finished missing = run(dir, {"info", "--config", kDemoRecipe, "model.path=" + (dir / "nowhere").string()});
  CHECK(missing.exit_code == 1);
  CHECK(missing.output.find("ssmtune: error: ") != std::string::npos);
  CHECK(missing.output.find((dir / "nowhere/config.json").string()) != std::string::npos);
}

TEST_CASE("train prints plain lines off a terminal and plots its metrics, and plot redraws them") {
  test::ScratchDir dir("plot-cli");
  write_random_mamba(dir / "model", model_size("demo"), 0);
  write_token_dataset((dir / "data.h5").string(), make_demo_dataset(0, 100));
  const fs::path out = dir / "train";
  const Finished r = run(dir, {"train", "--config", kDemoRecipe, "device=cpu", "model.path=" + (dir / "model").string(),
                               "data.path=" + (dir / "data.h5").string(), "train.output_dir=" + out.string(),
                               "train.max_steps=4", "train.log_every=2", "train.batch_size=1", "data.seq_len=32",
                               "train.save_every=0"});
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  CHECK(r.output.find('\r') == std::string::npos);
  CHECK(r.output.find("step     1/4  loss ") != std::string::npos);
  CHECK(r.output.find("step     2/4  loss ") != std::string::npos);
  CHECK(r.output.find("step     3/4  loss ") == std::string::npos);  // not a logged step
  CHECK(r.output.find("wrote " + (out / "metrics.svg").string()) != std::string::npos);
  REQUIRE(fs::exists(out / "metrics.svg"));

  fs::remove(out / "metrics.svg");
  const Finished plot = run(dir, {"plot", out.string()});
  CHECK(plot.exit_code == 0);
  CHECK(fs::exists(out / "metrics.svg"));

  std::ofstream(out / "metrics.jsonl", std::ios::app) << "{\"step\": 5, \"loss\": [1]}\n";
  const Finished bad = run(dir, {"plot", out.string()});
  INFO(bad.output);
  CHECK(bad.exit_code == 1);
  CHECK(bad.output.find("ssmtune: error: " + (out / "metrics.jsonl").string() + ":4: \"loss\" must be a number") !=
        std::string::npos);
}
