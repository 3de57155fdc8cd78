// The byte-level BPE tokenizer: every id of the HF golden encodings (tests/data/fixtures/tokenizer/,
// written by make_tokenizer_fixtures.py with tokenizers 0.23.3), decode(encode(x)) on arbitrary bytes,
// the merge order and the split pattern on their own, and the errors for files it cannot read.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "data/bpe_merges.h"
#include "data/tokenizer.h"
#include "data/unicode_text.h"
#include "framework/error.h"
#include "tests/catch.h"

using namespace ssmtune;
using nlohmann::json;
namespace fs = std::filesystem;

namespace {

const std::string fixture_dir = std::string(SSMTUNE_SOURCE_DIR) + "/tests/data/fixtures/tokenizer/";

json read_json(const std::string& path) {
  std::ifstream in(path);
  REQUIRE(in);
  return json::parse(in);
}

const Tokenizer& fixture_tokenizer() {
  static const Tokenizer tokenizer = Tokenizer::load(fixture_dir + "tokenizer.json");
  return tokenizer;
}

// Writes `file` as a tokenizer.json, loads it and returns the Error's message ("" when it loads).
std::string load_error(const json& file) {
  const fs::path path = fs::temp_directory_path() / ("ssmtune-test-tokenizer-" + std::to_string(getpid()) + ".json");
  std::ofstream(path) << file.dump();
  std::string message;
  try {
    Tokenizer::load(path.string());
  } catch (const Error& e) {
    message = e.what();
  }
  fs::remove(path);
  return message;
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

}  // namespace

TEST_CASE("encode matches every id of the HF golden encodings") {
  const Tokenizer& tokenizer = fixture_tokenizer();
  const json golden = read_json(fixture_dir + "golden.json");
  REQUIRE(golden.at("cases").size() >= 40);
  for (const json& c : golden.at("cases")) {
    const auto text = c.at("text").get<std::string>();
    const auto expected = c.at("ids").get<std::vector<uint32_t>>();
    INFO("text: " << json(text).dump());
    CHECK(tokenizer.encode(text) == expected);
    CHECK(tokenizer.normalize(text) == c.at("normalized").get<std::string>());
    CHECK(tokenizer.decode(expected) == c.at("normalized").get<std::string>());
  }
}

TEST_CASE("decode(encode(x)) gives normalize(x) back for arbitrary bytes, invalid UTF-8 included") {
  const Tokenizer& tokenizer = fixture_tokenizer();
  std::mt19937 rng(8);
  // Bytes drawn from ASCII letters, whitespace, UTF-8 lead and continuation bytes and stray bytes, so
  // strings mix valid multi-byte characters, combining marks and invalid sequences.
  const std::string alphabet = std::string("ab Z9'\t\n\r.<|>") + "\xC3\xA9\xCC\x81\xE6\x97\xA5\xF0\x9F\x99\x82\x80\xBF\xFF\xC0\xED";
  for (int trial = 0; trial < 2000; ++trial) {
    std::string x(rng() % 40, '\0');
    for (char& c : x) c = alphabet[rng() % alphabet.size()];
    if (trial % 7 == 0) x += "<|endoftext|>" + x;
    INFO("x: " << json(x).dump(-1, ' ', false, json::error_handler_t::replace));
    CHECK(tokenizer.decode(tokenizer.encode(x)) == tokenizer.normalize(x));
  }
  // Fully random bytes are almost never valid UTF-8 beyond ASCII, so normalization leaves them alone.
  for (int trial = 0; trial < 500; ++trial) {
    std::string x(rng() % 64, '\0');
    for (char& c : x) c = static_cast<char>(rng() % 256);
    CHECK(tokenizer.decode(tokenizer.encode(x)) == tokenizer.normalize(x));
  }
}

TEST_CASE("normalization composes valid runs and keeps invalid bytes in place") {
  CHECK(nfc_normalize("e\xCC\x81") == "\xC3\xA9");
  CHECK(nfc_normalize("e\xCC\x81\xFF" "A\xCC\x8A") == "\xC3\xA9\xFF\xC3\x85");
  CHECK(nfc_normalize(std::string("a\0b", 3)) == std::string("a\0b", 3));
  // An invalid byte between a letter and a combining mark stops them composing.
  CHECK(nfc_normalize("e\x80\xCC\x81") == "e\x80\xCC\x81");
  const Tokenizer& tokenizer = fixture_tokenizer();
  CHECK(tokenizer.encode("\xFF") == std::vector<uint32_t>{*tokenizer.token_id(byte_level_char(0xFF))});
}

TEST_CASE("the GPT-2 split keeps the last space of a run for the next word") {
  Gpt2Splitter splitter;
  auto split = [&](std::string_view text) {
    std::vector<std::string_view> pieces;
    splitter.split(text, pieces);
    return std::vector<std::string>(pieces.begin(), pieces.end());
  };
  using V = std::vector<std::string>;
  CHECK(split("x   y") == V{"x", "  ", " y"});
  CHECK(split("x   ") == V{"x", "   "});
  CHECK(split("a\n\n b") == V{"a", "\n\n", " b"});
  CHECK(split("it's 42!") == V{"it", "'s", " 42", "!"});
  CHECK(split("\xC3\xA9t\xC3\xA9 \xE6\x97\xA5") == V{"\xC3\xA9t\xC3\xA9", " \xE6\x97\xA5"});
  // Invalid bytes match nothing and stay as pieces of their own.
  CHECK(split("ab\xFF\xFE" "cd") == V{"ab", "\xFF\xFE", "cd"});
}

TEST_CASE("BPE merges the lowest rank first and, among equal ranks, the leftmost pair") {
  BpeMerges merges;
  REQUIRE(merges.add(1, 1, 10));  // rank 0: a a -> A
  REQUIRE(merges.add(2, 3, 11));  // rank 1: b c -> B
  REQUIRE(merges.add(1, 11, 12)); // rank 2: a B -> C
  REQUIRE_FALSE(merges.add(1, 1, 13));
  std::vector<uint32_t> word{1, 1, 1};
  merges.apply(word);
  CHECK(word == std::vector<uint32_t>{10, 1});
  word = {1, 2, 3};
  merges.apply(word);
  CHECK(word == std::vector<uint32_t>{12});
  word = {1, 1, 2, 3};  // a a merges first (rank 0), leaving A B, which has no merge
  merges.apply(word);
  CHECK(word == std::vector<uint32_t>{10, 11});
  word = {4};
  merges.apply(word);
  CHECK(word == std::vector<uint32_t>{4});
}

TEST_CASE("unsupported or broken tokenizer files fail naming the file and the key") {
  const json good = read_json(fixture_dir + "tokenizer.json");
  CHECK(load_error(good).empty());
  auto with = [&](const std::function<void(json&)>& change) {
    json file = good;
    change(file);
    return load_error(file);
  };
  auto check = [](const std::string& message, const std::string& key) {
    INFO(message);
    CHECK(contains(message, "ssmtune-test-tokenizer-"));
    CHECK(contains(message, key));
  };
  check(with([](json& f) { f["model"]["type"] = "WordPiece"; }), "'model.type'");
  check(with([](json& f) { f["pre_tokenizer"] = {{"type", "Metaspace"}}; }), "'pre_tokenizer.type'");
  check(with([](json& f) { f["pre_tokenizer"] = nullptr; }), "'pre_tokenizer.type'");
  check(with([](json& f) { f["normalizer"] = {{"type", "NFKC"}}; }), "'normalizer.type'");
  check(with([](json& f) { f["decoder"] = {{"type", "WordPiece"}}; }), "'decoder.type'");
  check(with([](json& f) { f["model"]["dropout"] = 0.1; }), "'model.dropout'");
  check(with([](json& f) { f["model"].erase("merges"); }), "'model.merges'");
  check(with([](json& f) { f["model"]["merges"].push_back({"Ġ", "nosuchtoken"}); }), "'model.merges[");
  check(with([](json& f) { f["model"]["vocab"].erase("Ġ"); }), "'model.vocab'");
  check(with([](json& f) { f["added_tokens"][0]["lstrip"] = true; }), "'added_tokens[0].lstrip'");
  check(with([](json& f) { f.erase("added_tokens"); }), "'added_tokens'");
  // Ids far past the number of tokens: the decode table used to be sized by them (2^31 - 1: ~80 GB), and
  // 2^32 - 1 wrapped the size to 0 and wrote past the table's end.
  check(with([](json& f) { f["model"]["vocab"]["Ġ"] = 2147483647; }), "'model.vocab' maps \"Ġ\" to 2147483647");
  check(with([](json& f) { f["added_tokens"][0]["id"] = 4294967295u; }), "'added_tokens[0].id' is 4294967295");
  check(with([](json& f) { f["added_tokens"][0]["id"] = -1; }), "'added_tokens[0].id' is -1");
  CHECK(contains(load_error(json::array()), "'normalizer'"));
  CHECK(contains(load_error(json("x")), "missing"));
  {  // nesting that would overflow the stack wherever a value is copied or printed
    json deep = json::array();
    for (int i = 0; i < 200; ++i) deep = json::array({deep});
    check(with([&](json& f) { f["normalizer"] = deep; }), "nested deeper than 128 levels");
  }
  try {
    Tokenizer::load(fixture_dir + "no-such-file.json");
    FAIL("expected an Error");
  } catch (const Error& e) {
    CHECK(contains(e.what(), "no-such-file.json"));
  }
  try {
    fixture_tokenizer().decode(std::vector<uint32_t>{fixture_tokenizer().vocab_size()});
    FAIL("expected an Error");
  } catch (const Error& e) {
    CHECK(contains(e.what(), "token id"));
  }
}
