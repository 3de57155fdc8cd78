// Packed documents on the CPU backend: a training step over rows that pack several documents (with
// doc_start) gives each document the loss and the adapter gradients it has alone in a padded row, in fp64
// (summation order only) and fp32, for Mamba and falcon-mamba, with and without layer recomputation;
// and SequenceSampler's two modes (data.packing) feed TrainStep batches that train the same.
#include <cmath>
#include <random>
#include <string>

#include "data/token_dataset.h"
#include "framework/cpu_backend.h"
#include "framework/mamba_model.h"
#include "tests/catch.h"
#include "tests/framework/packing_check.h"
#include "tests/framework/scratch_dir.h"
#include "tests/framework/tiny_config.h"

using namespace ssmtune;

namespace {

std::vector<test::Document> random_documents(const std::vector<size_t>& lengths, uint32_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<test::Document> docs;
  for (const size_t n : lengths) {
    test::Document d(n);
    for (uint32_t& token : d) token = static_cast<uint32_t>(rng() % vocab);
    docs.push_back(d);
  }
  return docs;
}

}  // namespace

TEST_CASE("a packed step gives every document its own loss and gradients (CPU, fp64 and fp32)") {
  // Documents of 1 and 2 tokens (shorter than the conv), boundaries inside and at the edges of the
  // 3-token scan chunks, a row filled exactly and one padded.
  const auto docs = random_documents({5, 1, 2, 6, 9, 4}, 11, 21);
  const std::vector<std::vector<size_t>> rows{{0, 1, 2, 3}, {4, 5}};
  const int64_t seq_len = 13;  // row 0 holds 14 tokens: seq_len + 1
  for (const std::string model_type : {"mamba", "falcon_mamba"}) {
    test::ScratchDir dir("packing");
    write_random_mamba(dir / "model", test::tiny_config(model_type), 5);
    for (const bool recompute : {true, false}) {
      INFO(model_type << ", recompute " << recompute);
      // fp64: the packed and separate runs differ only in summation order (the adapter gradients sum the
      // same per-token terms grouped by row), ~1e-15 relative: 1e-10.
      test::check_packed_equals_separate([] { return make_cpu_backend(DType::F64); }, dir / "model", docs, rows,
                                         seq_len, 3, recompute, 1e-10, 1e-10);
      // fp32: the same sums at 6e-8 per operation over a two-layer model: 1e-5 for losses, 1e-4 norm-wise
      // for gradients; a document that saw its neighbour would differ by O(1e-2) or more.
      test::check_packed_equals_separate([] { return make_cpu_backend(DType::F32); }, dir / "model", docs, rows,
                                         seq_len, 3, recompute, 1e-5, 1e-4);
    }
  }
}

TEST_CASE("without doc_start a packed row lets documents see each other (the check can fail)") {
  test::ScratchDir dir("packing-leak");
  write_random_mamba(dir / "model", test::tiny_config("mamba"), 5);
  const auto docs = random_documents({6, 7}, 11, 22);
  auto packed = test::DocumentBatch::make(docs, {{0, 1}}, 12, true, 0);
  const auto separate = test::DocumentBatch::make(docs, {{0}, {1}}, 12, false, 0);
  packed.doc_start.clear();  // the same row and mask, the state and conv window now run on
  LoraConfig lora;
  const std::vector<double> params = test::random_adapter_values(test::tiny_config("mamba"), lora, 4);
  auto backend = make_cpu_backend(DType::F64), other = make_cpu_backend(DType::F64);
  const auto p = test::run_documents(*backend, dir / "model", lora, params, packed, 3, true, 2);
  const auto s = test::run_documents(*other, dir / "model", lora, params, separate, 3, true, 2);
  CHECK(p.document_losses[0] == Approx(s.document_losses[0]).epsilon(1e-12));  // the first is unaffected
  CHECK(std::abs(p.document_losses[1] - s.document_losses[1]) > 1e-6 * std::abs(s.document_losses[1]));
}

TEST_CASE("SequenceSampler with and without packing feeds steps that train the same targets") {
  test::ScratchDir dir("packing-sampler");
  write_random_mamba(dir / "model", test::tiny_config("mamba"), 6);
  // Four documents, one of a single token (no target of its own) and one of two; the packed sampler's
  // one sequence holds them all (seq_len = tokens - 1), the unpacked sampler's three sequences one each.
  const auto docs = random_documents({6, 1, 2, 11}, 11, 23);
  TokenDatasetContents contents;
  contents.vocab_size = 11;
  contents.eos_id = 0;
  contents.doc_offsets = {0};
  for (const auto& d : docs) {
    contents.tokens.insert(contents.tokens.end(), d.begin(), d.end());
    contents.doc_offsets.push_back(contents.tokens.size());
  }
  write_token_dataset((dir / "data.h5").string(), contents);
  const TokenDataset data = TokenDataset::open((dir / "data.h5").string());
  const int64_t seq_len = static_cast<int64_t>(contents.tokens.size()) - 1;

  auto sample = [&](bool packing) {
    SequenceSampler sampler(data, seq_len, 0, packing);
    test::DocumentBatch b;
    b.batch = static_cast<int64_t>(sampler.sequences_per_epoch());
    b.seq_len = seq_len;
    b.tokens.resize(static_cast<size_t>(b.batch * (seq_len + 1)));
    b.mask.resize(static_cast<size_t>(b.batch * seq_len));
    b.doc_start.resize(b.mask.size());
    for (int64_t s = 0; s < b.batch; ++s)
      sampler.next(&b.tokens[s * (seq_len + 1)], &b.mask[s * seq_len], &b.doc_start[s * seq_len]);
    return b;
  };
  const test::DocumentBatch packed = sample(true), unpacked = sample(false);
  REQUIRE(packed.batch == 1);
  REQUIRE(unpacked.batch == 3);
  int64_t packed_targets = 0, unpacked_targets = 0;
  for (uint8_t m : packed.mask) packed_targets += m;
  for (uint8_t m : unpacked.mask) unpacked_targets += m;
  CHECK(packed_targets == 5 + 1 + 10);  // n-1 per document
  CHECK(unpacked_targets == packed_targets);

  LoraConfig lora;
  const std::vector<double> params = test::random_adapter_values(test::tiny_config("mamba"), lora, 3);
  auto backend = make_cpu_backend(DType::F64), other = make_cpu_backend(DType::F64);
  const auto p = test::run_documents(*backend, dir / "model", lora, params, packed, 4, true, 0);
  const auto u = test::run_documents(*other, dir / "model", lora, params, unpacked, 4, true, 0);
  // Summation order only (fp64): 1e-10.
  CHECK(p.loss == Approx(u.loss).epsilon(1e-10));
  CHECK(test::relative_difference(p.gradients, u.gradients) <= 1e-10);
}
