// The CUDA NF4 quantization and dequantization against the CPU reference on fresh random weights,
// outputs poisoned first. Both must match the CPU bit for bit: the same fp32 operations in the same
// order, so any difference is a bug, not rounding.
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

#include "framework/dtype.h"
#include "kernels/cpu/nf4.h"
#include "kernels/cuda/nf4.h"
#include "tests/catch.h"
#include "tests/kernels/device_buffer.h"

using namespace ssmtune;
using ssmtune::testing::DeviceBuffer;

namespace {

struct Shape {
  int64_t rows, cols;
};

// Odd row counts, a partial last block (3x50, 37x96, 769x130, 7x98), a partial last nested block (769x130:
// 1563 blocks), a single partial block (1x2) and a large weight. The dequantizer expands 16 elements per
// thread and the rest one byte at a time: 7x98 = 686 = 42 * 16 + 14 leaves the longest tail (7 bytes),
// inside a partial block and in the same warp as full groups.
const std::vector<Shape> kShapes{{1, 2}, {3, 50}, {37, 96}, {769, 130}, {2048, 1536}, {7, 98}};

// Bytes past each output that the kernels must leave alone.
constexpr size_t kGuard = 64;

// Elements of host that differ in any bit from the start of device.
template <typename T>
int64_t count_mismatches(const std::vector<T>& device, const std::vector<T>& host) {
  int64_t mismatches = 0;
  for (size_t i = 0; i < host.size(); ++i) mismatches += std::memcmp(&device[i], &host[i], sizeof(T)) != 0;
  return mismatches;
}

// The elements past host.size() still hold the 0xFF poison.
template <typename T>
bool guard_untouched(const std::vector<T>& device, size_t n) {
  const auto* bytes = reinterpret_cast<const unsigned char*>(device.data() + n);
  for (size_t i = 0; i < (device.size() - n) * sizeof(T); ++i)
    if (bytes[i] != 0xFF) return false;
  return true;
}

// The CPU reference quantization of w.
struct CpuQuantized {
  explicit CpuQuantized(const std::vector<float>& w)
      : sizes(cpu::nf4_sizes(static_cast<int64_t>(w.size()))),
        packed(sizes.packed_bytes),
        codes(sizes.blocks),
        nested(sizes.nested_blocks) {
    cpu::nf4_quantize(w.data(), sizes.numel, packed.data(), codes.data(), nested.data(), &offset);
  }
  cpu::Nf4Sizes sizes;
  std::vector<uint8_t> packed, codes;
  std::vector<float> nested;
  float offset = 0;
};

// Quantizes w on the CPU and on the GPU (on a stream of its own) and requires identical bytes, every
// output element written and nothing written past the outputs.
void require_same_quantization(const std::vector<float>& w) {
  const CpuQuantized q(w);
  const cpu::Nf4Sizes& sizes = q.sizes;
  const int64_t n = sizes.numel;

  DeviceBuffer<float> d_w(w);
  DeviceBuffer<uint8_t> d_packed(q.packed.size() + kGuard), d_codes(q.codes.size() + kGuard);
  DeviceBuffer<float> d_nested(q.nested.size() + kGuard / sizeof(float));
  DeviceBuffer<uint8_t> workspace(cuda::nf4_quantize_workspace_bytes(n));
  cudaStream_t stream = nullptr;
  REQUIRE(cudaStreamCreate(&stream) == cudaSuccess);
  float d_offset = std::numeric_limits<float>::quiet_NaN();
  cuda::nf4_quantize(d_w.get(), n, d_packed.get(), d_codes.get(), d_nested.get(), &d_offset, workspace.get(),
                     stream);
  REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
  REQUIRE(cudaStreamDestroy(stream) == cudaSuccess);
  const std::vector<uint8_t> out_packed = d_packed.download(), out_codes = d_codes.download();
  const std::vector<float> out_nested = d_nested.download();

  INFO(n << " elements, " << sizes.blocks << " blocks, " << sizes.nested_blocks << " nested blocks");
  CHECK(std::memcmp(&d_offset, &q.offset, sizeof(float)) == 0);
  CHECK(count_mismatches(out_packed, q.packed) == 0);
  CHECK(count_mismatches(out_codes, q.codes) == 0);
  CHECK(count_mismatches(out_nested, q.nested) == 0);
  CHECK(guard_untouched(out_packed, q.packed.size()));
  CHECK(guard_untouched(out_codes, q.codes.size()));
  CHECK(guard_untouched(out_nested, q.nested.size()));
}

}  // namespace

TEST_CASE("CUDA NF4 quantize equals the CPU reference byte for byte on random weights") {
  cuda::nf4_upload_tables();
  const uint64_t seed = std::random_device{}();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (const Shape& shape : kShapes) {
    INFO(shape.rows << " x " << shape.cols);
    // Rows of widely different scales, so the block absmax values (and the nested codes) spread over
    // the dynamic map rather than clustering near the offset.
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::lognormal_distribution<float> row_scale(-3.0f, 1.5f);
    std::vector<float> w(static_cast<size_t>(shape.rows * shape.cols));
    for (int64_t r = 0; r < shape.rows; ++r) {
      const float scale = row_scale(rng);
      for (int64_t c = 0; c < shape.cols; ++c) w[r * shape.cols + c] = normal(rng) * scale;
    }
    // An all-zero block (absmax 0: packed 0x77) where there are at least three blocks.
    const int64_t blocks = cpu::nf4_sizes(static_cast<int64_t>(w.size())).blocks;
    if (blocks >= 3) {
      const int64_t zero_block = 1 + static_cast<int64_t>(rng() % static_cast<uint64_t>(blocks - 2));
      for (int64_t i = 0; i < cpu::kNf4BlockSize; ++i) w[zero_block * cpu::kNf4BlockSize + i] = 0.0f;
    }
    require_same_quantization(w);
  }
}

TEST_CASE("CUDA NF4 quantize equals the CPU reference on values exactly at the decision midpoints") {
  // Built so both levels see exactly representable decision points:
  // - block absmax values A = 1 + d with offset exactly 1 and every nested absmax exactly 1, so the
  //   centred, normalised value the dynamic-map search sees is d itself; d runs over the midpoints
  //   (map[k] + map[k+1]) * 0.5f and their fp32 neighbours wherever 1 + d is exact;
  // - blocks of absmax 1 and 2 (exact reciprocals) whose elements are the NF4 thresholds times A and
  //   their fp32 neighbours, so the nibble tree sees each threshold itself.
  // Each nested block starts with absmax 0 (an all-zero block) and 2, which fixes its nested absmax at
  // 1 without moving the mean; blocks of 0 or 2 and one last block bring the mean to 1.
  cuda::nf4_upload_tables();
  const uint64_t seed = std::random_device{}();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  const float* map = cpu::signed_dynamic_map();
  const float up = std::numeric_limits<float>::infinity();

  std::vector<float> payload;  // the absmax of each block after the leading 0 and 2 of its nested block
  int64_t exact_midpoints = 0;
  for (int k = 0; k + 1 < 256; ++k) {
    const float midpoint = (map[k] + map[k + 1]) * 0.5f;
    for (const float d : {midpoint, std::nextafter(midpoint, -up), std::nextafter(midpoint, up)}) {
      const float A = 1.0f + d;
      if (A - 1.0f != d || A < 0.0f || A > 2.0f) continue;
      payload.push_back(A);
      exact_midpoints += d == midpoint;
    }
  }
  INFO(exact_midpoints << " dynamic-map midpoints hit exactly");
  REQUIRE(exact_midpoints >= 20);  // the construction reaches the midpoints it is meant to test
  for (int copies = 0; copies < 4; ++copies) payload.insert(payload.end(), {1.0f, 2.0f});
  double excess = 0;  // sum of (A - 1), exact in double for these values
  for (const float A : payload) excess += static_cast<double>(A) - 1.0;
  for (; excess > 1.0; excess -= 1.0) payload.push_back(0.0f);
  for (; excess < -1.0; excess += 1.0) payload.push_back(2.0f);
  payload.push_back(static_cast<float>(1.0 - excess));

  std::vector<float> absmax;
  constexpr size_t kPayloadPerNested = cpu::kNf4NestedBlockSize - 2;
  for (size_t first = 0; first < payload.size(); first += kPayloadPerNested) {
    absmax.insert(absmax.end(), {0.0f, 2.0f});
    absmax.insert(absmax.end(), payload.begin() + first,
                  payload.begin() + std::min(payload.size(), first + kPayloadPerNested));
  }

  std::uniform_real_distribution<float> inside(-1.0f, 1.0f);  // |A * u| <= A after rounding
  std::vector<float> w;
  for (size_t b = 0; b < absmax.size(); ++b) {
    const float A = absmax[b];
    std::vector<float> block{b % 2 ? -A : A};
    if (A == 1.0f || A == 2.0f)
      for (int t = 0; t < 15; ++t)
        for (const float x : {cpu::kNf4Thresholds[t], std::nextafter(cpu::kNf4Thresholds[t], -up),
                              std::nextafter(cpu::kNf4Thresholds[t], up)})
          block.push_back(A * x);  // exact: A is a power of two
    while (block.size() < static_cast<size_t>(cpu::kNf4BlockSize)) block.push_back(A * inside(rng));
    w.insert(w.end(), block.begin(), block.end());
  }

  // The construction did what it claims on the CPU, then the GPU must agree byte for byte.
  const CpuQuantized q(w);
  REQUIRE(q.offset == 1.0f);
  for (const float n : q.nested) REQUIRE(n == 1.0f);
  require_same_quantization(w);
}

TEST_CASE("CUDA NF4 dequantize equals the CPU reference rounded to bf16") {
  cuda::nf4_upload_tables();
  const uint64_t seed = std::random_device{}();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  // The last shape is a real weight's size: 18,017 tiles of 512 bytes, more warps than an H100 holds at
  // once (8,448), and 296 bytes past the last tile, which the threads after the tiles take one each.
  std::vector<Shape> shapes = kShapes;
  shapes.push_back({4100, 4500});
  for (const Shape& shape : shapes) {
    const int64_t n = shape.rows * shape.cols;
    std::normal_distribution<float> normal(0.0f, 0.05f);
    std::vector<float> w(n);
    for (float& x : w) x = normal(rng);
    const CpuQuantized q(w);
    std::vector<float> reference(n);
    cpu::nf4_dequantize<float>(q.packed.data(), q.codes.data(), q.nested.data(), q.offset, n, reference.data());

    const DeviceBuffer<uint8_t> d_packed(q.packed), d_codes(q.codes);
    const DeviceBuffer<float> d_nested(q.nested);
    DeviceBuffer<uint16_t> d_out(static_cast<size_t>(n) + kGuard);  // poisoned: NaN everywhere
    cuda::nf4_dequantize_bf16(d_packed.get(), d_codes.get(), d_nested.get(), q.offset, n, d_out.get(), nullptr);
    const std::vector<uint16_t> out = d_out.download();
    // Same fp32 arithmetic in the same order, then one rounding to bf16: equal bit for bit.
    int64_t mismatches = 0, guard_writes = 0;
    for (int64_t i = 0; i < n; ++i) mismatches += out[i] != float_to_bf16(reference[i]);
    for (size_t i = static_cast<size_t>(n); i < out.size(); ++i) guard_writes += out[i] != testing::kBf16NaN;
    INFO(shape.rows << " x " << shape.cols);
    CHECK(mismatches == 0);
    CHECK(guard_writes == 0);
  }
}

// The rows of the weight with a row stride: the same bits as the dense dequantization, row by row, and
// the columns past cols (where the LoRA up-projection goes) untouched.
TEST_CASE("CUDA NF4 dequantize into strided rows equals the dense result and leaves the gaps alone") {
  cuda::nf4_upload_tables();
  const uint64_t seed = std::random_device{}();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (const auto& [rows, cols, ld] : {std::array<int64_t, 3>{3, 16, 24}, {37, 24, 40}, {64, 768, 784}, {96, 144, 160}, {7, 64, 64}, {129, 520, 536}}) {
    INFO(rows << " x " << cols << ", ld " << ld);
    std::normal_distribution<float> normal(0.0f, 0.05f);
    std::vector<float> w(static_cast<size_t>(rows * cols));
    for (float& x : w) x = normal(rng);
    const CpuQuantized q(w);
    const DeviceBuffer<uint8_t> d_packed(q.packed), d_codes(q.codes);
    const DeviceBuffer<float> d_nested(q.nested);
    DeviceBuffer<uint16_t> dense(w.size()), strided(static_cast<size_t>(rows * ld));  // poisoned: NaN
    cuda::nf4_dequantize_bf16(d_packed.get(), d_codes.get(), d_nested.get(), q.offset, rows * cols, dense.get(), nullptr);
    cuda::nf4_dequantize_bf16_rows(d_packed.get(), d_codes.get(), d_nested.get(), q.offset, rows, cols, ld,
                                   strided.get(), nullptr);
    const std::vector<uint16_t> expected = dense.download(), out = strided.download();
    int64_t mismatches = 0, gap_writes = 0;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) mismatches += out[r * ld + c] != expected[r * cols + c];
      for (int64_t c = cols; c < ld; ++c) gap_writes += out[r * ld + c] != testing::kBf16NaN;
    }
    CHECK(mismatches == 0);
    CHECK(gap_writes == 0);
  }
  // Rows must be whole 8-element words (16-byte stores) and 16-byte aligned.
  const DeviceBuffer<uint8_t> packed(64), codes(2);
  const DeviceBuffer<float> nested(1);
  DeviceBuffer<uint16_t> out(256);
  CHECK_THROWS_AS(cuda::nf4_dequantize_bf16_rows(packed.get(), codes.get(), nested.get(), 0.0f, 2, 20, 32, out.get(),
                                                 nullptr),
                  std::invalid_argument);
  CHECK_THROWS_AS(cuda::nf4_dequantize_bf16_rows(packed.get(), codes.get(), nested.get(), 0.0f, 2, 32, 36, out.get(),
                                                 nullptr),
                  std::invalid_argument);
}

TEST_CASE("CUDA NF4 dequantize refuses an odd numel and misaligned buffers") {
  const DeviceBuffer<uint8_t> packed(64), codes(1);
  const DeviceBuffer<float> nested(1);
  DeviceBuffer<uint16_t> out(128 + 8);
  CHECK_THROWS_AS(cuda::nf4_dequantize_bf16(packed.get(), codes.get(), nested.get(), 0.0f, 63, out.get(), nullptr),
                  std::invalid_argument);
  // The wide loads and stores need 4-byte packed and 16-byte out.
  CHECK_THROWS_AS(
      cuda::nf4_dequantize_bf16(packed.get() + 2, codes.get(), nested.get(), 0.0f, 64, out.get(), nullptr),
      std::invalid_argument);
  CHECK_THROWS_AS(
      cuda::nf4_dequantize_bf16(packed.get(), codes.get(), nested.get(), 0.0f, 64, out.get() + 4, nullptr),
      std::invalid_argument);
}
