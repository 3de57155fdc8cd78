// Checkpoints on disk (framework/checkpoint.h, checkpoint_manifest.h): the manifest lists every file
// with its size and CRC-32; loading refuses, naming the file, anything that does not match; resume
// passes over damaged and unfinished checkpoints, says why, removes what interrupted saves left, and
// continues from the newest good one bit for bit; train.keep_last deletes only older checkpoints.
#include <nlohmann/json.hpp>

#include <fstream>
#include <set>

#include "framework/atomic_file.h"
#include "framework/checkpoint.h"
#include "framework/checkpoint_manifest.h"
#include "framework/cpu_backend.h"
#include "framework/model_sizes.h"
#include "framework/recipe_config.h"
#include "framework/trainer.h"
#include "tests/catch.h"
#include "tests/framework/demo_training.h"
#include "tests/framework/error_message.h"
#include "tests/framework/scratch_dir.h"

using namespace ssmtune;
using test::contains;
using test::error_message;
namespace fs = std::filesystem;
using test::process_group;
using test::read_metrics;

namespace {

struct Runs : test::DemoRun {
  Runs()
      : DemoRun("checkpoint", 200, {"device=cpu", "data.seq_len=24", "train.batch_size=2", "train.grad_accum=2",
                                    "lora.dropout=0.1", "train.log_every=1"}) {}
  // Loads a checkpoint into adapters of the recipe's layout; the error message, or "".
  std::string load_error(const fs::path& checkpoint) const {
    const std::unique_ptr<Backend> backend = make_cpu_backend();
    LoraAdapters adapters(*backend, model_size("demo"), recipe("unused", {}).lora);
    return error_message([&] { load_checkpoint(checkpoint, adapters); });
  }
};

std::set<std::string> files_in(const fs::path& dir) {
  std::set<std::string> names;
  for (const fs::directory_entry& entry : fs::directory_iterator(dir)) names.insert(entry.path().filename().string());
  return names;
}

void flip_a_bit(const fs::path& file, std::streamoff from_end) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(-from_end, std::ios::end);
  const char byte = static_cast<char>(f.get() ^ 0x01);
  f.seekp(-from_end, std::ios::end);
  f.put(byte);
}

}  // namespace

TEST_CASE("file_crc32 is zlib's CRC-32, the checksum of gzip") {
  test::ScratchDir dir("crc32");
  std::ofstream(dir / "check") << "123456789";
  std::ofstream(dir / "empty");
  CHECK(file_crc32(dir / "check") == 0xcbf43926u);  // the standard check value of CRC-32
  CHECK(file_crc32(dir / "empty") == 0u);
  CHECK(contains(error_message([&] { file_crc32(dir / "absent"); }), "absent: cannot open"));
}

TEST_CASE("the manifest lists every file of a checkpoint, and loading refuses one that does not match, naming it") {
  Runs runs;
  run_training(runs.recipe("out", {"train.max_steps=2"}), process_group());
  const fs::path good = runs.dir / "out/checkpoints/step_2";
  REQUIRE(runs.load_error(good) == "");
  const nlohmann::json manifest = nlohmann::json::parse(read_text_file(good / kManifestFile));
  std::set<std::string> listed;
  for (const auto& [name, entry] : manifest.at("files").items()) {
    listed.insert(name);
    CHECK(entry.at("bytes").get<uint64_t>() == fs::file_size(good / name));
    CHECK(entry.at("crc32").get<std::string>() == fmt::format("{:08x}", file_crc32(good / name)));
  }
  std::set<std::string> on_disk = files_in(good);
  on_disk.erase(kManifestFile);
  CHECK(listed == on_disk);
  CHECK(listed == std::set<std::string>{kAdapterFile, kOptimizerFile, kStateFile, kRecipeFile});

  // Each damage in a copy of its own; the message names the file and what does not match.
  const auto damaged = [&](const std::string& name, const std::function<void(const fs::path&)>& damage) {
    const fs::path copy = runs.dir / name;
    fs::copy(good, copy, fs::copy_options::recursive);
    damage(copy);
    return runs.load_error(copy);
  };
  const std::string flipped = damaged("flipped", [](const fs::path& d) { flip_a_bit(d / kAdapterFile, 3); });
  CHECK(contains(flipped, (runs.dir / "flipped" / kAdapterFile).string() + ": CRC-32 "));
  CHECK(contains(flipped, "the file is corrupt"));
  const std::string truncated = damaged("truncated", [](const fs::path& d) {
    fs::resize_file(d / kOptimizerFile, fs::file_size(d / kOptimizerFile) - 1);
  });
  CHECK(contains(truncated, (runs.dir / "truncated" / kOptimizerFile).string() + ": " +
                                std::to_string(fs::file_size(good / kOptimizerFile) - 1) + " bytes, manifest.json says " +
                                std::to_string(fs::file_size(good / kOptimizerFile))));
  const std::string no_state = damaged("no-state", [](const fs::path& d) { fs::remove(d / kStateFile); });
  CHECK(contains(no_state, (runs.dir / "no-state" / kStateFile).string() + ": listed in manifest.json but cannot be read"));
  const std::string no_manifest = damaged("no-manifest", [](const fs::path& d) { fs::remove(d / kManifestFile); });
  CHECK(contains(no_manifest, (runs.dir / "no-manifest" / kManifestFile).string() + ": missing: the checkpoint is incomplete"));
  const std::string unlisted = damaged("unlisted", [](const fs::path& d) {
    nlohmann::json m = nlohmann::json::parse(read_text_file(d / kManifestFile));
    m["files"].erase(kAdapterFile);
    const std::string text = m.dump();
    write_file_atomically(d / kManifestFile, std::as_bytes(std::span(text)));
  });
  CHECK(contains(unlisted, (runs.dir / "unlisted" / kAdapterFile).string() + ": not listed in " +
                               (runs.dir / "unlisted" / kManifestFile).string()));
  const std::string bad_crc = damaged("bad-crc", [](const fs::path& d) {
    nlohmann::json m = nlohmann::json::parse(read_text_file(d / kManifestFile));
    m["files"][kStateFile]["crc32"] = "12345xyz";
    const std::string text = m.dump();
    write_file_atomically(d / kManifestFile, std::as_bytes(std::span(text)));
  });
  CHECK(contains(bad_crc, "manifest.json: 'state.json': crc32 '12345xyz' is not 8 hex digits"));
}

TEST_CASE("resume passes over damaged and unfinished checkpoints, says why, and continues bit for bit") {
  Runs runs;
  run_training(runs.recipe("full", {"train.max_steps=9", "train.save_every=3"}), process_group());
  CHECK(files_in(runs.dir / "full/checkpoints") == std::set<std::string>{"step_3", "step_6", "step_9"});

  // A run that crashed at step 11 while saving, and whose step_9 was damaged afterwards.
  const fs::path crashed = runs.dir / "crashed/checkpoints";
  fs::create_directories(crashed);
  for (const char* step : {"step_3", "step_6", "step_9"})
    fs::copy(runs.dir / "full/checkpoints" / step, crashed / step, fs::copy_options::recursive);
  flip_a_bit(crashed / "step_9" / kOptimizerFile, 100);
  fs::create_directories(crashed / ".step_12.tmp");
  std::ofstream(crashed / ".step_12.tmp/optimizer.safetensors.tmp.1234") << "half";

  const CheckpointSearch search = find_latest_checkpoint(runs.dir / "crashed");
  REQUIRE(search.latest);
  CHECK(*search.latest == crashed / "step_6");
  REQUIRE(search.skipped.size() == 1);
  CHECK(search.skipped[0].first == crashed / "step_9");
  CHECK(contains(search.skipped[0].second, (crashed / "step_9" / kOptimizerFile).string() + ": CRC-32 "));

  run_training(runs.recipe("crashed", {"train.max_steps=9", "train.save_every=3", "train.resume=true"}),
               process_group());
  CHECK(files_in(crashed) == std::set<std::string>{"step_3", "step_6", "step_9"});  // .step_12.tmp removed
  const std::vector<nlohmann::json> full = read_metrics(runs.dir / "full/metrics.jsonl");
  const std::vector<nlohmann::json> resumed = read_metrics(runs.dir / "crashed/metrics.jsonl");
  REQUIRE(full.size() == 9);
  REQUIRE(resumed.size() == 3);  // metrics.jsonl was not copied: the lines of steps 7..9
  for (size_t i = 0; i < 3; ++i) {
    CHECK(resumed[i]["step"] == full[i + 6]["step"]);
    CHECK(resumed[i]["loss"].get<double>() == full[i + 6]["loss"].get<double>());
  }
  for (const char* file : {kAdapterFile, kOptimizerFile, kStateFile})
    CHECK(read_text_file(crashed / "step_9" / file) == read_text_file(runs.dir / "full/checkpoints/step_9" / file));
  CHECK(runs.load_error(crashed / "step_9") == "");
}

TEST_CASE("a fresh run removes what an interrupted save left, and refuses a directory with checkpoints") {
  Runs runs;
  fs::create_directories(runs.dir / "out/checkpoints/.step_5.tmp");
  fs::create_directories(runs.dir / "out/checkpoints/.step_2.removing");
  run_training(runs.recipe("out", {"train.max_steps=1"}), process_group());
  CHECK(files_in(runs.dir / "out/checkpoints") == std::set<std::string>{"step_1"});
  CHECK(contains(error_message([&] { run_training(runs.recipe("out", {"train.max_steps=1"}), process_group()); }),
                 "already holds checkpoints: set train.resume=true"));
}

TEST_CASE("train.keep_last keeps the newest checkpoints and deletes only older ones") {
  Runs runs;
  run_training(runs.recipe("out", {"train.max_steps=10", "train.save_every=2", "train.keep_last=2"}), process_group());
  CHECK(files_in(runs.dir / "out/checkpoints") == std::set<std::string>{"step_8", "step_10"});

  // Resumed from step_8 because step_10 was damaged: step_10 (a later step) stays until this run
  // replaces it, the complete step_8 is the older one kept, and nothing older survives.
  flip_a_bit(runs.dir / "out/checkpoints/step_10" / kAdapterFile, 5);
  run_training(runs.recipe("out", {"train.max_steps=12", "train.save_every=1", "train.keep_last=2",
                                   "train.resume=true"}),
               process_group());
  CHECK(files_in(runs.dir / "out/checkpoints") == std::set<std::string>{"step_11", "step_12"});
  CHECK(runs.load_error(runs.dir / "out/checkpoints/step_12") == "");
}

TEST_CASE("train.keep_last and train.max_bad_steps: defaults and errors naming the key") {
  const char* minimal = "model:\n  path: m\ndata:\n  path: d.h5\ntrain:\n  output_dir: out\n";
  const RecipeConfig defaults = parse_recipe(minimal, "recipe.yaml", {});
  CHECK(defaults.keep_last == 0);
  CHECK(defaults.max_bad_steps == 10);
  const RecipeConfig set = parse_recipe(minimal, "recipe.yaml", {"train.keep_last=3", "train.max_bad_steps=1"});
  CHECK(set.keep_last == 3);
  CHECK(set.max_bad_steps == 1);
  CHECK(error_message([&] { parse_recipe(minimal, "recipe.yaml", {"train.keep_last=-1"}); }) ==
        "recipe.yaml: train.keep_last must be 0 (keep all) or a number of checkpoints, got -1");
  CHECK(error_message([&] { parse_recipe(minimal, "recipe.yaml", {"train.max_bad_steps=0"}); }) ==
        "recipe.yaml: train.max_bad_steps must be positive (1 stops at the first non-finite step), got 0");
}
