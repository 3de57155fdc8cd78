#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/cuda/adamw.h"
#include "kernels/cuda/check.h"

namespace ssmtune::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 16;  // elementwise ops loop over the rest (grid-stride)
// sum_of_squares runs on this fixed grid whatever n and the device: each thread sums its elements in
// index order and the partials are combined by a fixed tree, so the result is the same on every run.
constexpr int kSumBlocks = 512;

unsigned blocks_for(int64_t n) { return static_cast<unsigned>(std::min(kMaxBlocks, (n + kThreads - 1) / kThreads)); }

__device__ int64_t first_index() { return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ int64_t grid_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// The CPU's formula in the CPU's order (kernels/cpu/adamw.cpp), constants rounded to float on the host as
// the CPU rounds them, and every product and sum rounded on its own (no fused multiply-add): where the CPU
// reference does not contract either, the two agree bit for bit.
__global__ void adamw_update_kernel(float* __restrict__ params, const float* __restrict__ grads, float* __restrict__ m,
                                    float* __restrict__ v, int64_t n, float decay, float step_size, float bc2_sqrt,
                                    float beta1, float beta2, float eps) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const float g = grads[i];
    const float p = __fmul_rn(params[i], decay);
    const float mi = __fadd_rn(__fmul_rn(beta1, m[i]), __fmul_rn(1.0f - beta1, g));
    const float vi = __fadd_rn(__fmul_rn(beta2, v[i]), __fmul_rn(__fmul_rn(1.0f - beta2, g), g));
    m[i] = mi;
    v[i] = vi;
    params[i] = __fsub_rn(p, __fdiv_rn(__fmul_rn(step_size, mi), __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2_sqrt), eps)));
  }
}

// Sum over a block of kThreads threads by a fixed tree; the total lands in thread 0.
__device__ double block_sum(double value) {
  __shared__ double partial[kThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  value = lane < kThreads / 32 ? partial[lane] : 0.0;
  if (warp == 0) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;
}

// A float squared is exact in double (24-bit mantissa, 48-bit product), as on the CPU.
__global__ void __launch_bounds__(kThreads)
    sum_of_squares_partial_kernel(const float* __restrict__ x, int64_t n, double* __restrict__ partial) {
  double sum = 0.0;
#pragma unroll 4
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const double value = x[i];
    sum += value * value;
  }
  sum = block_sum(sum);
  if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

// One block: kSumBlocks partials, kThreads at a time, each thread in index order, then the tree.
__global__ void __launch_bounds__(kThreads) sum_of_squares_final_kernel(double* partial) {
  double sum = 0.0;
  for (int i = threadIdx.x; i < kSumBlocks; i += kThreads) sum += partial[i];
  sum = block_sum(sum);
  if (threadIdx.x == 0) partial[kSumBlocks] = sum;
}

__global__ void scale_kernel(float* __restrict__ x, int64_t n, float factor) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) x[i] *= factor;
}

void check_count(const char* op, int64_t n) {
  if (n < 0) throw std::invalid_argument(std::string(op) + ": negative element count " + std::to_string(n));
}

}  // namespace

void adamw_update(float* params, const float* grads, float* m, float* v, int64_t n, double lr, double beta1,
                  double beta2, double eps, double weight_decay, double bias_correction1, double bias_correction2,
                  void* stream) {
  check_count("adamw_update", n);
  if (n == 0) return;
  adamw_update_kernel<<<blocks_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      params, grads, m, v, n, static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(lr / bias_correction1),
      static_cast<float>(std::sqrt(bias_correction2)), static_cast<float>(beta1), static_cast<float>(beta2),
      static_cast<float>(eps));
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "adamw_update launch");
}

size_t sum_of_squares_workspace_bytes(int64_t) { return (kSumBlocks + 1) * sizeof(double); }

double sum_of_squares(const float* x, int64_t n, void* workspace, void* stream) {
  check_count("sum_of_squares", n);
  if (n == 0) return 0.0;
  auto* partial = static_cast<double*>(workspace);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  sum_of_squares_partial_kernel<<<kSumBlocks, kThreads, 0, cuda_stream>>>(x, n, partial);
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "sum_of_squares launch");
  sum_of_squares_final_kernel<<<1, kThreads, 0, cuda_stream>>>(partial);
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "sum_of_squares launch");
  double total = 0.0;
  SSMTUNE_CUDA_CHECK(cudaMemcpyAsync(&total, partial + kSumBlocks, sizeof(double), cudaMemcpyDeviceToHost, cuda_stream),
                     "sum_of_squares");
  SSMTUNE_CUDA_CHECK(cudaStreamSynchronize(cuda_stream), "sum_of_squares");
  return total;
}

void scale(float* x, int64_t n, double factor, void* stream) {
  check_count("scale", n);
  if (n == 0) return;
  scale_kernel<<<blocks_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(x, n, static_cast<float>(factor));
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "scale launch");
}

}  // namespace ssmtune::cuda
