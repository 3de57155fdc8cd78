// `ssmtune generate` as a user runs it, on the CPU: a demo model trained for a few steps, its checkpoint
// and the PEFT adapter exported from it give the same greedy tokens, run after run; a seed reproduces
// its samples; each bad input is one error line naming the file, tensor or option; and text in and text
// out through a tokenizer.json.
#include <sys/wait.h>

#include <cstdio>
#include <fstream>

#include "data/demo_dataset.h"
#include "framework/mamba_model.h"
#include "framework/model_sizes.h"
#include "framework/peft_export.h"
#include "tests/catch.h"
#include "tests/framework/scratch_dir.h"

using namespace ssmtune;
namespace fs = std::filesystem;

namespace {

struct Result {
  int exit_code;
  std::string out;  // stdout
  std::string err;  // stderr
};

// Runs build/recipes/ssmtune with args, stdout and stderr kept apart.
Result run(const std::string& args, const test::ScratchDir& dir) {
  const fs::path err_file = dir / "stderr.txt";
  const std::string command = std::string(SSMTUNE_BINARY_DIR) + "/recipes/ssmtune " + args + " 2>" + err_file.string();
  FILE* pipe = popen(command.c_str(), "r");
  REQUIRE(pipe);
  std::string out;
  char buffer[4096];
  while (size_t n = fread(buffer, 1, sizeof buffer, pipe)) out.append(buffer, n);
  const int status = pclose(pipe);
  std::ifstream err_stream(err_file);
  std::string err((std::istreambuf_iterator<char>(err_stream)), std::istreambuf_iterator<char>());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), out, err};
}

// The demo model trained for a few steps at a high learning rate (adapters far from their zero-B start),
// its last checkpoint and the PEFT export of it.
struct Trained {
  test::ScratchDir dir{"generate-cli"};
  fs::path model = dir / "model", checkpoint = dir / "out/checkpoints/step_3", peft = dir / "peft";
  Trained() {
    write_random_mamba(model, model_size("demo"), 0);
    write_token_dataset((dir / "data.h5").string(), make_demo_dataset(0, 50));
    std::ofstream(dir / "recipe.yaml") << "device: cpu\nmodel:\n  path: " << model.string()
                                       << "\ndata:\n  path: " << (dir / "data.h5").string()
                                       << "\n  seq_len: 16\ntrain:\n  output_dir: " << (dir / "out").string()
                                       << "\n  max_steps: 3\n  lr: 0.05\n";
    const Result trained = run("train --config " + (dir / "recipe.yaml").string(), dir);
    INFO(trained.err);
    REQUIRE(trained.exit_code == 0);
    const Result exported =
        run("export --checkpoint " + checkpoint.string() + " --format peft --out " + peft.string(), dir);
    INFO(exported.err);
    REQUIRE(exported.exit_code == 0);
  }
  Result generate(const std::string& args) const {
    return run("generate --device cpu --model " + model.string() + " " + args, dir);
  }
};

std::vector<uint32_t> ids_of(const Result& r) {
  INFO("stdout: " << r.out << "\nstderr: " << r.err);
  REQUIRE(r.exit_code == 0);
  REQUIRE(!r.out.empty());
  REQUIRE(r.out.back() == '\n');
  std::vector<uint32_t> ids;
  size_t at = 0;
  while (at < r.out.size() - 1) {
    size_t end = r.out.find(',', at);
    if (end == std::string::npos) end = r.out.size() - 1;
    ids.push_back(static_cast<uint32_t>(std::stoul(r.out.substr(at, end - at))));
    at = end + 1;
  }
  return ids;
}

// Exactly one line on stderr, "ssmtune: error: ...", containing every fragment; a non-zero exit.
void require_one_error(const Result& r, std::initializer_list<std::string> fragments) {
  INFO("stdout: " << r.out << "\nstderr: " << r.err);
  CHECK(r.exit_code != 0);
  CHECK(r.exit_code < 128);  // not killed by a signal
  CHECK(r.err.rfind("ssmtune: error: ", 0) == 0);
  CHECK(r.err.find('\n') == r.err.size() - 1);
  for (const std::string& f : fragments) CHECK(r.err.find(f) != std::string::npos);
}

}  // namespace

TEST_CASE("generate: a PEFT adapter and its checkpoint give the same tokens, seeds reproduce samples, errors") {
  Trained t;
  const std::string greedy = "--prompt-ids 1,2,3 --max-new-tokens 12 --temperature 0 --adapter ";
  const std::vector<uint32_t> from_peft = ids_of(t.generate(greedy + t.peft.string()));
  CHECK(from_peft.size() == 12);  // the demo model's config.json has no eos_token_id
  for (uint32_t id : from_peft) CHECK(id < 64);
  CHECK(ids_of(t.generate(greedy + t.peft.string())) == from_peft);
  CHECK(ids_of(t.generate(greedy + t.checkpoint.string())) == from_peft);

  const std::string sampled = "--prompt-ids 5,9 --max-new-tokens 20 --top-p 0.9 --adapter " + t.peft.string();
  const std::vector<uint32_t> seed_5 = ids_of(t.generate(sampled + " --seed 5"));
  CHECK(ids_of(t.generate(sampled + " --seed 5")) == seed_5);
  CHECK(ids_of(t.generate(sampled + " --seed 6")) != seed_5);
  CHECK(ids_of(t.generate("--prompt-ids 1,2,3 --max-new-tokens 0")).empty());

  // Bad adapters and options, each one error naming the file or the option (here, where the adapter is
  // trained already: every test case pays for its own training). The adapter's weights file missing:
  fs::copy(t.peft, t.dir / "peft-broken");
  fs::remove(t.dir / "peft-broken" / kPeftWeightsFile);
  require_one_error(t.generate("--prompt-ids 1 --adapter " + (t.dir / "peft-broken").string()), {kPeftWeightsFile});
  // An adapter for another model: d_model 32 instead of 64.
  MambaConfig narrow = model_size("demo");
  narrow.d_model = 32;
  narrow.d_inner = 64;
  write_random_mamba(t.dir / "narrow", narrow, 0);
  require_one_error(run("generate --device cpu --prompt-ids 1 --model " + (t.dir / "narrow").string() + " --adapter " +
                            t.peft.string(),
                        t.dir),
                    {kPeftWeightsFile, "base_model.model.backbone.layers.0.mixer.in_proj.lora_A.weight"});
  require_one_error(t.generate("--prompt-ids 1 --adapter " + (t.dir / "nowhere").string()), {"nowhere"});
  require_one_error(t.generate("--prompt-ids 1 --adapter " + t.model.string()), {"adapter_config.json", "state.json"});
  require_one_error(t.generate("--prompt-ids 1,x,3"), {"--prompt-ids", "'x'"});
  require_one_error(t.generate("--prompt-ids 1,64"), {"token id 64", "vocab_size 64"});
  require_one_error(t.generate("--prompt-ids 1 --top-p 0"), {"top-p"});
  require_one_error(t.generate(""), {"--prompt", "--prompt-ids"});
  // Text without a tokenizer: the model directory has no tokenizer.json.
  require_one_error(t.generate("--prompt hello"), {"--prompt-ids"});
}

#ifdef SSMTUNE_WITH_TOKENIZER
TEST_CASE("generate: text in and text out through a tokenizer.json") {
  test::ScratchDir dir("generate-text");
  const fs::path tokenizer = fs::path(SSMTUNE_SOURCE_DIR) / "tests/data/fixtures/tokenizer/tokenizer.json";
  MambaConfig config = model_size("demo");
  config.vocab_size = 895;  // the fixture tokenizer's vocab and added tokens
  write_random_mamba(dir / "model", config, 0);
  const std::string args = "generate --device cpu --model " + (dir / "model").string() +
                           " --prompt 'The cat sat' --max-new-tokens 8 --temperature 0";
  const Result first = run(args + " --tokenizer " + tokenizer.string(), dir);
  INFO(first.err);
  REQUIRE(first.exit_code == 0);
  CHECK(first.out.size() > 1);
  // tokenizer.json in the model directory is found without --tokenizer.
  fs::copy_file(tokenizer, dir / "model/tokenizer.json");
  CHECK(run(args, dir).out == first.out);
  require_one_error(run(args + " --tokenizer " + (dir / "missing.json").string(), dir), {"missing.json"});
  // A tokenizer with more ids than the model has.
  write_random_mamba(dir / "small", model_size("demo"), 0);
  require_one_error(run("generate --device cpu --prompt hi --model " + (dir / "small").string() + " --tokenizer " +
                            tokenizer.string(),
                        dir),
                    {"tokenizer.json", "vocab_size 64"});
}
#endif
