#include "kernels/cpu/nf4.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "kernels/common/dynamic_map_search.h"

// What this matches in bitsandbytes (CUDA kernels kQuantizeBlockwise / kDequantizeBlockwise, the path
// that produces the checkpoints people share), and where it cannot match bit for bit:
// - Scaling: like the kernel, each value is multiplied by the reciprocal 1/absmax rather than divided.
//   bitsandbytes builds with --use_fast_math, so its reciprocal is the GPU's approximate one (within
//   1 ulp); ours is IEEE. A nibble or absmax code can therefore differ only for a value within about
//   an ulp of a decision threshold; none did over 19.7M weights compared with bitsandbytes 0.50.2.
// - offset = mean of the fp32 absmax: torch sums in fp32 in an order of its own; we sum in double in a
//   fixed order and round the mean to fp32, which is at least as accurate and may differ by an ulp.
// - A block whose absmax is 0 (all zeros): the kernel computes 0 * (1/0) = NaN, which fails every
//   threshold test and lands on index 0 (NF4 code -1.0), so after double quantization the zeros come
//   back as -A'_b, not 0. We encode such a block with nibble 7 (code 0.0), the nearest code to every
//   value in it, so it dequantizes to exact zeros: bytes 0x77 where bitsandbytes writes 0x00, read by
//   bitsandbytes with the same formula. A nested block whose centred absmax values are all 0 gets
//   index 0 as in bitsandbytes: with A2 = 0 every index dequantizes to exactly the offset.
// - Dequantization rounds map[q]*A2, then +offset, then NF4*A' to fp32 separately, as the kernel and
//   torch do; the ISO C++ mode of the build keeps the compiler from fusing them into an FMA.

namespace ssmtune::cpu {

const float kNf4Code[16] = {-1.0f,
                            -0.6961928009986877f,
                            -0.5250730514526367f,
                            -0.39491748809814453f,
                            -0.28444138169288635f,
                            -0.18477343022823334f,
                            -0.09105003625154495f,
                            0.0f,
                            0.07958029955625534f,
                            0.16093020141124725f,
                            0.24611230194568634f,
                            0.33791524171829224f,
                            0.44070982933044434f,
                            0.5626170039176941f,
                            0.7229568362236023f,
                            1.0f};

// The thresholds of bitsandbytes' dQuantizeNF4 tree, ascending: midpoints of adjacent codes, which
// bitsandbytes writes as shortest round-trip double literals with an f suffix. For k = 0, 8, 12 and 14
// the exact midpoint lies halfway between two floats and the literal rounds to the other one than
// round-to-nearest-even of the exact midpoint would, so these are the literals' values.
const float kNf4Thresholds[15] = {
    -0.8480964004993439f,  -0.6106329262256622f,   -0.4599952697753906f, -0.33967943489551544f, -0.23460740596055984f,
    -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f, 0.1202552504837513f,   0.2035212516784668f,
    0.2920137718319893f,   0.3893125355243683f,    0.5016634166240692f,  0.6427869200706482f,   0.8614784181118011f};

namespace {

constexpr uint8_t kNf4ZeroNibble = 7;

// One point of torch.linspace(0.1, 1, steps, dtype=float32) as PyTorch's CPU kernel computes it: a
// float step, the first half counted up from the start and the second half down from the end, each
// as start + step*idx, which PyTorch's x86 build compiles to a fused multiply-add. With the fusion the
// resulting map equals, bit for bit, the one bitsandbytes 0.50.2 built under torch 2.11 (x86-64);
// rounding the product separately would move 42 of the 256 entries by an ulp or two.
float linspace_point(int64_t idx, int64_t steps) {
  const float start = 0.1f, end = 1.0f;
  const float step = (end - start) / static_cast<float>(steps - 1);
  if (idx < steps / 2) return std::fma(step, static_cast<float>(idx), start);
  return std::fma(-step, static_cast<float>(steps - idx - 1), end);
}

float block_absmax(const float* w, int64_t numel, int64_t block) {
  const int64_t begin = block * kNf4BlockSize, end = std::min(begin + kNf4BlockSize, numel);
  float m = 0.0f;
  for (int64_t i = begin; i < end; ++i) m = std::max(m, std::fabs(w[i]));
  return m;
}

void pack_block(const float* w, int64_t numel, int64_t block, float absmax, uint8_t* packed) {
  const int64_t begin = block * kNf4BlockSize, end = std::min(begin + kNf4BlockSize, numel);
  if (absmax == 0.0f) {
    for (int64_t i = begin; i < end; i += 2) packed[i / 2] = kNf4ZeroNibble << 4 | kNf4ZeroNibble;
    return;
  }
  const float inverse = 1.0f / absmax;
  for (int64_t i = begin; i < end; i += 2)
    packed[i / 2] = static_cast<uint8_t>(nf4_encode(w[i] * inverse) << 4 | nf4_encode(w[i + 1] * inverse));
}

}  // namespace

const float* signed_dynamic_map() {
  // create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for each decade
  // 10^(i-6), i = 0..6, the means of adjacent points of linspace(0.1, 1, 2^i + 1), scaled by the
  // decade (fp32 multiply by the fp32-rounded power of ten) and taken with both signs: 127 values a
  // sign; then 0 and 1, sorted. So index 127 is 0, 255 is 1, and 0 is -(largest mean), above -1.
  static const std::array<float, 256> map = [] {
    constexpr double kDecades[7] = {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0};
    std::array<float, 256> m{};
    size_t n = 0;
    for (int i = 0; i < 7; ++i) {
      const int64_t steps = (int64_t{1} << i) + 1;
      const float decade = static_cast<float>(kDecades[i]);
      for (int64_t j = 0; j + 1 < steps; ++j) {
        const float mean = (linspace_point(j, steps) + linspace_point(j + 1, steps)) / 2.0f;
        m[n++] = decade * mean;
        m[n++] = -(decade * mean);
      }
    }
    m[n++] = 0.0f;
    m[n++] = 1.0f;
    std::sort(m.begin(), m.end());
    return m;
  }();
  return map.data();
}

Nf4Sizes nf4_sizes(int64_t numel) {
  const int64_t blocks = (numel + kNf4BlockSize - 1) / kNf4BlockSize;
  return {numel, numel / 2, blocks, (blocks + kNf4NestedBlockSize - 1) / kNf4NestedBlockSize};
}

uint8_t nf4_encode(float normalized) {
  // Branch-free walk of the same depth-4 tree: nibble = number of thresholds strictly below x.
  int nibble = 0;
  nibble += (normalized > kNf4Thresholds[nibble + 7]) * 8;
  nibble += (normalized > kNf4Thresholds[nibble + 3]) * 4;
  nibble += (normalized > kNf4Thresholds[nibble + 1]) * 2;
  nibble += (normalized > kNf4Thresholds[nibble]) * 1;
  return static_cast<uint8_t>(nibble);
}

uint8_t dynamic_map_encode(float normalized) { return dynamic_map_search(normalized, signed_dynamic_map()); }

float nf4_absmax_mean(const float* block_absmax, int64_t blocks) {
  if (blocks == 0) return 0.0f;
  constexpr int64_t kMeanChunks = 64;
  double chunk_sums[kMeanChunks] = {};
#pragma omp parallel for schedule(static) if (blocks > 4 * kNf4NestedBlockSize)
  for (int64_t k = 0; k < kMeanChunks; ++k) {
    const int64_t first = blocks * k / kMeanChunks, last = blocks * (k + 1) / kMeanChunks;
    for (int64_t b = first; b < last; ++b) chunk_sums[k] += block_absmax[b];
  }
  double total = 0.0;
  for (const double chunk_sum : chunk_sums) total += chunk_sum;
  return static_cast<float>(total / static_cast<double>(blocks));
}

void nf4_quantize(const float* w, int64_t numel, uint8_t* packed, uint8_t* absmax_codes, float* nested_absmax,
                  float* nested_offset) {
  const Nf4Sizes sizes = nf4_sizes(numel);

  // Pass 1: the block absmax values and their mean.
  std::vector<float> absmax(static_cast<size_t>(sizes.blocks));
#pragma omp parallel for schedule(static) if (sizes.blocks > 4 * kNf4NestedBlockSize)
  for (int64_t b = 0; b < sizes.blocks; ++b) absmax[b] = block_absmax(w, numel, b);
  const float offset = nf4_absmax_mean(absmax.data(), sizes.blocks);
  *nested_offset = offset;

  // Pass 2, one nested block at a time: quantize its centred absmax values, then pack its elements
  // with their exact (not double-quantized) absmax, as bitsandbytes does.
#pragma omp parallel for schedule(static) if (sizes.nested_blocks > 4)
  for (int64_t c = 0; c < sizes.nested_blocks; ++c) {
    const int64_t first = c * kNf4NestedBlockSize, count = std::min(kNf4NestedBlockSize, sizes.blocks - first);
    float centred[kNf4NestedBlockSize];
    float nested = 0.0f;
    for (int64_t j = 0; j < count; ++j) {
      centred[j] = absmax[first + j] - offset;
      nested = std::max(nested, std::fabs(centred[j]));
    }
    nested_absmax[c] = nested;
    const float inverse = nested > 0.0f ? 1.0f / nested : 0.0f;
    for (int64_t j = 0; j < count; ++j) {
      absmax_codes[first + j] = nested > 0.0f ? dynamic_map_encode(centred[j] * inverse) : 0;
      pack_block(w, numel, first + j, absmax[first + j], packed);
    }
  }
}

template <typename T>
void nf4_dequantize(const uint8_t* packed, const uint8_t* absmax_codes, const float* nested_absmax, float nested_offset,
                    int64_t numel, T* out) {
  const Nf4Sizes sizes = nf4_sizes(numel);
  const float* map = signed_dynamic_map();
#pragma omp parallel for schedule(static) if (numel > (1 << 16))
  for (int64_t b = 0; b < sizes.blocks; ++b) {
    const float scaled = map[absmax_codes[b]] * nested_absmax[b / kNf4NestedBlockSize];
    const float absmax = scaled + nested_offset;
    const int64_t begin = b * kNf4BlockSize, end = std::min(begin + kNf4BlockSize, numel);
    for (int64_t i = begin; i < end; i += 2) {
      const uint8_t byte = packed[i / 2];
      out[i] = static_cast<T>(kNf4Code[byte >> 4] * absmax);
      out[i + 1] = static_cast<T>(kNf4Code[byte & 0x0F] * absmax);
    }
  }
}

template void nf4_dequantize<float>(const uint8_t*, const uint8_t*, const float*, float, int64_t, float*);
template void nf4_dequantize<double>(const uint8_t*, const uint8_t*, const float*, float, int64_t, double*);

}  // namespace ssmtune::cpu
