// A counter-based random number generator: the value for (seed, stream, index) is a pure function, so
// the CPU and CUDA backends draw the same numbers, a backward pass regenerates a forward's dropout mask
// instead of storing it, and resuming from a checkpoint needs only the step number.
#pragma once
#include <cstdint>

#include "kernels/common/host_device.h"

namespace ssmtune {

// splitmix64's finaliser: a bijection of 64-bit words with full avalanche.
SSMTUNE_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

SSMTUNE_HD uint64_t counter_random_u64(uint64_t seed, uint64_t stream, uint64_t index) {
  return mix64(mix64(seed ^ mix64(stream + 0x9e3779b97f4a7c15ULL)) + index);
}

// Uniform in [0, 1) with 24 random bits, exact in fp32.
SSMTUNE_HD float counter_random_uniform(uint64_t seed, uint64_t stream, uint64_t index) {
  return static_cast<float>(counter_random_u64(seed, stream, index) >> 40) * (1.0f / 16777216.0f);
}

}  // namespace ssmtune
