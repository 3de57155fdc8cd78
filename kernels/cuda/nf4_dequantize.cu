#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/cpu/nf4.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/nf4_dequantize.h"

namespace ssmtune::cuda {
namespace {

__constant__ float nf4_code[16];
__constant__ float dynamic_map[256];

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
  SSMTUNE_CUDA_CHECK(cudaMemcpyToSymbol(dynamic_map, cpu::signed_dynamic_map(), sizeof(float) * 256), "nf4 tables");
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
