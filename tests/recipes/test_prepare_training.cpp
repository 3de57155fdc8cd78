// `ssmtune prepare` as a user runs it (summary, default validation file, malformed lines failing and
// skipped), its output trained by `ssmtune train` with evaluation, and the point of the loss mask:
// through TrainStep::forward_backward, the target of a prompt token (mask 0) changes neither the loss
// nor any adapter gradient by a single bit, while the target of a response token changes both.
#include <fstream>
#include <random>

#include "data/prepare.h"
#include "data/token_dataset.h"
#include "data/tokenizer.h"
#include "framework/cpu_backend.h"
#include "framework/lora.h"
#include "framework/mamba_model.h"
#include "framework/train_step.h"
#include "tests/catch.h"
#include "tests/framework/scratch_dir.h"
#include "tests/kernels/finite_difference.h"
#include "tests/recipes/child_process.h"

using namespace ssmtune;
namespace fs = std::filesystem;

namespace {

const std::string kTokenizer = std::string(SSMTUNE_SOURCE_DIR) + "/tests/data/fixtures/tokenizer/tokenizer.json";

// Runs build/recipes/ssmtune with `args` to completion; its exit code and stdout + stderr.
std::pair<int, std::string> run_ssmtune(const test::ScratchDir& dir, std::vector<std::string> args) {
  args.insert(args.begin(), std::string(SSMTUNE_BINARY_DIR) + "/recipes/ssmtune");
  test::ChildProcess child(dir / "ssmtune.log", args);
  REQUIRE(child.ended(120));
  return {child.exit_code(), child.output()};
}

// Instruction records whose responses are long enough that a window of a few dozen tokens holds both
// response and prompt tokens.
std::string instruction_jsonl(int records) {
  std::string jsonl;
  for (int i = 0; i < records; ++i)
    jsonl += "{\"instruction\": \"Describe the number " + std::to_string(i) + ".\", " +
             (i % 2 ? "\"input\": \"Use one sentence.\", " : "") + "\"output\": \"The number " + std::to_string(i) +
             " is a whole number that comes after " + std::to_string(i - 1) +
             " and before the next one, and it is written in digits.\"}\n";
  return jsonl;
}

// A two-layer Mamba small enough to train in a moment, with room for every id of the fixture tokenizer.
MambaConfig tiny_config(uint32_t vocab_size) {
  MambaConfig c;
  c.d_model = 16;
  c.n_layer = 2;
  c.vocab_size = vocab_size;
  c.d_state = 4;
  c.d_inner = 32;
  c.dt_rank = 2;
  return c;
}

}  // namespace

TEST_CASE("ssmtune prepare: summary, default validation file, and malformed lines failing or skipped") {
  test::ScratchDir dir("prepare-cli");
  std::ofstream(dir / "data.jsonl") << instruction_jsonl(40);
  const fs::path out = dir / "sets/train.h5";
  const std::vector<std::string> common{"prepare", "--tokenizer", kTokenizer, "--format", "instruction",
                                        "--out", out.string(), "--val-fraction", "0.25", "--seed", "3"};
  std::vector<std::string> args = common;
  args.insert(args.end(), {"--input", (dir / "data.jsonl").string()});
  auto [code, output] = run_ssmtune(dir, args);
  INFO(output);
  REQUIRE(code == 0);
  CHECK(output.find("wrote " + out.string() + ": ") != std::string::npos);
  CHECK(output.find("wrote " + (dir / "sets/train.val.h5").string() + ": ") != std::string::npos);
  CHECK(output.find("read 40 lines") != std::string::npos);
  CHECK(output.find("masked out of the loss") != std::string::npos);
  const TokenDataset train = TokenDataset::open(out.string());
  const TokenDataset val = TokenDataset::open((dir / "sets/train.val.h5").string());
  CHECK(train.info().num_documents + val.info().num_documents == 40);
  CHECK(train.info().has_loss_mask);

  // A bad line 7: nothing is written, the earlier files stay, one error line names file:line.
  std::ofstream(dir / "bad.jsonl") << instruction_jsonl(6) << "{\"instruction\": \"x\", \"output\": 3}\n"
                                   << instruction_jsonl(3);
  const fs::path bad_out = dir / "bad.h5";
  args = common;
  args[6] = bad_out.string();
  args.insert(args.end(), {"--input", (dir / "bad.jsonl").string()});
  std::tie(code, output) = run_ssmtune(dir, args);
  CHECK(code == 1);
  CHECK(output.find("ssmtune: error: " + (dir / "bad.jsonl").string() +
                    ":7: wrongly typed field: field \"output\" has type number, expected string") != std::string::npos);
  CHECK_FALSE(fs::exists(bad_out));
  CHECK_FALSE(fs::exists(dir / "bad.val.h5"));

  args.insert(args.end(), {"--on-error", "skip"});
  std::tie(code, output) = run_ssmtune(dir, args);
  CHECK(code == 0);
  CHECK(output.find("warning: skipped " + (dir / "bad.jsonl").string() + ":7: wrongly typed field") !=
        std::string::npos);
  CHECK(output.find("skipped 1: wrongly typed field 1") != std::string::npos);
  const uint64_t documents = TokenDataset::open(bad_out.string()).info().num_documents +
                             TokenDataset::open((dir / "bad.val.h5").string()).info().num_documents;
  CHECK(documents == 9);
}

TEST_CASE("prepared instruction data trains, with validation, through ssmtune train") {
  test::ScratchDir dir("prepare-train");
  std::ofstream(dir / "data.jsonl") << instruction_jsonl(30);
  const Tokenizer tokenizer = Tokenizer::load(kTokenizer);
  PrepareOptions options;
  options.format = RecordFormat::instruction;
  // Short prompts, so that every validation window holds response tokens to score.
  options.instruction_template = {"Q: {instruction}\nIn: {input}\nA:\n", "Q: {instruction}\nA:\n"};
  options.val_fraction = 0.3;
  prepare_dataset(tokenizer, (dir / "data.jsonl").string(), (dir / "train.h5").string(), (dir / "val.h5").string(),
                  options);
  write_random_mamba(dir / "model", tiny_config(tokenizer.vocab_size()), 1);
  auto [code, output] = run_ssmtune(
      dir, {"train", "--config", std::string(SSMTUNE_SOURCE_DIR) + "/recipes/configs/demo.yaml", "device=cpu",
            "model.path=" + (dir / "model").string(), "data.path=" + (dir / "train.h5").string(),
            "data.val_path=" + (dir / "val.h5").string(), "train.output_dir=" + (dir / "out").string(),
            "data.seq_len=32", "train.batch_size=2", "train.max_steps=3", "train.save_every=0", "eval.every=3",
            "eval.batches=1", "memory.scan_chunk=16", "memory.loss_slice=32"});
  INFO(output);
  REQUIRE(code == 0);
  std::ifstream metrics(dir / "out/metrics.jsonl");
  std::string line, all;
  while (std::getline(metrics, line)) all += line + "\n";
  CHECK(all.find("\"val_loss\"") != std::string::npos);
}

namespace {

// What forward_backward gives for one sequence: the loss and every adapter gradient.
struct LossAndGrads {
  double loss;
  std::vector<double> grads;
};

}  // namespace

TEST_CASE("tokens under loss mask 0 contribute nothing to the loss or the adapter gradients") {
  test::ScratchDir dir("prepare-mask");
  std::ofstream(dir / "data.jsonl") << instruction_jsonl(4);
  const Tokenizer tokenizer = Tokenizer::load(kTokenizer);
  PrepareOptions options;
  options.format = RecordFormat::instruction;
  prepare_dataset(tokenizer, (dir / "data.jsonl").string(), (dir / "train.h5").string(), "", options);
  const TokenDataset dataset = TokenDataset::open((dir / "train.h5").string());
  const MambaConfig config = tiny_config(tokenizer.vocab_size());
  write_random_mamba(dir / "model", config, 2);

  const std::unique_ptr<Backend> backend = make_cpu_backend(DType::F32);
  const MambaWeights weights = MambaWeights::load(dir / "model", *backend);
  LoraConfig lora;
  lora.rank = 4;
  LoraAdapters adapters(*backend, config, lora);
  std::mt19937_64 rng(7);  // B is zero at PEFT's init, which would hide A's gradients: random values instead
  adapters.upload(adapters.params(), test::random_values(adapters.numel(), rng, -0.3, 0.3));
  const int64_t L = 24;
  TrainStep step(*backend, weights, adapters, StepShape{1, L, 8, true, 16});

  auto run = [&](const std::vector<uint32_t>& tokens, const std::vector<uint8_t>& mask) {
    backend->fill_zero(adapters.grads(), adapters.numel() * dtype_size(adapters.dtype()));
    const double loss = step.forward_backward(tokens.data(), mask.data(), 1.0, 0, 0);
    return LossAndGrads{loss, adapters.download(adapters.grads())};
  };
  // The window of L+1 tokens ending at token `last`; the last token is only a target, never an input,
  // so changing it changes nothing but what that one position is scored against.
  auto window = [&](uint64_t last) {
    std::vector<uint32_t> tokens(L + 1);
    std::vector<uint8_t> mask(L);
    dataset.read_tokens(last - L, L + 1, tokens.data());
    dataset.read_loss_mask(last - L + 1, L, mask.data());
    return std::pair{tokens, mask};
  };
  auto with_other_last = [&](std::vector<uint32_t> tokens) {
    tokens.back() = (tokens.back() + 1) % tokenizer.vocab_size();
    return tokens;
  };

  // Ending a few tokens into document 1's prompt: document 0's response and EOS (trained) come before.
  const uint64_t prompt_token = dataset.doc_offsets()[1] + 5;
  const auto [prompt_tokens, prompt_mask] = window(prompt_token);
  REQUIRE(prompt_mask.back() == 0);
  REQUIRE(std::count(prompt_mask.begin(), prompt_mask.end(), 1) > 5);  // the window does train on something
  const LossAndGrads base = run(prompt_tokens, prompt_mask);
  REQUIRE(base.loss > 0);
  const LossAndGrads changed_prompt = run(with_other_last(prompt_tokens), prompt_mask);
  CHECK(changed_prompt.loss == base.loss);
  CHECK(changed_prompt.grads == base.grads);

  // Ending inside document 0's response (its EOS is the last token before document 1).
  const uint64_t response_token = dataset.doc_offsets()[1] - 3;
  const auto [response_tokens, response_mask] = window(response_token);
  REQUIRE(response_mask.back() == 1);
  const LossAndGrads response = run(response_tokens, response_mask);
  const LossAndGrads changed_response = run(with_other_last(response_tokens), response_mask);
  CHECK(changed_response.loss != response.loss);
  CHECK(changed_response.grads != response.grads);
}
