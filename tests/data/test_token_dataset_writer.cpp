// The streaming TokenDatasetWriter: documents appended one by one across many chunks read back exactly;
// small and empty files; values checked on arrival; a writer that does not finish leaves no file and
// an existing one untouched; and the chunk layout it writes (whole 64 Ki-element chunks).
#include <hdf5.h>

#include <random>

#include "data/token_dataset.h"
#include "framework/error.h"
#include "tests/catch.h"
#include "tests/framework/error_message.h"
#include "tests/framework/scratch_dir.h"

using namespace ssmtune;
namespace fs = std::filesystem;
using test::contains;
using test::error_message;

namespace {

struct Document {
  std::vector<uint32_t> tokens;
  std::vector<uint8_t> mask;
};

// Documents of random lengths 0..max_length (empty ones included) with random ids and mask.
std::vector<Document> random_documents(size_t count, size_t max_length, uint32_t vocab_size, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<Document> documents(count);
  for (Document& d : documents) {
    const size_t length = rng() % (max_length + 1);
    for (size_t i = 0; i < length; ++i) {
      d.tokens.push_back(static_cast<uint32_t>(rng() % vocab_size));
      d.mask.push_back(static_cast<uint8_t>(rng() % 2));
    }
  }
  return documents;
}

void write_documents(const std::string& path, const std::vector<Document>& documents, uint32_t vocab_size,
                     bool with_mask) {
  TokenDatasetWriter writer(path, vocab_size, 1, with_mask);
  for (const Document& d : documents) writer.append(d.tokens, with_mask ? d.mask : std::vector<uint8_t>());
  writer.close();
  writer.finish();
}

void check_read_back(const std::string& path, const std::vector<Document>& documents, uint32_t vocab_size,
                     bool with_mask) {
  const TokenDataset dataset = TokenDataset::open(path);
  CHECK(dataset.info().vocab_size == vocab_size);
  CHECK(dataset.info().eos_id == 1);
  CHECK(dataset.info().has_loss_mask == with_mask);
  REQUIRE(dataset.info().num_documents == documents.size());
  std::vector<uint32_t> tokens;
  std::vector<uint8_t> mask;
  for (size_t d = 0; d < documents.size(); ++d) {
    const uint64_t begin = dataset.doc_offsets()[d], end = dataset.doc_offsets()[d + 1];
    tokens.resize(end - begin);
    mask.resize(end - begin);
    dataset.read_tokens(begin, end - begin, tokens.data());
    dataset.read_loss_mask(begin, end - begin, mask.data());
    CHECK(tokens == documents[d].tokens);
    CHECK(mask == (with_mask ? documents[d].mask : std::vector<uint8_t>(end - begin, 1)));
  }
}

// The chunk length and the maximum length of /name (0 when not chunked; H5S_UNLIMITED when extendible).
std::pair<hsize_t, hsize_t> chunk_and_max(const std::string& path, const char* name) {
  const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  const hid_t dataset = H5Dopen2(file, name, H5P_DEFAULT);
  const hid_t creation = H5Dget_create_plist(dataset);
  hsize_t chunk = 0, size = 0, max = 0;
  if (H5Pget_layout(creation) == H5D_CHUNKED) H5Pget_chunk(creation, 1, &chunk);
  const hid_t space = H5Dget_space(dataset);
  H5Sget_simple_extent_dims(space, &size, &max);
  H5Sclose(space);
  H5Pclose(creation);
  H5Dclose(dataset);
  H5Fclose(file);
  return {chunk, max};
}

}  // namespace

TEST_CASE("streamed documents read back exactly, across many chunks and in both token widths") {
  test::ScratchDir dir("dataset-writer");
  // About 3 chunks of 64 Ki tokens, in documents of up to 700 tokens (some empty).
  const std::vector<Document> documents = random_documents(600, 700, 50000, 1);
  for (const bool with_mask : {true, false}) {
    for (const uint32_t vocab_size : {50000u, 70000u}) {
      const std::string path = (dir / "data.h5").string();
      write_documents(path, documents, vocab_size, with_mask);
      check_read_back(path, documents, vocab_size, with_mask);
      CHECK(chunk_and_max(path, "tokens") == std::pair<hsize_t, hsize_t>{65536, H5S_UNLIMITED});
      CHECK_FALSE(fs::exists(path + ".tmp"));
    }
  }
}

TEST_CASE("a small file is not padded to whole chunks, and an empty one is valid") {
  test::ScratchDir dir("dataset-writer-small");
  const std::string path = (dir / "small.h5").string();
  const std::vector<Document> documents = random_documents(3, 10, 100, 2);
  write_documents(path, documents, 100, true);
  check_read_back(path, documents, 100, true);
  const uint64_t tokens = TokenDataset::open(path).info().num_tokens;
  CHECK(chunk_and_max(path, "tokens").first == tokens);
  CHECK(chunk_and_max(path, "doc_offsets").first == 4);
  CHECK(fs::file_size(path) < 16384);

  write_documents(path, {}, 100, true);
  const TokenDataset empty = TokenDataset::open(path);
  CHECK(empty.info().num_tokens == 0);
  CHECK(empty.doc_offsets() == std::vector<uint64_t>{0});
  CHECK(chunk_and_max(path, "tokens").first == 0);  // contiguous, as a fixed dataset of length 0 must be
}

TEST_CASE("values are checked on arrival, and a rejected document changes nothing") {
  test::ScratchDir dir("dataset-writer-checks");
  const std::string path = (dir / "data.h5").string();
  TokenDatasetWriter writer(path, 100, 1, true);
  writer.append(std::vector<uint32_t>{5, 6}, std::vector<uint8_t>{0, 1});
  CHECK(contains(error_message([&] {
                   writer.append(std::vector<uint32_t>{7, 100}, std::vector<uint8_t>{1, 1});
                 }),
                 path + ": token id 100 at position 3 is not below vocab_size 100"));
  CHECK(contains(error_message([&] { writer.append(std::vector<uint32_t>{7}, std::vector<uint8_t>{2}); }),
                 "loss mask value 2 at position 2, expected 0 or 1"));
  CHECK(contains(error_message([&] { writer.append(std::vector<uint32_t>{7}, std::vector<uint8_t>{}); }),
                 "1 tokens and 0 loss mask entries, expected one per token"));
  writer.append(std::vector<uint32_t>{8}, std::vector<uint8_t>{1});
  CHECK(writer.num_documents() == 2);
  CHECK(writer.num_tokens() == 3);
  writer.finish();
  check_read_back(path, {{{5, 6}, {0, 1}}, {{8}, {1}}}, 100, true);

  CHECK(contains(error_message([&] { TokenDatasetWriter(path, 100, 100, false); }), "eos_id 100 is not below"));
  CHECK(contains(error_message([&] { TokenDatasetWriter(path, 0, 0, false); }), "vocab_size 0"));
  TokenDatasetWriter no_mask(path, 100, 1, false);
  CHECK(contains(error_message([&] { no_mask.append(std::vector<uint32_t>{7}, std::vector<uint8_t>{1}); }),
                 "none (the file has no mask)"));
  no_mask.close();
  CHECK(contains(error_message([&] { no_mask.append(std::vector<uint32_t>{7}, {}); }), "append after close"));
}

TEST_CASE("an unfinished writer leaves no file and an existing one untouched") {
  test::ScratchDir dir("dataset-writer-unfinished");
  const std::string path = (dir / "data.h5").string();
  const std::vector<Document> old_documents = random_documents(5, 20, 100, 3);
  write_documents(path, old_documents, 100, true);
  {
    TokenDatasetWriter writer(path, 100, 1, true);
    for (const Document& d : random_documents(400, 700, 100, 4)) writer.append(d.tokens, d.mask);
    CHECK(fs::exists(path + ".tmp"));  // written as it goes, under the temporary name
  }
  CHECK_FALSE(fs::exists(path + ".tmp"));
  check_read_back(path, old_documents, 100, true);
  {
    TokenDatasetWriter writer(path, 100, 1, true);
    writer.append(std::vector<uint32_t>{1}, std::vector<uint8_t>{1});
    writer.close();  // closed but not renamed: still not in place
  }
  check_read_back(path, old_documents, 100, true);
  CHECK_FALSE(fs::exists(path + ".tmp"));

  const std::string fresh = (dir / "fresh.h5").string();
  { TokenDatasetWriter writer(fresh, 100, 1, false); }
  CHECK_FALSE(fs::exists(fresh));
  CHECK_FALSE(fs::exists(fresh + ".tmp"));
}
