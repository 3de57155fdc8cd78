#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/common/dynamic_map_search.h"
#include "kernels/cpu/nf4.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/nf4.h"

namespace ssmtune::cuda {
namespace {

__constant__ float nf4_code[16];
__constant__ float nf4_thresholds[15];
__constant__ float dynamic_map[256];

constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int kWarpSize = 32;
// nf4_pack_kernel: one warp per 64-block, each lane two elements (one packed byte).
constexpr int kPackThreads = 256;
constexpr int64_t kBlocksPerPackCta = kPackThreads / kWarpSize;
static_assert(cpu::kNf4BlockSize == 2 * kWarpSize, "one warp covers one absmax block");
// nf4_nested_kernel: one thread per absmax value of a nested block.
constexpr int kNestedThreads = static_cast<int>(cpu::kNf4NestedBlockSize);
static_assert(kNestedThreads == 256, "the dynamic map is loaded into shared memory one entry per thread");

// cpu::nf4_encode as a count of the thresholds strictly below x: the same value as its tree (the
// thresholds ascend), and every lane reads the same constant at the same time. NaN counts 0.
__device__ uint8_t nf4_encode(float normalized) {
  int nibble = 0;
#pragma unroll
  for (int k = 0; k < 15; ++k) nibble += normalized > nf4_thresholds[k];
  return static_cast<uint8_t>(nibble);
}

__device__ float warp_max(float x) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(kFullWarp, x, offset));
  return x;
}

// First level: each warp reduces the absmax of its 64-block (stored for the second level) and packs it
// with that exact absmax, as cpu::nf4_quantize does. Maxima start from 0 and fmaxf drops NaN, like the
// CPU's std::max(m, |x|), so the result does not depend on the reduction order. x * (1/absmax) with an
// IEEE reciprocal (__frcp_rn) and an unfused product, as on the CPU.
__global__ void nf4_pack_kernel(const float* __restrict__ w, int64_t numel, int64_t blocks,
                                float* __restrict__ block_absmax, uint8_t* __restrict__ packed) {
  const int64_t block = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  if (block >= blocks) return;  // whole warps, so the shuffles below see every lane
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  const int64_t i = block * cpu::kNf4BlockSize + 2 * lane;
  const bool inside = i < numel;  // the last block may be partial; numel is even
  const float a = inside ? w[i] : 0.0f, b = inside ? w[i + 1] : 0.0f;
  const float absmax = warp_max(fmaxf(fmaxf(0.0f, fabsf(a)), fabsf(b)));
  if (lane == 0) block_absmax[block] = absmax;
  if (!inside) return;
  uint8_t byte = 0x77;  // an all-zero block: code 0.0 (index 7) for every element, as on the CPU
  if (absmax != 0.0f) {
    const float inverse = __frcp_rn(absmax);
    byte = static_cast<uint8_t>(nf4_encode(__fmul_rn(a, inverse)) << 4 | nf4_encode(__fmul_rn(b, inverse)));
  }
  packed[i / 2] = byte;
}

// Second level, one CTA per nested block: centre its absmax values on the offset, reduce their largest
// magnitude and encode each with the dynamic map.
__global__ void nf4_nested_kernel(const float* __restrict__ block_absmax, int64_t blocks, float offset,
                                  uint8_t* __restrict__ absmax_codes, float* __restrict__ nested_absmax) {
  __shared__ float map[256];
  __shared__ float warp_maxima[kNestedThreads / kWarpSize];
  const int j = static_cast<int>(threadIdx.x);
  map[j] = dynamic_map[j];
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kNestedThreads + j;
  const bool inside = b < blocks;
  const float centred = inside ? __fsub_rn(block_absmax[b], offset) : 0.0f;
  const float warp_nested = warp_max(fmaxf(0.0f, fabsf(centred)));
  if (j % kWarpSize == 0) warp_maxima[j / kWarpSize] = warp_nested;
  __syncthreads();
  float nested = 0.0f;
  for (int k = 0; k < kNestedThreads / kWarpSize; ++k) nested = fmaxf(nested, warp_maxima[k]);
  if (j == 0) nested_absmax[blockIdx.x] = nested;
  if (!inside) return;
  absmax_codes[b] = nested > 0.0f ? dynamic_map_search(__fmul_rn(centred, __frcp_rn(nested)), map) : 0;
}

// Dequantization: each thread expands kDequantBytes packed bytes (one 8-byte load) into 16 bf16 (two
// 16-byte stores), so the kernel moves wide words, near copy bandwidth; the last numel % 16 elements go
// one byte per thread. A 64-block is 4 threads' bytes: each computes the block's absmax itself, once. The
// NF4 code and the absmax codes' map are read from shared memory, where the lanes' different indices hit
// different banks (constant memory would serialize them: a warp's bytes span 8 absmax blocks).
constexpr int kDequantThreads = 256;
constexpr int64_t kDequantBytes = 8;
static_assert(cpu::kNf4BlockSize % (2 * kDequantBytes) == 0, "a thread's bytes lie in one 64-block");

// Both levels for the 64-block holding `element`. The products and the sum are rounded separately
// (__fmul_rn/__fadd_rn: no fused multiply-add), so every weight equals the CPU reference bit for bit
// before the final rounding to bf16.
__device__ float dequantized_absmax(const uint8_t* __restrict__ absmax_codes, const float* __restrict__ nested_absmax,
                                    float nested_offset, const float* map, int64_t element) {
  const int64_t block = element / cpu::kNf4BlockSize;
  return __fadd_rn(__fmul_rn(map[absmax_codes[block]], nested_absmax[block / cpu::kNf4NestedBlockSize]),
                   nested_offset);
}

// The two weights of a packed byte (even element in the high nibble) as a bf16 pair, first in the low half.
__device__ uint32_t dequantize_byte(uint32_t byte, float absmax, const float* code) {
  const __nv_bfloat162 pair =
      __floats2bfloat162_rn(__fmul_rn(code[byte >> 4], absmax), __fmul_rn(code[byte & 0x0F], absmax));
  uint32_t bits;
  memcpy(&bits, &pair, sizeof(bits));
  return bits;
}

// Threads [0, full_groups) take kDequantBytes bytes each; the next tail_bytes threads one byte each.
// packed must be 8-byte and out 16-byte aligned (checked by the launcher). groups_per_row == 0: out is
// dense; else out has rows of groups_per_row groups each, out_row_pairs bf16 pairs apart (no tail then).
__global__ void __launch_bounds__(kDequantThreads)
    nf4_dequantize_kernel(const uint8_t* __restrict__ packed, const uint8_t* __restrict__ absmax_codes,
                          const float* __restrict__ nested_absmax, float nested_offset, int64_t full_groups,
                          int64_t tail_bytes, int64_t groups_per_row, int64_t out_row_pairs,
                          uint32_t* __restrict__ out) {
  __shared__ float code[16], map[256];
  static_assert(kDequantThreads == 256, "one thread per entry of the map");
  if (threadIdx.x < 16) code[threadIdx.x] = nf4_code[threadIdx.x];
  map[threadIdx.x] = dynamic_map[threadIdx.x];
  __syncthreads();
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < full_groups) {
    const uint2 bytes = reinterpret_cast<const uint2*>(packed)[j];
    const float absmax = dequantized_absmax(absmax_codes, nested_absmax, nested_offset, map, j * 2 * kDequantBytes);
    uint32_t pairs[kDequantBytes];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      pairs[k] = dequantize_byte((bytes.x >> (8 * k)) & 0xFF, absmax, code);
      pairs[4 + k] = dequantize_byte((bytes.y >> (8 * k)) & 0xFF, absmax, code);
    }
    const int64_t first_pair = groups_per_row == 0 ? j * kDequantBytes
                                                   : (j / groups_per_row) * out_row_pairs +
                                                         (j % groups_per_row) * kDequantBytes;
    uint4* target = reinterpret_cast<uint4*>(out + first_pair);
    target[0] = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
    target[1] = make_uint4(pairs[4], pairs[5], pairs[6], pairs[7]);
  } else if (j < full_groups + tail_bytes) {
    const int64_t byte = full_groups * kDequantBytes + (j - full_groups);
    out[byte] = dequantize_byte(packed[byte],
                                dequantized_absmax(absmax_codes, nested_absmax, nested_offset, map, 2 * byte), code);
  }
}

}  // namespace

void nf4_upload_tables() {
  SSMTUNE_CUDA_CHECK(cudaMemcpyToSymbol(nf4_code, cpu::kNf4Code, sizeof(float) * 16), "nf4 tables");
  SSMTUNE_CUDA_CHECK(cudaMemcpyToSymbol(nf4_thresholds, cpu::kNf4Thresholds, sizeof(float) * 15), "nf4 tables");
  SSMTUNE_CUDA_CHECK(cudaMemcpyToSymbol(dynamic_map, cpu::signed_dynamic_map(), sizeof(float) * 256), "nf4 tables");
}

size_t nf4_quantize_workspace_bytes(int64_t numel) {
  return static_cast<size_t>(cpu::nf4_sizes(numel).blocks) * sizeof(float);
}

void nf4_quantize(const float* w, int64_t numel, uint8_t* packed, uint8_t* absmax_codes, float* nested_absmax,
                  float* nested_offset, void* workspace, void* stream) {
  if (numel < 0 || numel % 2 != 0)
    throw std::invalid_argument("nf4_quantize: numel must be even and non-negative, got " + std::to_string(numel));
  const cpu::Nf4Sizes sizes = cpu::nf4_sizes(numel);
  const int64_t pack_ctas = (sizes.blocks + kBlocksPerPackCta - 1) / kBlocksPerPackCta;
  if (pack_ctas > INT_MAX)
    throw std::invalid_argument("nf4_quantize: " + std::to_string(numel) + " elements exceed one launch");
  if (sizes.blocks == 0) {
    *nested_offset = 0.0f;  // as on the CPU
    return;
  }
  const auto s = static_cast<cudaStream_t>(stream);
  float* block_absmax = static_cast<float*>(workspace);

  nf4_pack_kernel<<<static_cast<unsigned>(pack_ctas), kPackThreads, 0, s>>>(w, numel, sizes.blocks, block_absmax,
                                                                             packed);
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "nf4_quantize launch");
  std::vector<float> host_absmax(static_cast<size_t>(sizes.blocks));
  SSMTUNE_CUDA_CHECK(cudaMemcpyAsync(host_absmax.data(), block_absmax, host_absmax.size() * sizeof(float),
                                     cudaMemcpyDeviceToHost, s),
                     "nf4_quantize");
  SSMTUNE_CUDA_CHECK(cudaStreamSynchronize(s), "nf4_quantize");
  const float offset = cpu::nf4_absmax_mean(host_absmax.data(), sizes.blocks);
  *nested_offset = offset;

  nf4_nested_kernel<<<static_cast<unsigned>(sizes.nested_blocks), kNestedThreads, 0, s>>>(
      block_absmax, sizes.blocks, offset, absmax_codes, nested_absmax);
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "nf4_quantize launch");
}

void nf4_dequantize_bf16(const uint8_t* packed, const uint8_t* absmax_codes, const float* nested_absmax,
                         float nested_offset, int64_t numel, uint16_t* out, void* stream) {
  if (numel < 0 || numel % 2 != 0)
    throw std::invalid_argument("nf4_dequantize_bf16: numel must be even and non-negative, got " +
                                std::to_string(numel));
  if (reinterpret_cast<uintptr_t>(packed) % kDequantBytes != 0 || reinterpret_cast<uintptr_t>(out) % 16 != 0)
    throw std::invalid_argument("nf4_dequantize_bf16: packed must be 8-byte and out 16-byte aligned");
  const int64_t num_bytes = numel / 2;
  const int64_t full_groups = num_bytes / kDequantBytes, tail_bytes = num_bytes % kDequantBytes;
  const int64_t blocks = (full_groups + tail_bytes + kDequantThreads - 1) / kDequantThreads;
  if (blocks == 0) return;
  if (blocks > INT_MAX)
    throw std::invalid_argument("nf4_dequantize_bf16: " + std::to_string(numel) + " elements exceed one launch");
  nf4_dequantize_kernel<<<static_cast<unsigned>(blocks), kDequantThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      packed, absmax_codes, nested_absmax, nested_offset, full_groups, tail_bytes, 0, 0,
      reinterpret_cast<uint32_t*>(out));
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "nf4_dequantize_bf16 launch");
}

void nf4_dequantize_bf16_rows(const uint8_t* packed, const uint8_t* absmax_codes, const float* nested_absmax,
                              float nested_offset, int64_t rows, int64_t cols, int64_t ld, uint16_t* out,
                              void* stream) {
  constexpr int64_t kGroupElements = 2 * kDequantBytes;
  if (rows < 0 || cols <= 0 || cols % kGroupElements != 0 || ld < cols || ld % 8 != 0)
    throw std::invalid_argument("nf4_dequantize_bf16_rows: needs cols a positive multiple of " +
                                std::to_string(kGroupElements) + " and a row stride >= cols, a multiple of 8; got "
                                "rows " + std::to_string(rows) + ", cols " + std::to_string(cols) + ", ld " +
                                std::to_string(ld));
  if (reinterpret_cast<uintptr_t>(packed) % kDequantBytes != 0 || reinterpret_cast<uintptr_t>(out) % 16 != 0)
    throw std::invalid_argument("nf4_dequantize_bf16_rows: packed must be 8-byte and out 16-byte aligned");
  const int64_t groups_per_row = cols / kGroupElements, full_groups = rows * groups_per_row;
  const int64_t blocks = (full_groups + kDequantThreads - 1) / kDequantThreads;
  if (blocks == 0) return;
  if (blocks > INT_MAX)
    throw std::invalid_argument("nf4_dequantize_bf16_rows: " + std::to_string(rows * cols) +
                                " elements exceed one launch");
  nf4_dequantize_kernel<<<static_cast<unsigned>(blocks), kDequantThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      packed, absmax_codes, nested_absmax, nested_offset, full_groups, 0, groups_per_row, ld / 2,
      reinterpret_cast<uint32_t*>(out));
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "nf4_dequantize_bf16_rows launch");
}

}  // namespace ssmtune::cuda
