#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "kernels/cuda/check.h"
#include "kernels/cuda/rmsnorm.h"
#include "kernels/cuda/vector_access.cuh"

namespace ssmtune::cuda {
namespace {

// One block per row, the row held in registers between the reduction and the output pass, so each input
// is read once: a thread keeps 16 values (four float4 or sixteen scalars), which bounds dim at 16 * 1024.
constexpr int kValuesPerThread = 16;
constexpr int kMaxThreads = 1024;

// w = 1 without a weight (the weightless norms of falcon-mamba): multiplying by 1 is exact.
template <int V>
__device__ void load_weight(const float* weight, int64_t i, float (&w)[V]) {
  if (weight) {
    load(weight + i, w);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) w[e] = 1.0f;
  }
}

// Sum over the warp by the xor butterfly: a fixed order, and every lane gets the same value,
// since a + b == b + a exactly.
__device__ float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// Sum over the block (blockDim.x a multiple of 32) by a fixed tree, so the result is the same on every run;
// every thread gets it. Called once per kernel: a second call would need a barrier before partial is rewritten.
__device__ float block_sum(float value, float* partial) {
  value = warp_sum(value);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = value;
  __syncthreads();
  return warp_sum(lane < static_cast<int>(blockDim.x / 32) ? partial[lane] : 0.0f);
}

// Calls f(i, column) for item i of this thread, the vector of V values at column (i * blockDim.x +
// threadIdx.x) * V of the row, where the row has it. Unrolled, so i indexes register arrays.
template <int V, typename F>
__device__ void for_each_item(int64_t dim, F&& f) {
#pragma unroll
  for (int i = 0; i < kValuesPerThread / V; ++i) {
    const int64_t column = (static_cast<int64_t>(i) * blockDim.x + threadIdx.x) * V;
    if (column < dim) f(i, column);
  }
}

// x and x_out may alias (each thread reads its elements before writing them), so neither is __restrict__.
template <int V>
__global__ void __launch_bounds__(kMaxThreads)
    rmsnorm_forward_kernel(const float* x, const __nv_bfloat16* __restrict__ add, float* x_out,
                           const float* __restrict__ weight, __nv_bfloat16* __restrict__ y, int64_t ldy,
                           float* __restrict__ rstd, int64_t dim, float eps) {
  __shared__ float partial[32];
  const int64_t row = blockIdx.x;
  x += row * dim;
  y += row * ldy;
  if (add) {
    add += row * dim;
    x_out += row * dim;
  }
  float values[kValuesPerThread / V][V];
  float sum_sq = 0.0f;
  for_each_item<V>(dim, [&](int i, int64_t column) {
    load(x + column, values[i]);
    if (add) {
      float a[V];
      load(add + column, a);
#pragma unroll
      for (int e = 0; e < V; ++e) values[i][e] += a[e];
      store(x_out + column, values[i]);
    }
#pragma unroll
    for (int e = 0; e < V; ++e) sum_sq += values[i][e] * values[i][e];
  });
  const float row_rstd = 1.0f / sqrtf(block_sum(sum_sq, partial) / static_cast<float>(dim) + eps);
  if (threadIdx.x == 0) rstd[row] = row_rstd;
  for_each_item<V>(dim, [&](int i, int64_t column) {
    float w[V], out[V];
    load_weight(weight, column, w);
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] = values[i][e] * row_rstd * w[e];
    store(y + column, out);
  });
}

// dy and dx_act may alias: every thread reads its dy before the barrier inside block_sum and writes
// dx_act after it, so the whole row of dy is read before any of it is overwritten.
template <int V>
__global__ void __launch_bounds__(kMaxThreads)
    rmsnorm_backward_kernel(const float* __restrict__ x, const float* __restrict__ weight,
                            const float* __restrict__ rstd, const __nv_bfloat16* dy, float* __restrict__ dx,
                            __nv_bfloat16* dx_act, int64_t dim) {
  __shared__ float partial[32];
  const int64_t row = blockIdx.x;
  x += row * dim;
  dy += row * dim;
  dx += row * dim;
  if (dx_act) dx_act += row * dim;
  float xs[kValuesPerThread / V][V], dys[kValuesPerThread / V][V];
  float dot = 0.0f;
  for_each_item<V>(dim, [&](int i, int64_t column) {
    float w[V];
    load(x + column, xs[i]);
    load(dy + column, dys[i]);
    load_weight(weight, column, w);
#pragma unroll
    for (int e = 0; e < V; ++e) dot += dys[i][e] * w[e] * xs[i][e];
  });
  const float row_rstd = rstd[row];
  const float x_coeff = row_rstd * row_rstd * row_rstd * block_sum(dot, partial) / static_cast<float>(dim);
  for_each_item<V>(dim, [&](int i, int64_t column) {
    float w[V], d[V];
    load_weight(weight, column, w);
    load(dx + column, d);
#pragma unroll
    for (int e = 0; e < V; ++e) d[e] += row_rstd * w[e] * dys[i][e] - xs[i][e] * x_coeff;
    store(dx + column, d);
    if (dx_act) store(dx_act + column, d);
  });
}

// The weightless norm's rows are narrow (d_state 16, dt_rank up to a few hundred) and there are many of
// them: one warp per row, lanes striding across the row, several rows per block. Each row is read twice
// (the sum, then the output); the second read hits the cache, and these rows are a small share of a
// layer's traffic either way.
constexpr int kWeightlessRowsPerBlock = 8;

// The warp's row, or -1 past the end; a whole warp shares its row, so the shuffles see all 32 lanes.
__device__ int64_t weightless_row(int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWeightlessRowsPerBlock + threadIdx.x / 32;
  return row < rows ? row : -1;
}

__global__ void __launch_bounds__(kWeightlessRowsPerBlock * 32)
    weightless_rmsnorm_forward_kernel(const __nv_bfloat16* __restrict__ x, int64_t ldx, __nv_bfloat16* __restrict__ y,
                                      int64_t ldy, float* __restrict__ rstd, int64_t rows, int64_t dim, float eps) {
  const int64_t row = weightless_row(rows);
  if (row < 0) return;
  const int lane = threadIdx.x % 32;
  x += row * ldx;
  y += row * ldy;
  float sum_sq = 0.0f;
  for (int64_t i = lane; i < dim; i += 32) {
    const float v = __bfloat162float(x[i]);
    sum_sq += v * v;
  }
  const float row_rstd = 1.0f / sqrtf(warp_sum(sum_sq) / static_cast<float>(dim) + eps);
  if (lane == 0) rstd[row] = row_rstd;
  for (int64_t i = lane; i < dim; i += 32) y[i] = __float2bfloat16_rn(__bfloat162float(x[i]) * row_rstd);
}

__global__ void __launch_bounds__(kWeightlessRowsPerBlock * 32)
    weightless_rmsnorm_backward_kernel(const __nv_bfloat16* __restrict__ x, int64_t ldx, const float* __restrict__ rstd,
                                       const __nv_bfloat16* __restrict__ dy, int64_t lddy,
                                       __nv_bfloat16* __restrict__ dx, int64_t lddx, int64_t rows, int64_t dim) {
  const int64_t row = weightless_row(rows);
  if (row < 0) return;
  const int lane = threadIdx.x % 32;
  x += row * ldx;
  dy += row * lddy;
  dx += row * lddx;
  float dot = 0.0f;
  for (int64_t i = lane; i < dim; i += 32) dot += __bfloat162float(dy[i]) * __bfloat162float(x[i]);
  const float row_rstd = rstd[row];
  const float x_coeff = row_rstd * row_rstd * row_rstd * warp_sum(dot) / static_cast<float>(dim);
  for (int64_t i = lane; i < dim; i += 32)
    dx[i] = __float2bfloat16_rn(row_rstd * __bfloat162float(dy[i]) - __bfloat162float(x[i]) * x_coeff);
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Threads for a row: whole warps with kValuesPerThread values each, whichever the vector width.
int threads_for(const char* op, int64_t dim) {
  const int64_t threads = ((dim + kValuesPerThread - 1) / kValuesPerThread + 31) / 32 * 32;
  if (threads > kMaxThreads)
    throw std::invalid_argument(std::string(op) + ": dim " + std::to_string(dim) + " exceeds the supported " +
                                std::to_string(kValuesPerThread * kMaxThreads));
  return static_cast<int>(threads);
}

void check_shape(const char* op, int64_t rows, int64_t dim) {
  if (rows < 0 || rows > INT32_MAX || dim < 1)
    throw std::invalid_argument(std::string(op) + ": needs 0 <= rows < 2^31 and dim >= 1, got rows " +
                                std::to_string(rows) + ", dim " + std::to_string(dim));
}

void check_strides(const char* op, int64_t dim, std::initializer_list<int64_t> strides) {
  for (const int64_t ld : strides)
    if (ld < dim)
      throw std::invalid_argument(std::string(op) + ": row stride " + std::to_string(ld) + " is below dim " +
                                  std::to_string(dim));
}

unsigned weightless_blocks(int64_t rows) {
  return static_cast<unsigned>((rows + kWeightlessRowsPerBlock - 1) / kWeightlessRowsPerBlock);
}

}  // namespace

void rmsnorm_forward(const float* x, const uint16_t* add, float* x_out, const float* weight, uint16_t* y, int64_t ldy,
                     float* rstd, int64_t rows, int64_t dim, float eps, void* stream) {
  check_shape("rmsnorm_forward", rows, dim);
  check_strides("rmsnorm_forward", dim, {ldy});
  if (add && !x_out) throw std::invalid_argument("rmsnorm_forward: add given without x_out");
  if (rows == 0) return;
  const auto* add_bf16 = reinterpret_cast<const __nv_bfloat16*>(add);
  auto* y_bf16 = reinterpret_cast<__nv_bfloat16*>(y);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  const int threads = threads_for("rmsnorm_forward", dim);
  // float4 / 4 x bf16 accesses need every row start aligned: dim % 4 and aligned base pointers.
  const bool vectorized = dim % 4 == 0 && ldy % 4 == 0 && aligned(x, 16) && aligned(weight, 16) && aligned(y, 8) &&
                          (!add || (aligned(add, 8) && aligned(x_out, 16)));
  if (vectorized) {
    rmsnorm_forward_kernel<4>
        <<<static_cast<unsigned>(rows), threads, 0, cuda_stream>>>(x, add_bf16, x_out, weight, y_bf16, ldy, rstd, dim,
                                                                        eps);
  } else {
    rmsnorm_forward_kernel<1>
        <<<static_cast<unsigned>(rows), threads, 0, cuda_stream>>>(x, add_bf16, x_out, weight, y_bf16, ldy, rstd, dim,
                                                                        eps);
  }
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "rmsnorm_forward launch");
}

void rmsnorm_backward(const float* x, const float* weight, const float* rstd, const uint16_t* dy, float* dx,
                      uint16_t* dx_act, int64_t rows, int64_t dim, void* stream) {
  check_shape("rmsnorm_backward", rows, dim);
  if (rows == 0) return;
  const auto* dy_bf16 = reinterpret_cast<const __nv_bfloat16*>(dy);
  auto* dx_act_bf16 = reinterpret_cast<__nv_bfloat16*>(dx_act);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  const int threads = threads_for("rmsnorm_backward", dim);
  const bool vectorized =
      dim % 4 == 0 && aligned(x, 16) && aligned(weight, 16) && aligned(dy, 8) && aligned(dx, 16) && aligned(dx_act, 8);
  if (vectorized) {
    rmsnorm_backward_kernel<4>
        <<<static_cast<unsigned>(rows), threads, 0, cuda_stream>>>(x, weight, rstd, dy_bf16, dx, dx_act_bf16, dim);
  } else {
    rmsnorm_backward_kernel<1>
        <<<static_cast<unsigned>(rows), threads, 0, cuda_stream>>>(x, weight, rstd, dy_bf16, dx, dx_act_bf16, dim);
  }
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "rmsnorm_backward launch");
}

void weightless_rmsnorm_forward(const uint16_t* x, int64_t ldx, uint16_t* y, int64_t ldy, float* rstd, int64_t rows,
                                int64_t dim, float eps, void* stream) {
  check_shape("weightless_rmsnorm_forward", rows, dim);
  check_strides("weightless_rmsnorm_forward", dim, {ldx, ldy});
  if (rows == 0) return;
  weightless_rmsnorm_forward_kernel<<<weightless_blocks(rows), kWeightlessRowsPerBlock * 32, 0,
                                      static_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const __nv_bfloat16*>(x), ldx, reinterpret_cast<__nv_bfloat16*>(y), ldy, rstd, rows, dim, eps);
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "weightless_rmsnorm_forward launch");
}

void weightless_rmsnorm_backward(const uint16_t* x, int64_t ldx, const float* rstd, const uint16_t* dy, int64_t lddy,
                                 uint16_t* dx, int64_t lddx, int64_t rows, int64_t dim, void* stream) {
  check_shape("weightless_rmsnorm_backward", rows, dim);
  check_strides("weightless_rmsnorm_backward", dim, {ldx, lddy, lddx});
  if (rows == 0) return;
  weightless_rmsnorm_backward_kernel<<<weightless_blocks(rows), kWeightlessRowsPerBlock * 32, 0,
                                       static_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const __nv_bfloat16*>(x), ldx, rstd, reinterpret_cast<const __nv_bfloat16*>(dy), lddy,
      reinterpret_cast<__nv_bfloat16*>(dx), lddx, rows, dim);
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "weightless_rmsnorm_backward launch");
}

}  // namespace ssmtune::cuda
