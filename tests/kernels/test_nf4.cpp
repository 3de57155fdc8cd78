// NF4 with double quantization: the code tables and decision rules pinned to bitsandbytes' values, a
// hand-worked example checked byte for byte, ties, zero and partial blocks, blocks spanning rows,
// brute-force nearest-code references, a derived error bound, float vs double and thread counts.
// The pinned map entries and thresholds were read from bitsandbytes 0.50.2 under torch 2.11 (x86-64):
// create_dynamic_map() and the fp32 literals of its CUDA dQuantizeNF4 tree. On that machine (H100),
// over 19.7M weights in six tensors (normal, heavy-tailed, bf16-valued, partial blocks), nf4_quantize
// reproduced quantize_4bit's packed bytes and absmax codes exactly, except in all-zero blocks (see
// kernels/cpu/nf4.cpp), and nf4_dequantize reproduced dequantize_4bit bit for bit.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "kernels/cpu/nf4.h"
#include "tests/catch.h"

using ssmtune::cpu::dynamic_map_encode;
using ssmtune::cpu::kNf4BlockSize;
using ssmtune::cpu::kNf4Code;
using ssmtune::cpu::kNf4NestedBlockSize;
using ssmtune::cpu::nf4_dequantize;
using ssmtune::cpu::nf4_encode;
using ssmtune::cpu::nf4_quantize;
using ssmtune::cpu::nf4_sizes;
using ssmtune::cpu::Nf4Sizes;
using ssmtune::cpu::signed_dynamic_map;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

struct Quantized {
  Nf4Sizes sizes;
  std::vector<uint8_t> packed, codes;
  std::vector<float> nested;
  float offset = 0;
};

Quantized quantize(const std::vector<float>& w) {
  Quantized q;
  q.sizes = nf4_sizes(static_cast<int64_t>(w.size()));
  q.packed.assign(q.sizes.packed_bytes, 0xAB);
  q.codes.assign(q.sizes.blocks, 0xAB);
  q.nested.assign(q.sizes.nested_blocks, -1.0f);
  nf4_quantize(w.data(), q.sizes.numel, q.packed.data(), q.codes.data(), q.nested.data(), &q.offset);
  return q;
}

template <typename T>
std::vector<T> dequantize(const Quantized& q) {
  std::vector<T> out(q.sizes.numel);
  nf4_dequantize(q.packed.data(), q.codes.data(), q.nested.data(), q.offset, q.sizes.numel, out.data());
  return out;
}

uint8_t nibble(const Quantized& q, int64_t i) {
  const uint8_t byte = q.packed[i / 2];
  return i % 2 == 0 ? byte >> 4 : byte & 0x0F;
}

// Index of the entry of `table` nearest to x in exact arithmetic; `margin` receives how far x is from
// the nearest midpoint, so callers can skip values whose rounding is a tie-breaking question.
int nearest_index(const float* table, int size, double x, double* margin) {
  int best = 0;
  for (int k = 1; k < size; ++k)
    if (std::fabs(x - table[k]) < std::fabs(x - table[best])) best = k;
  *margin = std::numeric_limits<double>::infinity();
  for (int k = 0; k + 1 < size; ++k)
    *margin = std::min(*margin, std::fabs(x - 0.5 * (static_cast<double>(table[k]) + table[k + 1])));
  return best;
}

std::vector<float> normal_weights(size_t n, uint64_t seed, float sigma) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, sigma);
  std::vector<float> w(n);
  for (float& e : w) e = dist(rng);
  return w;
}

}  // namespace

TEST_CASE("NF4 code table and the thresholds of bitsandbytes' dQuantizeNF4 tree") {
  CHECK(kNf4Code[0] == -1.0f);
  CHECK(kNf4Code[7] == 0.0f);
  CHECK(kNf4Code[15] == 1.0f);
  CHECK(kNf4Code[1] == -0.6961928009986877f);
  CHECK(kNf4Code[14] == 0.7229568362236023f);
  for (int k = 0; k < 15; ++k) CHECK(kNf4Code[k] < kNf4Code[k + 1]);
  // The fp32 values of the literals bitsandbytes' tree compares against, ascending. Each is the exact
  // midpoint of two adjacent codes to within one fp32 ulp (for k = 0, 8, 12, 14 the midpoint is a
  // tie between two floats and the literal sits on the side away from round-to-nearest-even).
  const float thresholds[15] = {-0x1.b239b2p-1, -0x1.38a4ep-1,  -0x1.d709p-2,  -0x1.5bd4ecp-2, -0x1.e079d8p-3,
                                -0x1.1a7178p-3, -0x1.74f0e2p-5, 0x1.45f5fep-5, 0x1.ec90c6p-4,  0x1.a0cfcp-3,
                                0x1.2b05a8p-2,  0x1.8ea7f2p-2,  0x1.00da06p-1, 0x1.491b5ep-1,  0x1.b913b2p-1};
  for (int k = 0; k < 15; ++k) {
    const double midpoint = (static_cast<double>(kNf4Code[k]) + kNf4Code[k + 1]) / 2;
    const double ulp = std::nextafter(thresholds[k], kInf) - thresholds[k];
    CHECK(std::fabs(thresholds[k] - midpoint) <= ulp);
  }
  for (int k = 0; k < 15; ++k) {
    INFO("threshold " << k);
    // A value exactly on a threshold stays below it (the tree tests x > t); one ulp above goes up.
    CHECK(nf4_encode(thresholds[k]) == k);
    CHECK(nf4_encode(std::nextafter(thresholds[k], kInf)) == k + 1);
    CHECK(nf4_encode(std::nextafter(thresholds[k], -kInf)) == k);
  }
  for (int k = 0; k < 16; ++k) CHECK(nf4_encode(kNf4Code[k]) == k);
  CHECK(nf4_encode(-1.5f) == 0);
  CHECK(nf4_encode(1.5f) == 15);
}

TEST_CASE("signed dynamic map equals bitsandbytes' create_dynamic_map(signed=True)") {
  const float* map = signed_dynamic_map();
  for (int i = 0; i < 255; ++i) CHECK(map[i] < map[i + 1]);
  CHECK(map[127] == 0.0f);
  CHECK(map[255] == 1.0f);
  for (int i = 0; i < 255; ++i) CHECK(map[i] == -map[254 - i]);  // 127 values a sign, symmetric
  // Entries as bitsandbytes' map holds them (read there as hex floats).
  CHECK(map[0] == -0x1.fc6666p-1f);  // the most negative entry is above -1
  CHECK(map[1] == -0x1.f53334p-1f);
  CHECK(map[2] == -0x1.eep-1f);
  CHECK(map[18] == -0x1.7accccp-1f);  // one of the entries that needs linspace's fused multiply-add
  CHECK(map[63] == -0x1.b66668p-4f);
  CHECK(map[100] == -0x1.e978d4p-8f);
  CHECK(map[126] == -0x1.27476ep-21f);  // -(1e-6 * 0.55): the smallest decade
  CHECK(map[128] == 0x1.27476ep-21f);
  CHECK(map[129] == 0x1.b43528p-19f);
  CHECK(map[191] == 0x1.b66668p-4f);
  CHECK(map[200] == 0x1.de6666p-3f);
  CHECK(map[254] == 0x1.fc6666p-1f);
  // All 1024 bytes (little-endian fp32), FNV-1a, as computed from bitsandbytes' map.
  uint64_t hash = 0xcbf29ce484222325ull;
  for (int i = 0; i < 256; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &map[i], 4);
    for (int b = 0; b < 4; ++b) hash = (hash ^ ((bits >> (8 * b)) & 0xFF)) * 0x100000001b3ull;
  }
  CHECK(hash == 0xd677f22a96665bc4ull);
  CHECK(signed_dynamic_map() == map);  // built once
}

TEST_CASE("dynamic map encoding: nearest entry, ties to the even index, ends clamp") {
  const float* map = signed_dynamic_map();
  for (int i = 0; i < 256; ++i) CHECK(dynamic_map_encode(map[i]) == i);
  for (int k = 0; k < 255; ++k) {
    INFO("between " << k << " and " << k + 1);
    const float mid = (map[k] + map[k + 1]) * 0.5f;  // the fp32 midpoint the search computes
    const int even = k % 2 == 0 ? k : k + 1;
    CHECK(dynamic_map_encode(mid) == even);
    if (std::nextafter(mid, kInf) < map[k + 1]) CHECK(dynamic_map_encode(std::nextafter(mid, kInf)) == k + 1);
    if (std::nextafter(mid, -kInf) > map[k]) CHECK(dynamic_map_encode(std::nextafter(mid, -kInf)) == k);
  }
  CHECK(dynamic_map_encode(-1.0f) == 0);
  CHECK(dynamic_map_encode(1.0f) == 255);
  CHECK(dynamic_map_encode(1.0000001f) == 255);
  CHECK(dynamic_map_encode(0.0f) == 127);
  CHECK(dynamic_map_encode(-0.0f) == 127);
}

TEST_CASE("nf4_sizes") {
  const Nf4Sizes s = nf4_sizes(150);
  CHECK(s.numel == 150);
  CHECK(s.packed_bytes == 75);
  CHECK(s.blocks == 3);
  CHECK(s.nested_blocks == 1);
  const Nf4Sizes big = nf4_sizes(256 * 64 * 2 + 2);
  CHECK(big.blocks == 513);
  CHECK(big.nested_blocks == 3);
  CHECK(nf4_sizes(0).blocks == 0);
}

TEST_CASE("hand-worked example: two rows of 64, byte for byte") {
  // Row 0 (block 0): w[2j] = 2*code[j%16], w[2j+1] = 2*code[15 - j%16]. absmax 2, so w/absmax is each
  // code exactly and byte j = (j%16) << 4 | (15 - j%16): 0x0F, 0x1E, ..., 0xF0, twice.
  // Row 1 (block 1): absmax 0.5 (so w/absmax = 2w); w = 0.5 -> 1.0 -> 15; -0.25 -> -0.5, below the
  // threshold -0.46 between codes 2 and 3 -> 2; 0.1 -> 0.2, below 0.2035 between 9 and 10 -> 9;
  // 0 -> 7; -0.5 -> -1 -> 0; 0.02 -> 0.04, just above 0.0398 between 7 and 8 -> 8; the rest 0 -> 7.
  std::vector<float> w(128, 0.0f);
  for (int j = 0; j < 32; ++j) {
    w[2 * j] = 2.0f * kNf4Code[j % 16];
    w[2 * j + 1] = 2.0f * kNf4Code[15 - j % 16];
  }
  w[64] = 0.5f;
  w[65] = -0.25f;
  w[66] = 0.1f;
  w[67] = 0.0f;
  w[68] = -0.5f;
  w[69] = 0.02f;
  const Quantized q = quantize(w);

  std::vector<uint8_t> expected(64, 0x77);
  for (int j = 0; j < 32; ++j) expected[j] = static_cast<uint8_t>((j % 16) << 4 | (15 - j % 16));
  expected[32] = 0xF2;
  expected[33] = 0x97;
  expected[34] = 0x08;
  CHECK(expected[1] == 0x1E);
  CHECK(expected[15] == 0xF0);
  CHECK(q.packed == expected);

  // absmax = {2, 0.5}: offset = 1.25, centred {0.75, -0.75}, A2 = 0.75; 0.75 * fp32(1/0.75) rounds to
  // exactly 1 -> index 255 (the entry 1.0), and -1 is below map[0] -> index 0.
  CHECK(q.offset == 1.25f);
  REQUIRE(q.nested.size() == 1);
  CHECK(q.nested[0] == 0.75f);
  CHECK(q.codes == std::vector<uint8_t>{255, 0});

  // Dequantized: block 0 scale 1*0.75 + 1.25 = 2 exactly, so row 0 comes back exactly. Block 1 scale
  // map[0]*0.75 + 1.25 with both steps rounded to fp32 (emulated in double, where each step is exact
  // before the rounding) is about 0.50527 instead of 0.5.
  const std::vector<float> out = dequantize<float>(q);
  for (int i = 0; i < 64; ++i) CHECK(out[i] == w[i]);
  const float scaled = static_cast<float>(static_cast<double>(signed_dynamic_map()[0]) * 0.75);
  const float scale1 = static_cast<float>(static_cast<double>(scaled) + 1.25);
  CHECK(scale1 == Approx(0.505273).margin(1e-6));
  CHECK(out[64] == scale1);
  CHECK(out[65] == kNf4Code[2] * scale1);
  CHECK(out[66] == kNf4Code[9] * scale1);
  CHECK(out[67] == 0.0f);
  CHECK(out[68] == -scale1);
  CHECK(out[69] == kNf4Code[8] * scale1);
  for (int i = 70; i < 128; ++i) CHECK(out[i] == 0.0f);
}

TEST_CASE("values on and next to NF4 thresholds inside a block") {
  // absmax exactly 1 (w[0]), so w/absmax = w and the nibble is decided by the threshold alone.
  const float t_low = -0.6106329262256622f;   // between codes 1 and 2
  const float t_zero = 0.03979014977812767f;  // between codes 7 and 8
  const float t_high = 0.8614784181118011f;   // between codes 14 and 15
  std::vector<float> w(64, 0.0f);
  w[0] = 1.0f;
  const float probes[9] = {t_low,  std::nextafter(t_low, kInf),  std::nextafter(t_low, -kInf),
                           t_zero, std::nextafter(t_zero, kInf), std::nextafter(t_zero, -kInf),
                           t_high, std::nextafter(t_high, kInf), std::nextafter(t_high, -kInf)};
  const int expected[9] = {1, 2, 1, 7, 8, 7, 14, 15, 14};
  for (int p = 0; p < 9; ++p) w[2 + p] = probes[p];
  const Quantized q = quantize(w);
  CHECK(nibble(q, 0) == 15);
  CHECK(nibble(q, 1) == 7);
  for (int p = 0; p < 9; ++p) {
    INFO("probe " << p);
    CHECK(nibble(q, 2 + p) == expected[p]);
  }
}

TEST_CASE("all-zero blocks: zeros come back exactly, no NaN") {
  SECTION("a zero block between non-zero blocks") {
    std::vector<float> w = normal_weights(3 * 64, 5, 1.0f);
    std::fill(w.begin() + 64, w.begin() + 128, 0.0f);
    const Quantized q = quantize(w);
    for (int j = 32; j < 64; ++j) CHECK(q.packed[j] == 0x77);
    // The block's double-quantized scale is not 0 (the nested step only approximates 0), which is
    // why the nibble must be the code 0.0 rather than bitsandbytes' NaN-path -1.0.
    const float scale1 = signed_dynamic_map()[q.codes[1]] * q.nested[0] + q.offset;
    CHECK(scale1 != 0.0f);
    const std::vector<float> out = dequantize<float>(q);
    for (int i = 64; i < 128; ++i) CHECK(out[i] == 0.0f);
    for (const float v : out) CHECK(std::isfinite(v));
  }
  SECTION("an all-zero tensor") {
    const std::vector<float> w(128, 0.0f);
    const Quantized q = quantize(w);
    CHECK(q.offset == 0.0f);
    CHECK(q.nested[0] == 0.0f);
    CHECK(q.codes == std::vector<uint8_t>{0, 0});  // bitsandbytes' index when A2 = 0
    for (const uint8_t byte : q.packed) CHECK(byte == 0x77);
    for (const float v : dequantize<float>(q)) CHECK(v == 0.0f);
  }
  SECTION("one block: the centred absmax is 0, and the scale comes back exactly") {
    std::vector<float> w = normal_weights(64, 6, 0.3f);
    const Quantized q = quantize(w);
    float absmax = 0;
    for (const float v : w) absmax = std::max(absmax, std::fabs(v));
    CHECK(q.offset == absmax);
    CHECK(q.nested[0] == 0.0f);
    const std::vector<float> out = dequantize<float>(q);
    for (int i = 0; i < 64; ++i) CHECK(out[i] == kNf4Code[nibble(q, i)] * absmax);
  }
}

TEST_CASE("blocks spanning rows, partial last blocks: brute-force reference") {
  // 3 rows x 50: blocks [0,64) and [64,128) each span two rows, [128,150) is partial. 299 rows x 64
  // minus 10: 299 blocks (the last partial) in two nested blocks (the second partial). Scales vary
  // by row so that the nested step has work to do.
  for (const int64_t numel : {int64_t{150}, int64_t{299 * 64 - 10}}) {
    INFO("numel " << numel);
    std::vector<float> w = normal_weights(numel, 7 + numel, 1.0f);
    for (int64_t i = 0; i < numel; ++i) w[i] *= 0.01f * static_cast<float>(1 + (i / 50) % 13);
    const Quantized q = quantize(w);
    const Nf4Sizes& s = q.sizes;

    std::vector<float> absmax(s.blocks, 0.0f);
    double sum = 0;
    for (int64_t b = 0; b < s.blocks; ++b) {
      for (int64_t i = b * 64; i < std::min(numel, b * 64 + 64); ++i) absmax[b] = std::max(absmax[b], std::fabs(w[i]));
      sum += absmax[b];
    }
    CHECK(q.offset == static_cast<float>(sum / static_cast<double>(s.blocks)));

    int64_t near_ties = 0;
    for (int64_t i = 0; i < numel; ++i) {
      const float x = w[i] * (1.0f / absmax[i / 64]);
      double margin;
      const int expected = nearest_index(kNf4Code, 16, x, &margin);
      if (margin < 1e-6) {  // within a few ulp of a midpoint: a tie question, tested above
        ++near_ties;
        continue;
      }
      INFO("element " << i);
      CHECK(nibble(q, i) == expected);
    }
    CHECK(near_ties <= 2);

    for (int64_t c = 0; c < s.nested_blocks; ++c) {
      const int64_t first = c * 256, last = std::min(s.blocks, first + 256);
      float nested = 0;
      for (int64_t b = first; b < last; ++b) nested = std::max(nested, std::fabs(absmax[b] - q.offset));
      CHECK(q.nested[c] == nested);
      for (int64_t b = first; b < last; ++b) {
        const float x = (absmax[b] - q.offset) * (1.0f / nested);
        double margin;
        const int expected = nearest_index(signed_dynamic_map(), 256, x, &margin);
        if (margin < 1e-9) continue;
        INFO("block " << b);
        CHECK(q.codes[b] == expected);
      }
    }
  }
}

TEST_CASE("dequantization error bound on random normal weights") {
  // For element i of block b in nested block c, with A = A_b, A2 = A2_c and A' the double-quantized
  // scale:  |w' - w| <= |NF4[n]| |A' - A| + |NF4[n] A - w|.
  // - |NF4[n] A - w| = A |NF4[n] - w/A| <= A * g, g the largest half-gap between adjacent NF4 codes
  //   ((code[1] - code[0]) / 2 = 0.1519), since the nibble is the nearest code;
  // - |A' - A| <= A2 * h, h the largest distance from a point of [-1, 1] to the nearest map entry
  //   (half the largest gap, or 1 - |map[0]| at the ends: 0.00703), since (A - offset)/A2 is in [-1, 1];
  // - plus fp32 rounding: about ten roundings of relative size 2^-24 on quantities <= A + A2, covered
  //   by 2^-20 (A + A2).
  const int64_t rows = 96, cols = 1000;
  std::vector<float> w = normal_weights(rows * cols, 11, 0.02f);
  for (int64_t r = 0; r < rows; ++r)  // a spread of row scales, as in real weights
    for (int64_t i = 0; i < cols; ++i) w[r * cols + i] *= 0.5f + static_cast<float>(r % 7) * 0.25f;
  const Quantized q = quantize(w);
  const std::vector<float> out = dequantize<float>(q);

  double g = 0, h = 0;
  for (int k = 0; k < 15; ++k) g = std::max(g, (static_cast<double>(kNf4Code[k + 1]) - kNf4Code[k]) / 2);
  const float* map = signed_dynamic_map();
  for (int k = 0; k < 255; ++k) h = std::max(h, (static_cast<double>(map[k + 1]) - map[k]) / 2);
  h = std::max(h, 1.0 - std::fabs(static_cast<double>(map[0])));
  CHECK(g == Approx(0.1519036).margin(1e-6));
  CHECK(h == Approx(0.0070312).margin(1e-6));

  double sum_error = 0, sum_abs_error = 0, sum_abs_w = 0;
  int64_t violations = 0;
  for (int64_t b = 0; b < q.sizes.blocks; ++b) {
    const int64_t begin = b * 64, end = std::min(begin + 64, q.sizes.numel);
    double absmax = 0;
    for (int64_t i = begin; i < end; ++i) absmax = std::max(absmax, static_cast<double>(std::fabs(w[i])));
    const double nested = q.nested[b / 256];
    const double bound = absmax * g + nested * h + std::ldexp(absmax + nested, -20);
    for (int64_t i = begin; i < end; ++i) {
      const double error = static_cast<double>(out[i]) - w[i];
      if (std::fabs(error) > bound) ++violations;
      sum_error += error;
      sum_abs_error += std::fabs(error);
      sum_abs_w += std::fabs(w[i]);
    }
  }
  CHECK(violations == 0);
  // NF4 is built for normal data: measured mean |error| is about 9% of mean |w| here (the bound's
  // worst case would allow ~50%); 12% fails a wrong nibble order or a scale off by a few percent.
  // Signed errors cancel: the mean error is below 1% of mean |w|.
  const double n = static_cast<double>(w.size());
  CHECK(sum_abs_error / sum_abs_w < 0.12);
  CHECK(std::fabs(sum_error / n) < 0.01 * sum_abs_w / n);
}

TEST_CASE("dequantize to float and to double gives the same values") {
  const std::vector<float> w = normal_weights(64 * 300 + 6, 13, 0.05f);
  const Quantized q = quantize(w);
  const std::vector<float> as_float = dequantize<float>(q);
  const std::vector<double> as_double = dequantize<double>(q);
  for (size_t i = 0; i < w.size(); ++i) {
    INFO("element " << i);
    CHECK(as_double[i] == static_cast<double>(as_float[i]));
  }
}

TEST_CASE("quantization does not depend on the thread count") {
  const std::vector<float> w = normal_weights(64 * 256 * 9 + 64 * 3, 17, 0.02f);
  const int saved_threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const Quantized one = quantize(w);
  omp_set_num_threads(4);
  const Quantized four = quantize(w);
  omp_set_num_threads(saved_threads);
  CHECK(one.offset == four.offset);
  CHECK(one.packed == four.packed);
  CHECK(one.codes == four.codes);
  CHECK(one.nested == four.nested);
}
