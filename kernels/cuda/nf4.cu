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

// The code and the map are read with lane-dependent indices, which constant memory would serialize:
// global memory serves them from L1. The thresholds are read uniformly (nf4_encode).
__device__ float nf4_code[16];
__constant__ float nf4_thresholds[15];
__device__ float dynamic_map[256];

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

// Dequantization. A warp expands a tile of 512 packed bytes (1024 weights, 16 absmax blocks): lane l
// takes the 4-byte words at k * 128 + 4 l (k = 0..3), so each of the warp's loads reads 128 contiguous
// bytes and each of its 16-byte stores writes 512 contiguous bytes: every sector is written whole by one
// instruction (a lane's 32 consecutive output bytes would leave each store instruction half a sector).
// Lanes 0..15 form the tile's 16 absmax values, both levels, and the lanes take theirs by shuffle; lane l
// also holds NF4 code value l % 16, and each nibble is looked up by shuffle. No shared memory and no
// barrier: the warps are independent. Bytes past the last whole tile go one per thread.
constexpr int kDequantThreads = 256;
constexpr int kWordsPerLane = 4;
constexpr int64_t kTileBytes = int64_t{kWarpSize} * 4 * kWordsPerLane;
constexpr int kTileBlocks = static_cast<int>(2 * kTileBytes / cpu::kNf4BlockSize);
static_assert(kTileBlocks <= kWarpSize && cpu::kNf4NestedBlockSize % kTileBlocks == 0,
              "a tile's absmax blocks fit a warp and lie in one nested block");
static_assert(cpu::kNf4BlockSize % 8 == 0, "a 4-byte word (8 weights) lies in one 64-block");

// Both levels for the 64-block `block`. The products and the sum are rounded separately
// (__fmul_rn/__fadd_rn: no fused multiply-add), so every weight equals the CPU reference bit for bit
// before the final rounding to bf16.
__device__ float dequantized_absmax(const uint8_t* __restrict__ absmax_codes, const float* __restrict__ nested_absmax,
                                    float nested_offset, int64_t block) {
  return __fadd_rn(__fmul_rn(dynamic_map[absmax_codes[block]], nested_absmax[block / cpu::kNf4NestedBlockSize]),
                   nested_offset);
}

// The two weights of a packed byte (even element in the high nibble) as a bf16 pair, first in the low half.
// lane_code: NF4 code value lane % 16; every lane of the warp must call (the lookups are shuffles).
__device__ uint32_t dequantize_byte(uint32_t byte, float absmax, float lane_code) {
  const float high = __shfl_sync(kFullWarp, lane_code, static_cast<int>(byte >> 4));
  const float low = __shfl_sync(kFullWarp, lane_code, static_cast<int>(byte & 0x0F));
  const __nv_bfloat162 pair = __floats2bfloat162_rn(__fmul_rn(high, absmax), __fmul_rn(low, absmax));
  uint32_t bits;
  memcpy(&bits, &pair, sizeof(bits));
  return bits;
}

// Where the bf16 pair of packed byte b goes, in pairs from out: b itself for a dense weight; for rows of
// row_bytes packed bytes stored row_pairs pairs apart, its row's start plus its column. A 4-byte word
// never straddles two rows (row_bytes is a multiple of 4, checked by the launcher).
struct DenseOut {
  __device__ int64_t pair(int64_t byte) const { return byte; }
};
struct RowsOut {
  uint32_t row_bytes, row_pairs;
  __device__ int64_t pair(int64_t byte) const {
    const uint32_t b = static_cast<uint32_t>(byte), row = b / row_bytes;  // bytes < 2^32: checked by the launcher
    return static_cast<int64_t>(row) * row_pairs + (b - row * row_bytes);
  }
};

// Warps [0, tiles) take a tile each; the threads after them a byte each (whole warps: the grid is a
// multiple of the block, so every lane of a warp reaches the shuffles).
template <typename Out>
__global__ void __launch_bounds__(kDequantThreads)
    nf4_dequantize_kernel(const uint8_t* __restrict__ packed, const uint8_t* __restrict__ absmax_codes,
                          const float* __restrict__ nested_absmax, float nested_offset, int64_t tiles,
                          int64_t bytes, Out layout, uint32_t* __restrict__ out) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t tile = thread / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x % kWarpSize);
  const float lane_code = nf4_code[lane % 16];
  if (tile < tiles) {
    const int64_t first_byte = tile * kTileBytes;
    uint32_t words[kWordsPerLane];
#pragma unroll
    for (int k = 0; k < kWordsPerLane; ++k)
      words[k] = reinterpret_cast<const uint32_t*>(packed + first_byte)[k * kWarpSize + lane];
    const float block_absmax = lane < kTileBlocks ? dequantized_absmax(absmax_codes, nested_absmax, nested_offset,
                                                                       tile * kTileBlocks + lane)
                                                  : 0.0f;
#pragma unroll
    for (int k = 0; k < kWordsPerLane; ++k) {
      // Word k of lane l starts at byte k * 128 + 4 l of the tile: 64-block 4 k + l / 8 (32 bytes each).
      const float absmax = __shfl_sync(kFullWarp, block_absmax, k * (kWarpSize * 4 / 32) + lane / 8);
      uint32_t pairs[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) pairs[i] = dequantize_byte((words[k] >> (8 * i)) & 0xFF, absmax, lane_code);
      const int64_t byte = first_byte + 4 * (k * kWarpSize + lane);
      *reinterpret_cast<uint4*>(out + layout.pair(byte)) = make_uint4(pairs[0], pairs[1], pairs[2], pairs[3]);
    }
  } else {
    const int64_t byte = tiles * kTileBytes + (thread - tiles * kWarpSize);
    const bool inside = byte < bytes;
    const uint32_t pair = dequantize_byte(
        inside ? packed[byte] : 0,
        inside ? dequantized_absmax(absmax_codes, nested_absmax, nested_offset, 2 * byte / cpu::kNf4BlockSize) : 0.0f,
        lane_code);
    if (inside) out[layout.pair(byte)] = pair;
  }
}

// One launch: a warp per whole tile, then a thread per byte left.
template <typename Out>
void launch_dequantize(const char* what, const uint8_t* packed, const uint8_t* absmax_codes,
                       const float* nested_absmax, float nested_offset, int64_t bytes, Out layout, uint16_t* out,
                       void* stream) {
  if (reinterpret_cast<uintptr_t>(packed) % 4 != 0 || reinterpret_cast<uintptr_t>(out) % 16 != 0)
    throw std::invalid_argument(std::string(what) + ": packed must be 4-byte and out 16-byte aligned");
  const int64_t tiles = bytes / kTileBytes, tail_bytes = bytes % kTileBytes;
  const int64_t blocks = (tiles * kWarpSize + tail_bytes + kDequantThreads - 1) / kDequantThreads;
  if (blocks == 0) return;
  if (blocks > INT_MAX)
    throw std::invalid_argument(std::string(what) + ": " + std::to_string(2 * bytes) + " elements exceed one launch");
  nf4_dequantize_kernel<<<static_cast<unsigned>(blocks), kDequantThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      packed, absmax_codes, nested_absmax, nested_offset, tiles, bytes, layout, reinterpret_cast<uint32_t*>(out));
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), what);
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
  launch_dequantize("nf4_dequantize_bf16", packed, absmax_codes, nested_absmax, nested_offset, numel / 2, DenseOut{},
                    out, stream);
}

void nf4_dequantize_bf16_rows(const uint8_t* packed, const uint8_t* absmax_codes, const float* nested_absmax,
                              float nested_offset, int64_t rows, int64_t cols, int64_t ld, uint16_t* out,
                              void* stream) {
  if (rows < 0 || cols <= 0 || cols % 8 != 0 || ld < cols || ld % 8 != 0)
    throw std::invalid_argument("nf4_dequantize_bf16_rows: needs cols a positive multiple of 8 and a row stride "
                                ">= cols, a multiple of 8; got rows " + std::to_string(rows) + ", cols " +
                                std::to_string(cols) + ", ld " + std::to_string(ld));
  if (rows * cols / 2 > int64_t{UINT32_MAX} || ld / 2 > int64_t{UINT32_MAX})
    throw std::invalid_argument("nf4_dequantize_bf16_rows: " + std::to_string(rows * cols) +
                                " elements exceed the 32-bit row arithmetic (2^33 at most)");
  launch_dequantize("nf4_dequantize_bf16_rows", packed, absmax_codes, nested_absmax, nested_offset, rows * cols / 2,
                    RowsOut{static_cast<uint32_t>(cols / 2), static_cast<uint32_t>(ld / 2)}, out, stream);
}

}  // namespace ssmtune::cuda
