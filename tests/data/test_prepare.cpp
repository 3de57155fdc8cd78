// JSONL -> token datasets (data/prepare.h) with the committed fixture tokenizer: each format's tokens,
// loss mask and document offsets against Tokenizer::encode of the documented rendering; the prompt
// templates; every kind of malformed line, failing and skipped; the validation split's determinism;
// and outputs that stay untouched when preparation fails.
#include <fstream>
#include <random>
#include <sstream>

#include "data/prepare.h"
#include "data/token_dataset.h"
#include "data/tokenizer.h"
#include "framework/error.h"
#include "tests/catch.h"
#include "tests/framework/error_message.h"
#include "tests/framework/scratch_dir.h"

using namespace ssmtune;
namespace fs = std::filesystem;
using test::contains;
using test::error_message;

namespace {

const Tokenizer& fixture_tokenizer() {
  static const Tokenizer tokenizer =
      Tokenizer::load(std::string(SSMTUNE_SOURCE_DIR) + "/tests/data/fixtures/tokenizer/tokenizer.json");
  return tokenizer;
}

// The fixture's <|endoftext|>.
constexpr uint32_t kEos = 0;

// A whole dataset file read back.
struct Contents {
  std::vector<uint32_t> tokens;
  std::vector<uint8_t> mask;
  std::vector<uint64_t> doc_offsets;
  TokenDatasetInfo info;
};
Contents read_dataset(const fs::path& path) {
  const TokenDataset dataset = TokenDataset::open(path.string());
  Contents c;
  c.info = dataset.info();
  c.doc_offsets = dataset.doc_offsets();
  c.tokens.resize(c.info.num_tokens);
  c.mask.resize(c.info.num_tokens);
  dataset.read_tokens(0, c.info.num_tokens, c.tokens.data());
  dataset.read_loss_mask(0, c.info.num_tokens, c.mask.data());
  return c;
}

// What a file should hold, built from the rendered strings: each segment encoded on its own.
struct Expected {
  std::vector<uint32_t> tokens;
  std::vector<uint8_t> mask;
  std::vector<uint64_t> doc_offsets{0};
  void segment(const std::string& text, bool trained) {
    for (uint32_t id : fixture_tokenizer().encode(text)) {
      tokens.push_back(id);
      mask.push_back(trained);
    }
  }
  void end_document(bool eos_trained) {
    tokens.push_back(kEos);
    mask.push_back(eos_trained);
    doc_offsets.push_back(tokens.size());
  }
};

void check_contents(const Contents& got, const Expected& expected) {
  CHECK(got.tokens == expected.tokens);
  CHECK(got.mask == expected.mask);
  CHECK(got.doc_offsets == expected.doc_offsets);
  CHECK(got.info.eos_id == kEos);
  CHECK(got.info.vocab_size == fixture_tokenizer().vocab_size());
}

PrepareOptions options_for(RecordFormat format) {
  PrepareOptions options;
  options.format = format;
  return options;
}

PrepareSummary prepare(const std::string& jsonl, const fs::path& out, const PrepareOptions& options,
                       const fs::path& val_out = {}) {
  std::istringstream input(jsonl);
  return prepare_dataset(fixture_tokenizer(), input, "data.jsonl", out.string(), val_out.string(), options);
}

const std::string kAlpacaWithInput =
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n";
const std::string kAlpacaNoInput =
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n";

}  // namespace

TEST_CASE("text: one document per line, EOS after each, every token trained") {
  test::ScratchDir dir("prepare-text");
  const std::string a = "Hello world, it's 2024.", b = "Ünïcode  spaces\n\ttabs and 中文 🙂";
  const PrepareSummary summary =
      prepare("{\"text\": \"Hello world, it's 2024.\"}\n{\"text\": \"Ünïcode  spaces\\n\\ttabs and 中文 🙂\", "
              "\"source\": 3}\r\n",
              dir / "out.h5", options_for(RecordFormat::text));
  Expected expected;
  expected.segment(a, true);
  expected.end_document(true);
  expected.segment(b, true);
  expected.end_document(true);
  const Contents got = read_dataset(dir / "out.h5");
  check_contents(got, expected);
  CHECK_FALSE(got.info.has_loss_mask);  // all ones: the file says so by having no mask
  CHECK(summary.lines == 2);
  CHECK(summary.train.documents == 2);
  CHECK(summary.train.tokens == expected.tokens.size());
  CHECK(summary.train.trained_tokens == expected.tokens.size());
  CHECK(summary.skipped.empty());
  CHECK_FALSE(fs::exists(dir / "out.h5.tmp"));
}

TEST_CASE("instruction: the Alpaca prompts are context, output and EOS are trained") {
  test::ScratchDir dir("prepare-instruction");
  // With an input; with an empty input and with none (both take the prompt without input); and
  // values containing the placeholders, which are not expanded again.
  const std::string jsonl =
      R"({"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5"})"
      "\n"
      R"({"instruction": "Name a colour.", "input": "", "output": "Blue."})"
      "\n"
      R"({"instruction": "Say {input}", "output": "{instruction}"})"
      "\n"
      R"({"instruction": "Echo", "input": "{instruction}", "output": "ok", "id": 7})"
      "\n";
  const PrepareSummary summary = prepare(jsonl, dir / "out.h5", options_for(RecordFormat::instruction));
  Expected expected;
  expected.segment(kAlpacaWithInput + "Add the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n", false);
  expected.segment("2 + 3 = 5", true);
  expected.end_document(true);
  expected.segment(kAlpacaNoInput + "Name a colour.\n\n### Response:\n", false);
  expected.segment("Blue.", true);
  expected.end_document(true);
  expected.segment(kAlpacaNoInput + "Say {input}\n\n### Response:\n", false);
  expected.segment("{instruction}", true);
  expected.end_document(true);
  expected.segment(kAlpacaWithInput + "Echo\n\n### Input:\n{instruction}\n\n### Response:\n", false);
  expected.segment("ok", true);
  expected.end_document(true);
  const Contents got = read_dataset(dir / "out.h5");
  check_contents(got, expected);
  CHECK(got.info.has_loss_mask);
  const auto trained = static_cast<uint64_t>(std::count(expected.mask.begin(), expected.mask.end(), 1));
  CHECK(summary.train.trained_tokens == trained);
  CHECK(trained < expected.tokens.size() / 3);  // the prompts dominate: the mask is not all ones
}

TEST_CASE("instruction: a template file replaces the prompts, and bad template files are errors") {
  test::ScratchDir dir("prepare-template");
  const fs::path path = dir / "template.yaml";
  std::ofstream(path) << "prompt_input: |\n  Q: {instruction}\n  Context: {input}\n  A:\n"
                         "prompt_no_input: \"Q: {instruction}\\nA: \"\n";
  PrepareOptions options = options_for(RecordFormat::instruction);
  options.instruction_template = PromptTemplate::load(path.string());
  CHECK(options.instruction_template.prompt_input == "Q: {instruction}\nContext: {input}\nA:\n");
  CHECK(options.instruction_template.prompt_no_input == "Q: {instruction}\nA: ");
  prepare(R"({"instruction": "Why?", "input": "Sky", "output": "Light."})"
          "\n"
          R"({"instruction": "How?", "output": "So."})",
          dir / "out.h5", options);
  Expected expected;
  expected.segment("Q: Why?\nContext: Sky\nA:\n", false);
  expected.segment("Light.", true);
  expected.end_document(true);
  expected.segment("Q: How?\nA: ", false);
  expected.segment("So.", true);
  expected.end_document(true);
  check_contents(read_dataset(dir / "out.h5"), expected);

  auto load_error = [&](const std::string& yaml) {
    std::ofstream(path) << yaml;
    return error_message([&] { PromptTemplate::load(path.string()); });
  };
  CHECK(contains(load_error("prompt_input: \"{instruction} {input}\"\n"), "missing key prompt_no_input"));
  CHECK(contains(load_error("prompt_input: \"{instruction}\"\nprompt_no_input: \"{instruction}\"\n"),
                 "prompt_input does not contain {input}"));
  CHECK(contains(load_error("prompt_input: \"{instruction}{input}\"\nprompt_no_input: \"{input}{instruction}\"\n"),
                 "prompt_no_input contains {input}"));
  CHECK(contains(load_error("prompt_input: \"{input}\"\nprompt_no_input: \"x\"\n"),
                 "prompt_input does not contain {instruction}"));
  CHECK(contains(load_error("prompt_input: \"{instruction}{input}\"\nprompt_no_input: \"{instruction}\"\nsystem: x\n"),
                 "unknown key system"));
  CHECK(contains(load_error("prompt_input: [1, 2]\nprompt_no_input: \"{instruction}\"\n"), "must be a string"));
  CHECK(contains(load_error("prompt_input: [unclosed\n"), path.string() + ": not valid YAML"));
  CHECK(contains(error_message([&] { PromptTemplate::load((dir / "none.yaml").string()); }), "cannot open"));
}

TEST_CASE("chat: only the assistant's turns (content and end marker) are trained") {
  test::ScratchDir dir("prepare-chat");
  const std::string jsonl =
      R"({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},)"
      R"( {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Sum 2 3"},)"
      R"( {"role": "assistant", "content": "5"}]})"
      "\n"
      R"({"messages": [{"role": "user", "content": "A"}, {"role": "assistant", "content": ""},)"
      R"( {"role": "user", "content": "B"}]})"
      "\n";
  const PrepareSummary summary = prepare(jsonl, dir / "out.h5", options_for(RecordFormat::chat));
  Expected expected;
  expected.segment("<|system|>\nBe brief.<|end|>\n<|user|>\nHi!<|end|>\n<|assistant|>\n", false);
  expected.segment("Hello.<|end|>\n", true);
  expected.segment("<|user|>\nSum 2 3<|end|>\n<|assistant|>\n", false);
  expected.segment("5<|end|>\n", true);
  expected.end_document(true);
  // Ending with the user's turn: EOS is not trained either.
  expected.segment("<|user|>\nA<|end|>\n<|assistant|>\n", false);
  expected.segment("<|end|>\n", true);
  expected.segment("<|user|>\nB<|end|>\n", false);
  expected.end_document(false);
  check_contents(read_dataset(dir / "out.h5"), expected);
  CHECK(summary.train.documents == 2);
}

namespace {

struct Malformed {
  std::string line;
  LineProblem problem;
  std::string detail;  // a part of the message
};

std::string deeply_nested() {
  std::string line = "{\"text\": ";
  for (int i = 0; i < 200; ++i) line += "[";
  for (int i = 0; i < 200; ++i) line += "]";
  return line + "}";
}

}  // namespace

TEST_CASE("malformed lines: fail names file:line and the problem, skip counts each kind") {
  test::ScratchDir dir("prepare-malformed");
  const std::string good_text = R"({"text": "fine"})";
  const std::vector<Malformed> text_cases{
      {"", LineProblem::empty_line, "empty line"},
      {"   \t", LineProblem::empty_line, "empty line"},
      {"{\"text\": \"caf\xC3\"}", LineProblem::invalid_utf8, "invalid UTF-8: at byte 14"},
      {"{\"text\": \"a\xFF\"}", LineProblem::invalid_utf8, "invalid UTF-8"},
      {R"({"text": "unterminated)", LineProblem::bad_json, "bad JSON"},
      {R"({"text": "a"} trailing)", LineProblem::bad_json, "bad JSON"},
      {deeply_nested(), LineProblem::bad_json, "nested deeper than 128"},
      {R"(["text", "a"])", LineProblem::not_an_object, "not a JSON object: found type array"},
      {R"({"txt": "a"})", LineProblem::missing_field, "missing field: no field \"text\""},
      {R"({"text": 42})", LineProblem::wrong_type, "field \"text\" has type number, expected string"},
      {R"({"text": ""})", LineProblem::empty_field, "field \"text\" is empty"},
  };
  const std::vector<Malformed> instruction_cases{
      {R"({"instruction": "a"})", LineProblem::missing_field, "no field \"output\""},
      {R"({"instruction": "a", "input": 3, "output": "b"})", LineProblem::wrong_type,
       "field \"input\" has type number"},
      {R"({"instruction": "", "output": "b"})", LineProblem::empty_field, "field \"instruction\" is empty"},
  };
  const std::vector<Malformed> chat_cases{
      {R"({"messages": {}})", LineProblem::wrong_type, "field \"messages\" has type object, expected array"},
      {R"({"messages": []})", LineProblem::empty_field, "field \"messages\" is empty"},
      {R"({"messages": ["hi"]})", LineProblem::wrong_type, "messages[0] has type string"},
      {R"({"messages": [{"role": "user"}]})", LineProblem::missing_field, "no field \"messages[0].content\""},
      {R"({"messages": [{"role": "tool", "content": "x"}]})", LineProblem::unknown_role,
       "\"messages[0].role\" is \"tool\", expected system, user or assistant"},
      {R"({"messages": [{"role": "user", "content": "x"}]})", LineProblem::no_assistant_turn, "no assistant turn"},
  };
  const std::string good_instruction = R"({"instruction": "a", "output": "b"})";
  const std::string good_chat = R"({"messages": [{"role": "assistant", "content": "x"}]})";
  const std::vector<std::tuple<RecordFormat, std::string, std::vector<Malformed>>> groups{
      {RecordFormat::text, good_text, text_cases},
      {RecordFormat::instruction, good_instruction, instruction_cases},
      {RecordFormat::chat, good_chat, chat_cases}};

  for (const auto& [format, good, cases] : groups) {
    for (const Malformed& c : cases) {
      INFO(c.line);
      // Line 2 of three: fail stops there, with nothing written.
      const std::string jsonl = good + "\n" + c.line + "\n" + good + "\n";
      const PrepareOptions fail_options = options_for(format);  // clang 14 lambdas cannot capture bindings
      const std::string message = error_message([&] { prepare(jsonl, dir / "out.h5", fail_options); });
      CHECK(contains(message, "data.jsonl:2: " + std::string(describe(c.problem))));
      CHECK(contains(message, c.detail));
      CHECK(contains(message, "--on-error skip"));
      CHECK_FALSE(fs::exists(dir / "out.h5"));
      CHECK_FALSE(fs::exists(dir / "out.h5.tmp"));

      PrepareOptions skip = options_for(format);
      skip.skip_malformed = true;
      std::vector<std::string> reported;
      skip.on_skipped = [&](std::string_view m) { reported.emplace_back(m); };
      const PrepareSummary summary = prepare(jsonl, dir / "out.h5", skip);
      CHECK(summary.lines == 3);
      CHECK(summary.train.documents == 2);
      CHECK(summary.skipped == std::map<LineProblem, uint64_t>{{c.problem, 1}});
      REQUIRE(reported.size() == 1);
      CHECK(reported[0] == message.substr(0, message.find(" (--on-error skip")));
      CHECK(read_dataset(dir / "out.h5").info.num_documents == 2);
      fs::remove(dir / "out.h5");
    }
  }
}

TEST_CASE("documents longer than --max-tokens are skipped in either error mode, and all skipped is an error") {
  test::ScratchDir dir("prepare-max-tokens");
  const std::string short_line = R"({"text": "short"})", long_line = R"({"text": "a much longer line of text here"})";
  const size_t short_tokens = fixture_tokenizer().encode("short").size() + 1;
  PrepareOptions options = options_for(RecordFormat::text);
  options.max_tokens = short_tokens;  // EOS included: the short line fits exactly
  std::vector<std::string> reported;
  options.on_skipped = [&](std::string_view m) { reported.emplace_back(m); };
  const PrepareSummary summary = prepare(short_line + "\n" + long_line + "\n", dir / "out.h5", options);
  CHECK(summary.train.documents == 1);
  CHECK(summary.skipped == std::map<LineProblem, uint64_t>{{LineProblem::too_long, 1}});
  REQUIRE(reported.size() == 1);
  CHECK(contains(reported[0], "data.jsonl:2: longer than --max-tokens: "));

  const std::string message = error_message([&] { prepare(long_line + "\n", dir / "none.h5", options); });
  CHECK(contains(message, "no documents for the training set (1 lines, 1 skipped)"));
  CHECK_FALSE(fs::exists(dir / "none.h5"));
}

TEST_CASE("the validation split depends only on (seed, line), and outputs are deterministic") {
  test::ScratchDir dir("prepare-split");
  std::string jsonl;
  std::vector<std::string> texts;
  for (int i = 0; i < 200; ++i) {
    texts.push_back("document number " + std::to_string(i) + (i % 3 ? " with more words" : ""));
    jsonl += "{\"text\": \"" + texts.back() + "\"}\n";
  }
  PrepareOptions options = options_for(RecordFormat::text);
  options.val_fraction = 0.3;
  options.seed = 5;
  const PrepareSummary summary = prepare(jsonl, dir / "a.h5", options, dir / "a.val.h5");
  prepare(jsonl, dir / "b.h5", options, dir / "b.val.h5");
  const Contents train = read_dataset(dir / "a.h5"), val = read_dataset(dir / "a.val.h5");
  CHECK(summary.train.documents + summary.val.documents == 200);
  CHECK(summary.val.documents == val.info.num_documents);
  // 200 draws at 0.3: 60 expected, standard deviation 6.5; the seed is fixed, so this is exact.
  CHECK(summary.val.documents > 40);
  CHECK(summary.val.documents < 80);
  CHECK(read_dataset(dir / "b.h5").tokens == train.tokens);
  CHECK(read_dataset(dir / "b.val.h5").tokens == val.tokens);

  // Every document is in exactly one file, in input order, whole.
  Expected expected_train, expected_val;
  const auto decode_document = [](const Contents& c, size_t d) {
    return std::vector<uint32_t>(c.tokens.begin() + c.doc_offsets[d], c.tokens.begin() + c.doc_offsets[d + 1]);
  };
  size_t t = 0, v = 0;
  for (const std::string& text : texts) {
    std::vector<uint32_t> ids = fixture_tokenizer().encode(text);
    ids.push_back(kEos);
    if (t < train.info.num_documents && decode_document(train, t) == ids)
      ++t;
    else if (v < val.info.num_documents && decode_document(val, v) == ids)
      ++v;
  }
  CHECK(t == train.info.num_documents);
  CHECK(v == val.info.num_documents);

  // Another seed, another split; skipping a line moves no other line across.
  options.seed = 6;
  prepare(jsonl, dir / "c.h5", options, dir / "c.val.h5");
  CHECK(read_dataset(dir / "c.val.h5").tokens != val.tokens);
  options.seed = 5;
  options.skip_malformed = true;
  std::string with_bad_line = jsonl;
  with_bad_line.replace(0, with_bad_line.find('\n'), "{}");  // line 1 now lacks its text
  prepare(with_bad_line, dir / "d.h5", options, dir / "d.val.h5");
  std::vector<uint32_t> first = fixture_tokenizer().encode(texts[0]);
  first.push_back(kEos);
  const bool first_in_train = decode_document(train, 0) == first;
  const Contents& lost = first_in_train ? train : val;  // the file that loses line 1's document
  const Contents& kept = first_in_train ? val : train;
  const Contents d_lost = read_dataset(first_in_train ? dir / "d.h5" : dir / "d.val.h5");
  const Contents d_kept = read_dataset(first_in_train ? dir / "d.val.h5" : dir / "d.h5");
  CHECK(d_kept.tokens == kept.tokens);
  CHECK(d_lost.tokens ==
        std::vector<uint32_t>(lost.tokens.begin() + static_cast<int64_t>(first.size()), lost.tokens.end()));
}

TEST_CASE("a failed prepare leaves existing outputs as they were") {
  test::ScratchDir dir("prepare-untouched");
  const fs::path out = dir / "out.h5", val_out = dir / "out.val.h5";
  PrepareOptions options = options_for(RecordFormat::text);
  options.val_fraction = 0.5;
  std::string old_jsonl;
  for (int i = 0; i < 20; ++i) old_jsonl += "{\"text\": \"old " + std::to_string(i) + "\"}\n";
  prepare(old_jsonl, out, options, val_out);
  const Contents before = read_dataset(out), before_val = read_dataset(val_out);

  // A malformed last line, after documents went into both files.
  std::string jsonl;
  for (int i = 0; i < 50; ++i) jsonl += "{\"text\": \"line " + std::to_string(i) + "\"}\n";
  CHECK(contains(error_message([&] { prepare(jsonl + "{\"text\": 1}\n", out, options, val_out); }), "data.jsonl:51"));
  // No document falls into validation.
  options.val_fraction = 1e-9;
  CHECK(contains(error_message([&] { prepare(jsonl, out, options, val_out); }), "raise --val-fraction"));
  // The tokenizer lacks the end-of-document token.
  options.eos_token = "</s>";
  CHECK(contains(error_message([&] { prepare(jsonl, out, options, val_out); }), "no token '</s>'"));

  CHECK(read_dataset(out).tokens == before.tokens);
  CHECK(read_dataset(val_out).tokens == before_val.tokens);
  for (const fs::path& p : {out, val_out}) CHECK_FALSE(fs::exists(p.string() + ".tmp"));
}

TEST_CASE("option and path errors") {
  test::ScratchDir dir("prepare-options");
  const fs::path input = dir / "data.jsonl";
  std::ofstream(input) << "{\"text\": \"a\"}\n";
  PrepareOptions options = options_for(RecordFormat::text);
  auto run = [&](const fs::path& out, const fs::path& val_out) {
    return error_message(
        [&] { prepare_dataset(fixture_tokenizer(), input.string(), out.string(), val_out.string(), options); });
  };
  CHECK(contains(run(dir / "data.jsonl", {}), "the output would replace the input"));
  CHECK(contains(run(dir / "missing/out.h5", {}), "does its directory exist"));
  CHECK(contains(run(dir / "out.h5", dir / "val.h5"), "needs --val-fraction above 0"));
  options.val_fraction = 1;
  CHECK(contains(run(dir / "out.h5", dir / "val.h5"), "--val-fraction is 1, expected a number in [0, 1)"));
  options.val_fraction = 0.5;
  CHECK(contains(run(dir / "out.h5", dir / "./out.h5"), "the training and the validation file are both"));
  CHECK(contains(run(dir / "out.h5", {}), "needs a validation file"));
  CHECK(contains(error_message([&] {
                   prepare_dataset(fixture_tokenizer(), (dir / "absent.jsonl").string(), (dir / "out.h5").string(),
                                   "", options_for(RecordFormat::text));
                 }),
                 "absent.jsonl: cannot open"));
  CHECK(contains(error_message([] { parse_record_format("alpaca"); }), "known: text, instruction, chat"));
  CHECK(default_val_path("data/train.h5") == "data/train.val.h5");
  CHECK(default_val_path("train") == "train.val.h5");
  CHECK_FALSE(fs::exists(dir / "out.h5"));
}
