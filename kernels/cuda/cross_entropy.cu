#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/cuda/check.h"
#include "kernels/cuda/cross_entropy.h"

namespace ssmtune::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Byte offsets into the workspace. Rows of logits and dlogits are `ld` elements apart, vocab rounded up to
// 8, so every row starts 16-byte aligned for float4 loads and for cuBLASLt's vectorised kernels.
struct CrossEntropyLayout {
  int64_t ld;
  size_t logits, dlogits, losses, bytes;
};

CrossEntropyLayout cross_entropy_layout(int64_t rows, int64_t slice_rows, int64_t vocab) {
  CrossEntropyLayout l{};
  l.ld = (vocab + 7) / 8 * 8;
  l.logits = 0;                                                                           // fp32 [slice_rows, ld]
  l.dlogits = l.logits + align256(static_cast<size_t>(slice_rows * l.ld) * sizeof(float));  // bf16 [slice_rows, ld]
  l.losses = l.dlogits + align256(static_cast<size_t>(slice_rows * l.ld) * 2);             // double [rows]
  l.bytes = l.losses + align256(static_cast<size_t>(rows) * sizeof(double));
  return l;
}

// A running (max, sum of exp(x - max)) pair: the softmax denominator in one pass over the logits.
struct MaxSum {
  float max, sum;
};

__device__ __forceinline__ void add(MaxSum& s, float x) {
  if (x > s.max) {
    s.sum = s.sum * expf(s.max - x) + 1.0f;
    s.max = x;
  } else {
    s.sum += expf(x - s.max);
  }
}

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.max, b.max);
  if (m == -INFINITY) return {m, 0.0f};  // both empty: avoid -inf - -inf
  return {m, a.sum * expf(a.max - m) + b.sum * expf(b.max - m)};
}

__device__ __forceinline__ MaxSum warp_reduce(MaxSum v) {
  for (int offset = 16; offset > 0; offset /= 2)
    v = combine(v, {__shfl_down_sync(0xffffffffu, v.max, offset), __shfl_down_sync(0xffffffffu, v.sum, offset)});
  return v;
}

// Fixed tree over fixed per-thread strides: the same bits every run. The result is valid in thread 0.
__device__ MaxSum block_reduce(MaxSum v) {
  __shared__ MaxSum per_warp[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_reduce(v);
  if (lane == 0) per_warp[warp] = v;
  __syncthreads();
  if (warp == 0) v = warp_reduce(lane < kWarps ? per_warp[lane] : MaxSum{-INFINITY, 0.0f});
  return v;
}

__device__ __forceinline__ float logit_gradient(float logit, int64_t v, float lse, float scale, int32_t target) {
  const float g = scale * expf(logit - lse);
  return v == target ? g - scale : g;
}

// One block per row of the slice: the row's loss (times its weight, in double) and, when dlogits is not
// null, grad_scale * weight * (softmax - onehot) in bf16.
__global__ void __launch_bounds__(kThreads)
    cross_entropy_rows_kernel(const float* __restrict__ logits, int64_t ld, int64_t vocab, int64_t first_row,
                              const int32_t* __restrict__ targets, const __nv_bfloat16* __restrict__ weights,
                              float grad_scale, __nv_bfloat16* __restrict__ dlogits, double* __restrict__ losses) {
  const int64_t t = first_row + blockIdx.x;
  const float weight = __bfloat162float(weights[t]);
  const float* row = logits + blockIdx.x * ld;
  __nv_bfloat16* grad = dlogits ? dlogits + blockIdx.x * ld : nullptr;
  const int64_t vectors = vocab / 4;
  if (weight == 0.0f) {
    // Excluded: the row's logits (NaN when its h row is) and its target are never read; a zero gradient row
    // makes the dh product write a zero dh row.
    if (threadIdx.x == 0) losses[t] = 0.0;
    if (grad)
      for (int64_t v = threadIdx.x; v < vocab; v += kThreads) grad[v] = __float2bfloat16_rn(0.0f);
    return;
  }

  const float4* row4 = reinterpret_cast<const float4*>(row);
  MaxSum s{-INFINITY, 0.0f};
  for (int64_t j = threadIdx.x; j < vectors; j += kThreads) {
    const float4 q = row4[j];
    add(s, q.x);
    add(s, q.y);
    add(s, q.z);
    add(s, q.w);
  }
  for (int64_t v = 4 * vectors + threadIdx.x; v < vocab; v += kThreads) add(s, row[v]);
  s = block_reduce(s);

  __shared__ float lse_shared;
  __shared__ int32_t target_shared;
  if (threadIdx.x == 0) {
    const int32_t target = targets[t];
    const float lse = s.max + logf(s.sum);
    // Targets are validated by the caller; one out of range gives a NaN loss rather than a stray read.
    const float loss = target >= 0 && target < vocab ? lse - row[target] : NAN;
    losses[t] = static_cast<double>(weight) * static_cast<double>(loss);
    lse_shared = lse;
    target_shared = target;
  }
  if (!grad) return;
  __syncthreads();
  const float lse = lse_shared, scale = grad_scale * weight;
  const int32_t target = target_shared;
  __nv_bfloat162* grad2 = reinterpret_cast<__nv_bfloat162*>(grad);
  for (int64_t j = threadIdx.x; j < vectors; j += kThreads) {
    const float4 q = row4[j];
    const int64_t v = 4 * j;
    grad2[2 * j] = __floats2bfloat162_rn(logit_gradient(q.x, v, lse, scale, target),
                                         logit_gradient(q.y, v + 1, lse, scale, target));
    grad2[2 * j + 1] = __floats2bfloat162_rn(logit_gradient(q.z, v + 2, lse, scale, target),
                                             logit_gradient(q.w, v + 3, lse, scale, target));
  }
  for (int64_t v = 4 * vectors + threadIdx.x; v < vocab; v += kThreads)
    grad[v] = __float2bfloat16_rn(logit_gradient(row[v], v, lse, scale, target));
}

}  // namespace

size_t cross_entropy_workspace_bytes(int64_t rows, int64_t slice_rows, int64_t vocab) {
  return cross_entropy_layout(rows, slice_rows, vocab).bytes;
}

double cross_entropy_forward_backward(Gemm& gemm, const uint16_t* h, const uint16_t* W, int64_t rows, int64_t dim,
                                      int64_t vocab, const int32_t* targets, const uint16_t* weights,
                                      float grad_scale, uint16_t* dh, void* workspace, int64_t slice_rows) {
  if (rows < 0 || dim < 1 || vocab < 1 || vocab > std::numeric_limits<int32_t>::max() || slice_rows < 1)
    throw std::invalid_argument("cross_entropy_forward_backward: needs rows >= 0, dim >= 1, 1 <= vocab < 2^31 and "
                                "slice_rows >= 1, got rows=" + std::to_string(rows) + " dim=" + std::to_string(dim) +
                                " vocab=" + std::to_string(vocab) + " slice_rows=" + std::to_string(slice_rows));
  if (rows == 0) return 0.0;
  const auto stream = static_cast<cudaStream_t>(gemm.stream());
  const CrossEntropyLayout layout = cross_entropy_layout(rows, slice_rows, vocab);
  char* base = static_cast<char*>(workspace);
  float* logits = reinterpret_cast<float*>(base + layout.logits);
  uint16_t* dlogits = dh ? reinterpret_cast<uint16_t*>(base + layout.dlogits) : nullptr;
  double* losses = reinterpret_cast<double*>(base + layout.losses);

  for (int64_t first = 0; first < rows; first += slice_rows) {
    const int64_t count = std::min(slice_rows, rows - first);
    gemm.run(false, true, count, vocab, dim, 1.0f, h + first * dim, dim, W, dim, 0.0f, logits, GemmOut::f32, layout.ld);
    cross_entropy_rows_kernel<<<static_cast<unsigned>(count), kThreads, 0, stream>>>(
        logits, layout.ld, vocab, first, targets, reinterpret_cast<const __nv_bfloat16*>(weights), grad_scale,
        reinterpret_cast<__nv_bfloat16*>(dlogits), losses);
    SSMTUNE_CUDA_CHECK(cudaGetLastError(), "cross_entropy rows launch");
    if (dh)
      gemm.run(false, false, count, dim, vocab, 1.0f, dlogits, layout.ld, W, dim, 0.0f, dh + first * dim,
               GemmOut::bf16, dim);
  }

  std::vector<double> row_losses(rows);
  SSMTUNE_CUDA_CHECK(cudaMemcpyAsync(row_losses.data(), losses, rows * sizeof(double), cudaMemcpyDeviceToHost, stream),
                     "cross_entropy losses to host");
  SSMTUNE_CUDA_CHECK(cudaStreamSynchronize(stream), "cross_entropy");
  double total = 0.0;
  for (const double loss : row_losses) total += loss;
  return total;
}

}  // namespace ssmtune::cuda
