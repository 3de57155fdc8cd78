// A synthetic data set for demos and end-to-end tests; the task is described in data/README.md.
#pragma once
#include <cstdint>

#include "data/token_dataset.h"

namespace ssmtune {

constexpr uint32_t kDemoVocabSize = 64;
constexpr uint32_t kDemoEosId = 0;

// A synthetic task that a tiny Mamba visibly learns within a minute on two CPU cores: each document
// is a random pattern of period 2..4 over tokens 1..63, repeated to 24..96 tokens and closed by EOS.
// The loss mask is 0 on EOS (where a document ends is random) and 1 elsewhere. Deterministic in seed.
TokenDatasetContents make_demo_dataset(uint64_t seed, uint64_t num_documents);

}  // namespace ssmtune
