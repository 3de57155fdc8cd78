#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/cuda/check.h"
#include "kernels/cuda/recurrent_step.h"

namespace ssmtune::cuda {
namespace {

constexpr int kThreads = 256;

// Full-precision expf/log1pf: a decoding step is a handful of elements per channel, nowhere near the
// full-sequence scan's bound on the SFU, so there is nothing to gain from the approximate forms.
__device__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ float softplus(float x) { return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x))); }

__device__ float load(const __nv_bfloat16* p) { return __bfloat162float(p[0]); }

// Thread i handles row i / dim, channel i % dim; window taps in the CPU reference's order.
__global__ void __launch_bounds__(kThreads)
    causal_conv1d_silu_step_kernel(const __nv_bfloat16* __restrict__ x, int64_t x_row_stride,
                                   const float* __restrict__ weight, const float* __restrict__ bias,
                                   float* __restrict__ window, __nv_bfloat16* __restrict__ u, int64_t rows, int64_t dim,
                                   int64_t kernel) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * dim) return;
  const int64_t r = i / dim, d = i % dim, past = kernel - 1;
  const float* w = weight + d * kernel;
  float* win = window + i * past;
  const float x_now = load(x + r * x_row_stride + d);
  float p = bias ? bias[d] : 0.0f;
  for (int64_t k = 0; k < past; ++k) p += w[k] * win[k];
  p += w[past] * x_now;
  u[i] = __float2bfloat16_rn(p * sigmoid(p));
  for (int64_t k = 0; k + 1 < past; ++k) win[k] = win[k + 1];
  if (past > 0) win[past - 1] = x_now;
}

__global__ void __launch_bounds__(kThreads)
    selective_scan_step_kernel(const __nv_bfloat16* __restrict__ u, const __nv_bfloat16* __restrict__ delta,
                               const float* __restrict__ delta_bias, const float* __restrict__ A,
                               const __nv_bfloat16* __restrict__ B, const __nv_bfloat16* __restrict__ C,
                               int64_t bc_row_stride, const float* __restrict__ Dskip,
                               const __nv_bfloat16* __restrict__ z, int64_t z_row_stride, float* __restrict__ h,
                               __nv_bfloat16* __restrict__ out, int64_t rows, int64_t dim, int64_t state) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * dim) return;
  const int64_t r = i / dim, d = i % dim;
  const float u_t = load(u + i);
  const float delta_t = softplus(load(delta + i) + delta_bias[d]);
  const float delta_u = delta_t * u_t;
  const float* A_row = A + d * state;
  const __nv_bfloat16* B_t = B + r * bc_row_stride;
  const __nv_bfloat16* C_t = C + r * bc_row_stride;
  float* h_rd = h + i * state;
  float y = 0.0f;
  for (int64_t n = 0; n < state; ++n) {
    const float h_n = expf(delta_t * A_row[n]) * h_rd[n] + load(B_t + n) * delta_u;
    h_rd[n] = h_n;
    y += load(C_t + n) * h_n;
  }
  y += Dskip[d] * u_t;
  const float z_t = load(z + r * z_row_stride + d);
  out[i] = __float2bfloat16_rn(y * (z_t * sigmoid(z_t)));
}

unsigned blocks_for(const char* op, int64_t rows, int64_t dim) {
  if (rows < 0 || dim < 0) throw std::invalid_argument(std::string(op) + ": negative rows or dim");
  const int64_t blocks = (rows * dim + kThreads - 1) / kThreads;
  if (blocks > INT32_MAX) throw std::invalid_argument(std::string(op) + ": shape too large for one launch");
  return static_cast<unsigned>(blocks);
}

}  // namespace

void causal_conv1d_silu_step(const uint16_t* x, int64_t x_row_stride, const float* weight, const float* bias,
                             float* window, uint16_t* u, int64_t rows, int64_t dim, int64_t kernel, void* stream) {
  constexpr const char* op = "causal_conv1d_silu_step";
  if (kernel < 1) throw std::invalid_argument(std::string(op) + ": kernel must be at least 1");
  if (x_row_stride < dim) throw std::invalid_argument(std::string(op) + ": x_row_stride < dim");
  const unsigned blocks = blocks_for(op, rows, dim);
  if (blocks == 0) return;
  causal_conv1d_silu_step_kernel<<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const __nv_bfloat16*>(x), x_row_stride, weight, bias, window,
      reinterpret_cast<__nv_bfloat16*>(u), rows, dim, kernel);
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "causal_conv1d_silu_step launch");
}

void selective_scan_step(const uint16_t* u, const uint16_t* delta, const float* delta_bias, const float* A,
                         const uint16_t* B, const uint16_t* C, int64_t bc_row_stride, const float* Dskip,
                         const uint16_t* z, int64_t z_row_stride, float* h, uint16_t* out, int64_t rows, int64_t dim,
                         int64_t state, void* stream) {
  constexpr const char* op = "selective_scan_step";
  if (state < 1) throw std::invalid_argument(std::string(op) + ": state must be at least 1");
  const unsigned blocks = blocks_for(op, rows, dim);
  if (blocks == 0) return;
  selective_scan_step_kernel<<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const __nv_bfloat16*>(u), reinterpret_cast<const __nv_bfloat16*>(delta), delta_bias, A,
      reinterpret_cast<const __nv_bfloat16*>(B), reinterpret_cast<const __nv_bfloat16*>(C), bc_row_stride, Dskip,
      reinterpret_cast<const __nv_bfloat16*>(z), z_row_stride, h, reinterpret_cast<__nv_bfloat16*>(out), rows, dim,
      state);
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "selective_scan_step launch");
}

}  // namespace ssmtune::cuda
