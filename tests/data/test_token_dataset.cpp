// The HDF5 token dataset: write/read round trips, the sampler's order and resumption, every error a
// user can meet with a bad file, and the demo data set's rule.
#include <hdf5.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <set>

#include "data/demo_dataset.h"
#include "data/token_dataset.h"
#include "framework/error.h"
#include "tests/catch.h"

using namespace ssmtune;
namespace fs = std::filesystem;

namespace {

// A fresh directory per test case, removed afterwards.
struct TempDir {
  fs::path dir;
  TempDir() {
    static int counter = 0;
    dir = fs::temp_directory_path() /
          ("ssmtune-test-token-dataset-" + std::to_string(getpid()) + "-" + std::to_string(counter++));
    fs::remove_all(dir);
    fs::create_directories(dir);
  }
  ~TempDir() { fs::remove_all(dir); }
  std::string file(const std::string& name) const { return (dir / name).string(); }
};

// The message of the ssmtune::Error that f throws; fails the test when it throws nothing.
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  FAIL("expected an ssmtune::Error");
  return {};
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

// Contents whose token i is i, so a read sequence shows where it started.
TokenDatasetContents counting_contents(uint64_t num_tokens, uint32_t vocab_size, bool with_mask) {
  TokenDatasetContents contents;
  contents.vocab_size = vocab_size;
  contents.eos_id = 0;
  for (uint64_t i = 0; i < num_tokens; ++i) contents.tokens.push_back(static_cast<uint32_t>(i % vocab_size));
  contents.doc_offsets = {0, num_tokens / 3, num_tokens / 3, num_tokens};  // includes an empty document
  if (with_mask) {
    std::vector<uint8_t> mask(num_tokens);
    for (uint64_t i = 0; i < num_tokens; ++i) mask[i] = i % 3 != 0;
    contents.loss_mask = mask;
  }
  return contents;
}

hsize_t stored_token_bytes(const std::string& path) {
  hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  hid_t dataset = H5Dopen2(file, "tokens", H5P_DEFAULT);
  hid_t type = H5Dget_type(dataset);
  const hsize_t bytes = H5Tget_size(type);
  H5Tclose(type);
  H5Dclose(dataset);
  H5Fclose(file);
  return bytes;
}

void check_round_trip(const std::string& path, const TokenDatasetContents& contents) {
  write_token_dataset(path, contents);
  CHECK_FALSE(fs::exists(path + ".tmp"));
  TokenDataset dataset = TokenDataset::open(path);
  const TokenDatasetInfo& info = dataset.info();
  CHECK(dataset.path() == path);
  CHECK(info.num_tokens == contents.tokens.size());
  CHECK(info.num_documents == contents.doc_offsets.size() - 1);
  CHECK(info.vocab_size == contents.vocab_size);
  CHECK(info.eos_id == contents.eos_id);
  CHECK(info.has_loss_mask == contents.loss_mask.has_value());
  CHECK(dataset.doc_offsets() == contents.doc_offsets);

  const uint64_t n = info.num_tokens;
  std::vector<uint32_t> tokens(n);
  dataset.read_tokens(0, n, tokens.data());
  CHECK(tokens == contents.tokens);
  std::vector<uint8_t> mask(n);
  dataset.read_loss_mask(0, n, mask.data());
  CHECK(mask == contents.loss_mask.value_or(std::vector<uint8_t>(n, 1)));

  // A range crossing the first 64 Ki-element chunk boundary, read by hyperslab.
  const uint64_t begin = 65536 - 7, count = 20;
  std::vector<uint32_t> part(count);
  dataset.read_tokens(begin, count, part.data());
  CHECK(std::equal(part.begin(), part.end(), contents.tokens.begin() + begin));
  std::vector<uint8_t> part_mask(count);
  dataset.read_loss_mask(begin, count, part_mask.data());
  CHECK(std::equal(part_mask.begin(), part_mask.end(), mask.begin() + begin));

  CHECK(contains(error_of([&] { dataset.read_tokens(n - 2, 3, part.data()); }), path));
  CHECK(contains(error_of([&] { dataset.read_loss_mask(n + 1, 0, part_mask.data()); }), path));
}

}  // namespace

TEST_CASE("token dataset round trip", "[data]") {
  TempDir temp;
  SECTION("uint16 tokens with a loss mask") {
    const std::string path = temp.file("small_vocab.h5");
    check_round_trip(path, counting_contents(100000, 65536, true));
    CHECK(stored_token_bytes(path) == 2);
  }
  SECTION("uint32 tokens without a loss mask") {
    const std::string path = temp.file("large_vocab.h5");
    check_round_trip(path, counting_contents(100000, 70000, false));
    CHECK(stored_token_bytes(path) == 4);
  }
  SECTION("the writer replaces an existing file and rejects contents the reader would reject") {
    const std::string path = temp.file("replaced.h5");
    write_token_dataset(path, counting_contents(100000, 100, false));
    check_round_trip(path, counting_contents(70000, 1000, true));

    TokenDatasetContents bad = counting_contents(10, 100, true);
    bad.tokens[4] = 100;
    CHECK(contains(error_of([&] { write_token_dataset(path, bad); }), "position 4"));
    bad = counting_contents(10, 100, true);
    bad.doc_offsets.back() = 9;
    CHECK(contains(error_of([&] { write_token_dataset(path, bad); }), path));
    bad = counting_contents(10, 100, true);
    bad.loss_mask->pop_back();
    CHECK(contains(error_of([&] { write_token_dataset(path, bad); }), "loss_mask"));
    CHECK(TokenDataset::open(path).info().num_tokens == 70000);  // the old file is untouched
  }
}

namespace {

// Reads `count` sequences; each is identified by its first token, which (for counting_contents)
// is its start position.
std::vector<uint32_t> take_starts(SequenceSampler& sampler, int64_t seq_len, uint64_t count) {
  std::vector<uint32_t> tokens(seq_len + 1);
  std::vector<uint8_t> mask(seq_len);
  std::vector<uint32_t> starts;
  for (uint64_t s = 0; s < count; ++s) {
    sampler.next(tokens.data(), mask.data());
    starts.push_back(tokens[0]);
  }
  return starts;
}

}  // namespace

TEST_CASE("sequence sampler", "[data]") {
  TempDir temp;
  const std::string path = temp.file("counting.h5");
  // 1003 tokens with seq_len 10: (1003-1)/10 = 100 sequences; the last 2 tokens are never a start.
  const int64_t seq_len = 10;
  write_token_dataset(path, counting_contents(1003, 1u << 20, true));
  TokenDataset dataset = TokenDataset::open(path);

  SECTION("each sequence once per epoch, with the tokens and target mask it should have") {
    SequenceSampler sampler(dataset, seq_len, 7);
    REQUIRE(sampler.sequences_per_epoch() == 100);
    std::vector<uint32_t> tokens(seq_len + 1);
    std::vector<uint8_t> mask(seq_len);
    std::vector<int32_t> doc_start(seq_len);
    for (uint64_t epoch = 0; epoch < 2; ++epoch) {
      std::set<uint32_t> starts;
      for (int s = 0; s < 100; ++s) {
        CHECK(sampler.position().epoch == epoch);
        CHECK(sampler.position().index == static_cast<uint64_t>(s));
        sampler.next(tokens.data(), mask.data(), doc_start.data());
        const uint32_t start = tokens[0];
        CHECK(start % seq_len == 0);
        for (int64_t t = 0; t <= seq_len; ++t) CHECK(tokens[t] == start + t);
        // The mask of the predicted token t+1 (counting_contents masks positions divisible by 3), and 0
        // where that token starts a document (334: the documents are [0, 334), an empty one, [334, 1003)).
        for (int64_t t = 0; t < seq_len; ++t) CHECK(mask[t] == ((start + t + 1) % 3 != 0 && start + t + 1 != 334));
        // Each input's document start within the sequence; 0 for the document the sequence starts in.
        for (int64_t t = 0; t < seq_len; ++t)
          CHECK(doc_start[t] == (start < 334 && start + t >= 334 ? 334 - static_cast<int32_t>(start) : 0));
        starts.insert(start);
      }
      CHECK(starts.size() == 100);
      CHECK(*starts.rbegin() == 990);
    }
    CHECK(sampler.position().epoch == 2);
  }

  SECTION("the order is fixed by the seed, differs between seeds and is reshuffled each epoch") {
    SequenceSampler first(dataset, seq_len, 7), second(dataset, seq_len, 7), other(dataset, seq_len, 8);
    const auto stream = take_starts(first, seq_len, 200);
    CHECK(stream == take_starts(second, seq_len, 200));
    CHECK(stream != take_starts(other, seq_len, 200));
    const std::vector<uint32_t> epoch0(stream.begin(), stream.begin() + 100);
    const std::vector<uint32_t> epoch1(stream.begin() + 100, stream.end());
    CHECK(epoch0 != epoch1);
    std::vector<uint32_t> sorted = epoch0;
    std::sort(sorted.begin(), sorted.end());
    CHECK(epoch0 != sorted);
  }

  SECTION("the shuffle is uniform: each sequence lands in each slot equally often") {
    const std::string small_path = temp.file("five_sequences.h5");
    write_token_dataset(small_path, counting_contents(51, 1u << 20, false));
    TokenDataset small = TokenDataset::open(small_path);
    SequenceSampler sampler(small, seq_len, 5);
    REQUIRE(sampler.sequences_per_epoch() == 5);
    const int epochs = 4000;
    int count[5][5] = {};
    const auto starts = take_starts(sampler, seq_len, 5 * epochs);
    for (size_t s = 0; s < starts.size(); ++s) ++count[s % 5][starts[s] / seq_len];
    // Expected 800 per cell, binomial sd sqrt(4000 * 0.2 * 0.8) = 25: +-125 is 5 sd, so a correct
    // shuffle passes and a biased one (say a cyclic shuffle, which empties the diagonal) fails.
    for (auto& slot : count)
      for (int c : slot) CHECK(std::abs(c - 800) < 125);
  }

  SECTION("a restored sampler continues exactly as an uninterrupted one") {
    SequenceSampler uninterrupted(dataset, seq_len, 3);
    const auto stream = take_starts(uninterrupted, seq_len, 260);
    // Mid-epoch, exactly at the boundary, and just before it (the resumed run crosses it).
    for (uint64_t stop : {37u, 100u, 95u, 143u}) {
      SequenceSampler before(dataset, seq_len, 3);
      const auto head = take_starts(before, seq_len, stop);
      const SamplerPosition saved = before.position();
      CHECK(saved.epoch == stop / 100);
      CHECK(saved.index == stop % 100);
      SequenceSampler after(dataset, seq_len, 3);
      after.restore(saved);
      auto resumed = head;
      const auto tail = take_starts(after, seq_len, 260 - stop);
      resumed.insert(resumed.end(), tail.begin(), tail.end());
      CHECK(resumed == stream);
    }
    // skip() is what other ranks' sequences cost: the same as taking them.
    SequenceSampler skipping(dataset, seq_len, 3);
    skipping.skip(150);
    const auto after_skip = take_starts(skipping, seq_len, 110);
    CHECK(std::equal(after_skip.begin(), after_skip.end(), stream.begin() + 150));
    // A position at the very end of an epoch means the start of the next one.
    SequenceSampler at_end(dataset, seq_len, 3);
    at_end.restore({0, 100});
    CHECK(at_end.position().epoch == 1);
    CHECK(at_end.position().index == 0);
    const std::vector<uint32_t> second_epoch_head(stream.begin() + 100, stream.begin() + 105);
    CHECK(take_starts(at_end, seq_len, 5) == second_epoch_head);
  }

  SECTION("errors name the file") {
    SequenceSampler sampler(dataset, seq_len, 3);
    const std::string message = error_of([&] { sampler.restore({0, 101}); });
    CHECK(contains(message, path));
    CHECK(contains(message, "101"));
    const std::string short_message = error_of([&] { SequenceSampler(dataset, 1003, 3); });
    CHECK(contains(short_message, path));
    CHECK(contains(short_message, "1003 tokens"));
    CHECK(contains(short_message, "1004"));
    CHECK(SequenceSampler(dataset, 1002, 3).sequences_per_epoch() == 1);
  }
}

TEST_CASE("sequence sampler packing and one document per sequence", "[data]") {
  TempDir temp;
  const std::string path = temp.file("documents.h5");
  // Documents of 4, 0, 1, 9, 2 and 3 tokens over 19 tokens; token i holds 100 + i, the mask trains all
  // but positions divisible by 5.
  TokenDatasetContents contents;
  contents.vocab_size = 1000;
  contents.eos_id = 7;
  for (uint32_t i = 0; i < 19; ++i) contents.tokens.push_back(100 + i);
  contents.doc_offsets = {0, 4, 4, 5, 14, 16, 19};
  contents.loss_mask = std::vector<uint8_t>(19);
  for (size_t i = 0; i < 19; ++i) (*contents.loss_mask)[i] = i % 5 != 0;
  write_token_dataset(path, contents);
  const TokenDataset dataset = TokenDataset::open(path);
  const std::set<uint64_t> document_starts{4, 5, 14, 16};

  SECTION("packing: doc_start restarts at every document, whose first token is never a target") {
    const int64_t seq_len = 6;
    SequenceSampler sampler(dataset, seq_len, 1, true);
    REQUIRE(sampler.sequences_per_epoch() == 3);
    std::vector<uint32_t> tokens(seq_len + 1);
    std::vector<uint8_t> mask(seq_len);
    std::vector<int32_t> doc_start(seq_len, -5);
    for (int s = 0; s < 3; ++s) {
      sampler.next(tokens.data(), mask.data(), doc_start.data());
      const uint64_t start = tokens[0] - 100;
      INFO("sequence starting at token " << start);
      int64_t current = 0;
      for (int64_t t = 0; t < seq_len; ++t) {
        const uint64_t position = start + t;
        if (t > 0 && document_starts.count(position)) current = t;
        CHECK(doc_start[t] == current);
        CHECK(mask[t] == ((position + 1) % 5 != 0 && !document_starts.count(position + 1)));
      }
    }
  }

  SECTION("without packing: each document in pieces of seq_len targets, padded with masked eos_id") {
    const int64_t seq_len = 4;
    SequenceSampler sampler(dataset, seq_len, 2, false);
    // Documents of 4, 1, 9, 2, 3 tokens have 3, 0, 8, 1, 2 targets: 1 + 0 + 2 + 1 + 1 pieces.
    REQUIRE(sampler.sequences_per_epoch() == 5);
    std::set<uint32_t> firsts;
    std::vector<uint32_t> tokens(seq_len + 1);
    std::vector<uint8_t> mask(seq_len);
    std::vector<int32_t> doc_start(seq_len, -5);
    for (int s = 0; s < 5; ++s) {
      sampler.next(tokens.data(), mask.data(), doc_start.data());
      const uint64_t start = tokens[0] - 100;
      firsts.insert(static_cast<uint32_t>(start));
      const uint64_t end = *std::upper_bound(contents.doc_offsets.begin(), contents.doc_offsets.end(), start);
      INFO("piece starting at token " << start << " of the document ending at " << end);
      for (int64_t t = 0; t <= seq_len; ++t) CHECK(tokens[t] == (start + t < end ? 100 + start + t : 7));
      for (int64_t t = 0; t < seq_len; ++t) {
        CHECK(mask[t] == (start + t + 1 < end && (start + t + 1) % 5 != 0));
        CHECK(doc_start[t] == 0);
      }
    }
    CHECK(firsts == std::set<uint32_t>{0, 5, 9, 14, 16});
  }

  SECTION("without packing, a file of one-token documents has no sequence") {
    const std::string single = temp.file("single_tokens.h5");
    TokenDatasetContents ones;
    ones.vocab_size = 10;
    ones.tokens = {1, 2, 3};
    ones.doc_offsets = {0, 1, 2, 3};
    write_token_dataset(single, ones);
    const TokenDataset singles = TokenDataset::open(single);
    const std::string message = error_of([&] { SequenceSampler(singles, 4, 0, false); });
    CHECK(contains(message, single));
    CHECK(contains(message, "2 tokens"));
    CHECK(SequenceSampler(singles, 2, 0, true).sequences_per_epoch() == 1);
  }
}

namespace {

// One dataset or attribute of a hand-made file: the element type, the shape and the raw bytes.
struct RawArray {
  hid_t type;
  std::vector<hsize_t> dims;
  std::vector<char> bytes;
};
template <typename T>
RawArray raw(hid_t type, std::vector<hsize_t> dims, const std::vector<T>& values) {
  RawArray array{type, std::move(dims), {}};
  array.bytes.resize(values.size() * sizeof(T));
  if (!values.empty()) std::memcpy(array.bytes.data(), values.data(), array.bytes.size());  // data() may be null
  return array;
}

// A file as the format wants it (6 tokens, 2 documents), which each error case breaks in one way.
struct RawFile {
  std::optional<RawArray> tokens = raw(H5T_NATIVE_UINT16, {6}, std::vector<uint16_t>{1, 2, 3, 0, 4, 0});
  std::optional<RawArray> doc_offsets = raw(H5T_NATIVE_UINT64, {3}, std::vector<uint64_t>{0, 4, 6});
  std::optional<RawArray> loss_mask = raw(H5T_NATIVE_UINT8, {6}, std::vector<uint8_t>{1, 1, 1, 0, 1, 0});
  std::optional<RawArray> vocab_size = raw(H5T_NATIVE_UINT32, {}, std::vector<uint32_t>{5});
  std::optional<RawArray> eos_id = raw(H5T_NATIVE_UINT32, {}, std::vector<uint32_t>{0});

  void write(const std::string& path) const {
    hid_t file = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    REQUIRE(file >= 0);
    auto put = [&](const char* name, const std::optional<RawArray>& array, bool attribute) {
      if (!array) return;
      hid_t space = array->dims.empty() ? H5Screate(H5S_SCALAR)
                                        : H5Screate_simple(static_cast<int>(array->dims.size()),
                                                           array->dims.data(), nullptr);
      if (attribute) {
        hid_t id = H5Acreate2(file, name, array->type, space, H5P_DEFAULT, H5P_DEFAULT);
        REQUIRE(H5Awrite(id, array->type, array->bytes.data()) >= 0);
        H5Aclose(id);
      } else {
        hid_t id = H5Dcreate2(file, name, array->type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        if (!array->bytes.empty())  // no bytes: declared but never written
          REQUIRE(H5Dwrite(id, array->type, H5S_ALL, H5S_ALL, H5P_DEFAULT, array->bytes.data()) >= 0);
        H5Dclose(id);
      }
      H5Sclose(space);
    };
    put("tokens", tokens, false);
    put("doc_offsets", doc_offsets, false);
    put("loss_mask", loss_mask, false);
    put("vocab_size", vocab_size, true);
    put("eos_id", eos_id, true);
    H5Fclose(file);
  }
};

// Opens the file `spec` describes and returns the error, which must name the file and `expected`.
void check_open_error(const TempDir& temp, const RawFile& spec, const std::string& expected) {
  const std::string path = temp.file("bad.h5");
  spec.write(path);
  const std::string message = error_of([&] { TokenDataset::open(path); });
  INFO(message);
  CHECK(contains(message, path));
  CHECK(contains(message, expected));
}

}  // namespace

TEST_CASE("token dataset errors name the file and the problem", "[data]") {
  TempDir temp;
  RawFile spec;
  SECTION("the unbroken file opens") {
    const std::string path = temp.file("good.h5");
    spec.write(path);
    TokenDataset dataset = TokenDataset::open(path);
    CHECK(dataset.info().num_documents == 2);
    CHECK(dataset.info().has_loss_mask);
  }
  SECTION("missing file") {
    const std::string path = temp.file("absent.h5");
    CHECK(contains(error_of([&] { TokenDataset::open(path); }), path + ": no such"));
  }
  SECTION("not HDF5") {
    const std::string path = temp.file("text.h5");
    std::ofstream(path) << "tokens: 1 2 3\n";
    CHECK(contains(error_of([&] { TokenDataset::open(path); }), path + ": not an HDF5 file"));
  }
  SECTION("no /tokens") {
    spec.tokens.reset();
    check_open_error(temp, spec, "no /tokens");
  }
  SECTION("/tokens of a float type") {
    spec.tokens = raw(H5T_NATIVE_FLOAT, {6}, std::vector<float>{1, 2, 3, 0, 4, 0});
    check_open_error(temp, spec, "/tokens has type float32, expected uint16 or uint32");
  }
  SECTION("/tokens signed") {
    spec.tokens = raw(H5T_NATIVE_INT32, {6}, std::vector<int32_t>{1, 2, 3, 0, 4, 0});
    check_open_error(temp, spec, "/tokens has type int32");
  }
  SECTION("/tokens of rank 2") {
    spec.tokens = raw(H5T_NATIVE_UINT16, {2, 3}, std::vector<uint16_t>{1, 2, 3, 0, 4, 0});
    check_open_error(temp, spec, "/tokens has 2 dimensions, expected 1");
  }
  SECTION("no /doc_offsets") {
    spec.doc_offsets.reset();
    check_open_error(temp, spec, "no /doc_offsets");
  }
  SECTION("/doc_offsets not uint64") {
    spec.doc_offsets = raw(H5T_NATIVE_INT64, {3}, std::vector<int64_t>{0, 4, 6});
    check_open_error(temp, spec, "/doc_offsets has type int64, expected uint64");
  }
  SECTION("/doc_offsets empty") {
    spec.doc_offsets = raw(H5T_NATIVE_UINT64, {0}, std::vector<uint64_t>{});
    check_open_error(temp, spec, "/doc_offsets is empty");
  }
  SECTION("/doc_offsets not starting at 0") {
    spec.doc_offsets = raw(H5T_NATIVE_UINT64, {3}, std::vector<uint64_t>{1, 4, 6});
    check_open_error(temp, spec, "/doc_offsets[0] is 1");
  }
  SECTION("/doc_offsets decreasing") {
    spec.doc_offsets = raw(H5T_NATIVE_UINT64, {4}, std::vector<uint64_t>{0, 4, 3, 6});
    check_open_error(temp, spec, "/doc_offsets decreases at entry 2");
  }
  SECTION("/doc_offsets not ending at the number of tokens") {
    spec.doc_offsets = raw(H5T_NATIVE_UINT64, {3}, std::vector<uint64_t>{0, 4, 5});
    check_open_error(temp, spec, "/doc_offsets ends at 5, expected the number of tokens 6");
  }
  SECTION("a dataset declared but never written (a writer stopped midway), however long it claims to be") {
    spec.tokens = RawArray{H5T_NATIVE_UINT16, {hsize_t{1} << 40}, {}};
    check_open_error(temp, spec, "/tokens declares 1099511627776 entries but none of them were written");
    spec = RawFile();
    spec.doc_offsets = RawArray{H5T_NATIVE_UINT64, {3}, {}};
    check_open_error(temp, spec, "/doc_offsets declares 3 entries but none of them were written");
  }
  SECTION("/loss_mask of another length") {
    spec.loss_mask = raw(H5T_NATIVE_UINT8, {5}, std::vector<uint8_t>{1, 1, 1, 0, 1});
    check_open_error(temp, spec, "/loss_mask has 5 entries, expected 6");
  }
  SECTION("/loss_mask of another type") {
    spec.loss_mask = raw(H5T_NATIVE_FLOAT, {6}, std::vector<float>{1, 1, 1, 0, 1, 0});
    check_open_error(temp, spec, "/loss_mask has type float32, expected uint8");
  }
  SECTION("missing vocab_size") {
    spec.vocab_size.reset();
    check_open_error(temp, spec, "missing root attribute vocab_size");
  }
  SECTION("missing eos_id") {
    spec.eos_id.reset();
    check_open_error(temp, spec, "missing root attribute eos_id");
  }
  SECTION("eos_id outside the vocabulary") {
    spec.eos_id = raw(H5T_NATIVE_UINT32, {}, std::vector<uint32_t>{5});
    check_open_error(temp, spec, "eos_id 5 is not below vocab_size 5");
  }
  SECTION("attributes written as signed integers (h5py's default) are accepted when non-negative") {
    spec.vocab_size = raw(H5T_NATIVE_INT64, {}, std::vector<int64_t>{5});
    spec.eos_id = raw(H5T_NATIVE_INT64, {}, std::vector<int64_t>{-1});
    check_open_error(temp, spec, "eos_id is out of the uint32 range");
    spec.eos_id = raw(H5T_NATIVE_INT64, {}, std::vector<int64_t>{0});
    spec.write(temp.file("signed.h5"));
    CHECK(TokenDataset::open(temp.file("signed.h5")).info().vocab_size == 5);
  }
  SECTION("token ids outside the vocabulary are reported by position when read") {
    spec.tokens = raw(H5T_NATIVE_UINT16, {6}, std::vector<uint16_t>{1, 2, 3, 0, 7, 0});
    const std::string path = temp.file("bad_token.h5");
    spec.write(path);
    TokenDataset dataset = TokenDataset::open(path);
    std::vector<uint32_t> tokens(6);
    dataset.read_tokens(0, 4, tokens.data());
    const std::string message = error_of([&] { dataset.read_tokens(0, 6, tokens.data()); });
    CHECK(contains(message, path));
    CHECK(contains(message, "token id 7 at position 4"));
  }
  SECTION("loss mask values other than 0 and 1") {
    spec.loss_mask = raw(H5T_NATIVE_UINT8, {6}, std::vector<uint8_t>{1, 1, 2, 0, 1, 0});
    const std::string path = temp.file("bad_mask.h5");
    spec.write(path);
    std::vector<uint8_t> mask(6);
    const std::string message = error_of([&] { TokenDataset::open(path).read_loss_mask(0, 6, mask.data()); });
    CHECK(contains(message, path));
    CHECK(contains(message, "holds 2 at position 2"));
  }
}

TEST_CASE("demo data set", "[data]") {
  const TokenDatasetContents demo = make_demo_dataset(11, 300);
  SECTION("deterministic in the seed") {
    const TokenDatasetContents again = make_demo_dataset(11, 300);
    CHECK(again.tokens == demo.tokens);
    CHECK(again.doc_offsets == demo.doc_offsets);
    CHECK(again.loss_mask == demo.loss_mask);
    CHECK(make_demo_dataset(12, 300).tokens != demo.tokens);
  }
  SECTION("every document is a pattern of period 2..4 over 1..63, 24..96 tokens long, then EOS") {
    REQUIRE(demo.vocab_size == 64);
    REQUIRE(demo.eos_id == 0);
    REQUIRE(demo.doc_offsets.size() == 301);
    REQUIRE(demo.loss_mask.has_value());
    std::set<uint64_t> periods, lengths;
    for (size_t d = 0; d + 1 < demo.doc_offsets.size(); ++d) {
      const uint64_t begin = demo.doc_offsets[d], end = demo.doc_offsets[d + 1];
      const uint64_t length = end - begin - 1;
      CHECK(length >= 24);
      CHECK(length <= 96);
      lengths.insert(length);
      CHECK(demo.tokens[end - 1] == 0);
      CHECK((*demo.loss_mask)[end - 1] == 0);
      for (uint64_t i = begin; i + 1 < end; ++i) {
        CHECK(demo.tokens[i] >= 1);
        CHECK(demo.tokens[i] <= 63);
        CHECK((*demo.loss_mask)[i] == 1);
      }
      // The smallest period in 2..4 that the body repeats with.
      uint64_t period = 0;
      for (uint64_t p = 4; p >= 2; --p) {
        bool repeats = true;
        for (uint64_t i = begin + p; i + 1 < end; ++i)
          repeats = repeats && demo.tokens[i] == demo.tokens[i - p];
        if (repeats) period = p;
      }
      CHECK(period != 0);
      periods.insert(period);
    }
    // Over 300 documents every period and most lengths turn up (a random pattern of period 4 has
    // period 2 with probability 1/63, so the smallest period can be below the drawn one).
    CHECK(periods == std::set<uint64_t>{2, 3, 4});
    CHECK(lengths.size() > 50);
  }
  SECTION("written, read and sampled like any dataset") {
    TempDir temp;
    const std::string path = temp.file("demo.h5");
    write_token_dataset(path, demo);
    TokenDataset dataset = TokenDataset::open(path);
    CHECK(dataset.info().num_tokens == demo.tokens.size());
    SequenceSampler sampler(dataset, 64, 1);
    std::vector<uint32_t> tokens(65);
    std::vector<uint8_t> mask(64);
    sampler.next(tokens.data(), mask.data());
    // EOS ends each document and is not trained; the token after it starts a document and is no target.
    for (int t = 0; t < 64; ++t) CHECK(mask[t] == (tokens[t + 1] != 0 && tokens[t] != 0));
  }
}
