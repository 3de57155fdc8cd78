#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <climits>
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

// One thread per packed byte (two weights). The products and the sum are rounded separately
// (__fmul_rn/__fadd_rn: no fused multiply-add), so the result equals the CPU reference bit for bit
// before the final rounding to bf16.
__global__ void nf4_dequantize_kernel(const uint8_t* __restrict__ packed, const uint8_t* __restrict__ absmax_codes,
                                      const float* __restrict__ nested_absmax, float nested_offset,
                                      int64_t num_bytes, __nv_bfloat162* __restrict__ out) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= num_bytes) return;
  const int64_t block = (2 * j) / cpu::kNf4BlockSize;
  const float absmax = __fadd_rn(
      __fmul_rn(dynamic_map[absmax_codes[block]], nested_absmax[block / cpu::kNf4NestedBlockSize]), nested_offset);
  const uint8_t byte = packed[j];
  out[j] = __floats2bfloat162_rn(__fmul_rn(nf4_code[byte >> 4], absmax), __fmul_rn(nf4_code[byte & 0x0F], absmax));
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
  const int64_t num_bytes = numel / 2;
  constexpr int kThreads = 256;
  const int64_t blocks = (num_bytes + kThreads - 1) / kThreads;
  if (blocks == 0) return;
  nf4_dequantize_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      packed, absmax_codes, nested_absmax, nested_offset, num_bytes, reinterpret_cast<__nv_bfloat162*>(out));
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "nf4_dequantize_bf16 launch");
}

}  // namespace ssmtune::cuda
