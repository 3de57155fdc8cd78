#include "data/demo_dataset.h"

#include "kernels/common/counter_rng.h"

namespace ssmtune {
namespace {

constexpr uint64_t kMinPeriod = 2, kMaxPeriod = 4;
constexpr uint64_t kMinLength = 24, kMaxLength = 96;
// Draws of one document: period, length, then the pattern's tokens.
constexpr uint64_t kPeriodDraw = 0, kLengthDraw = 1, kFirstPatternDraw = 2;

uint64_t uniform_in(uint64_t seed, uint64_t document, uint64_t draw, uint64_t low, uint64_t high) {
  return low + counter_random_u64(seed, document, draw) % (high - low + 1);
}

}  // namespace

TokenDatasetContents make_demo_dataset(uint64_t seed, uint64_t num_documents) {
  // A seed of its own, so the documents do not share draws with a sampler given the same seed.
  const uint64_t demo_seed = mix64(seed ^ 0x64656d6f64617461ULL);
  TokenDatasetContents contents;
  contents.vocab_size = kDemoVocabSize;
  contents.eos_id = kDemoEosId;
  contents.doc_offsets.push_back(0);
  std::vector<uint8_t> loss_mask;
  uint32_t pattern[kMaxPeriod];
  for (uint64_t document = 0; document < num_documents; ++document) {
    const uint64_t period = uniform_in(demo_seed, document, kPeriodDraw, kMinPeriod, kMaxPeriod);
    const uint64_t length = uniform_in(demo_seed, document, kLengthDraw, kMinLength, kMaxLength);
    for (uint64_t k = 0; k < period; ++k)
      pattern[k] = static_cast<uint32_t>(
          uniform_in(demo_seed, document, kFirstPatternDraw + k, 1, kDemoVocabSize - 1));
    for (uint64_t t = 0; t < length; ++t) {
      contents.tokens.push_back(pattern[t % period]);
      loss_mask.push_back(1);
    }
    contents.tokens.push_back(kDemoEosId);
    loss_mask.push_back(0);
    contents.doc_offsets.push_back(contents.tokens.size());
  }
  contents.loss_mask = std::move(loss_mask);
  return contents;
}

}  // namespace ssmtune
