#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernels/cuda/causal_conv1d.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/vector_access.cuh"

namespace ssmtune::cuda {
namespace {

// Each thread owns V adjacent channels (V = 4: 8-byte accesses, a warp covering 256 contiguous bytes of a
// row) over kChunk consecutive time steps, keeping the last K inputs in registers, so x is read once plus
// a halo of K-1 rows per chunk (2(K-1) in the backward). Within a chunk the rows are fetched kBatch at a
// time before any is used, which keeps several loads in flight per thread.
constexpr int kMaxKernel = 8;
constexpr int kChunk = 32;
constexpr int kBatch = 4;
constexpr int kMaxThreads = 128;

__device__ float sigmoid(float p) { return 1.0f / (1.0f + expf(-p)); }

// Where a thread works: blocks enumerate (sequence, chunk, channel tile), channel tiles fastest.
struct Tile {
  int64_t row0;  // the sequence's first row
  int64_t t0;    // first time step of the chunk
  int64_t d;     // first channel
};
__device__ Tile tile_of(int V, int64_t len, int64_t d_tiles, int64_t chunks) {
  const int64_t block = blockIdx.x;
  const int64_t rest = block / d_tiles;
  return {(rest / chunks) * len, (rest % chunks) * kChunk, ((block % d_tiles) * blockDim.x + threadIdx.x) * V};
}

template <int K, int V>
__device__ void load_taps(const float* __restrict__ weight, const float* __restrict__ bias, int64_t d, float (&w)[K][V],
                          float (&b)[V]) {
#pragma unroll
  for (int e = 0; e < V; ++e) {
    b[e] = bias ? bias[d + e] : 0.0f;
#pragma unroll
    for (int k = 0; k < K; ++k) w[k][e] = weight[(d + e) * K + k];
  }
}

// window[k] holds x at time t-(K-1)+k. The pre-activation in the CPU's order: bias, then taps 0..K-1 (the
// CPU skips taps before the sequence start; here they read zeros, and adding w*0 changes nothing).
template <int K, int V>
__device__ void pre_activation(const float (&w)[K][V], const float (&b)[V], const float (&window)[K][V],
                               float (&p)[V]) {
#pragma unroll
  for (int e = 0; e < V; ++e) {
    p[e] = b[e];
#pragma unroll
    for (int k = 0; k < K; ++k) p[e] += w[k][e] * window[k][e];
  }
}

template <int K, int V>
__device__ void shift(float (&window)[K][V]) {
#pragma unroll
  for (int k = 0; k + 1 < K; ++k) {
#pragma unroll
    for (int e = 0; e < V; ++e) window[k][e] = window[k + 1][e];
  }
}

// The K-1 inputs before t0 (zeros before the sequence start) into window[0..K-2].
template <int K, int V>
__device__ void load_history(const __nv_bfloat16* __restrict__ x, int64_t x_row_stride, const Tile& tile,
                             float (&window)[K][V]) {
#pragma unroll
  for (int k = 0; k + 1 < K; ++k) {
    const int64_t t = tile.t0 - (K - 1) + k;
    if (t >= 0) {
      to_float(load_raw<V>(x + t * x_row_stride), window[k]);
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) window[k][e] = 0.0f;
    }
  }
}

template <int K, int V>
__global__ void __launch_bounds__(kMaxThreads)
    causal_conv1d_silu_forward_kernel(const __nv_bfloat16* __restrict__ x, int64_t x_row_stride,
                                      const float* __restrict__ weight, const float* __restrict__ bias,
                                      __nv_bfloat16* __restrict__ u, int64_t len, int64_t dim, int64_t d_tiles,
                                      int64_t chunks) {
  const Tile tile = tile_of(V, len, d_tiles, chunks);
  if (tile.d >= dim) return;
  x += tile.row0 * x_row_stride + tile.d;
  u += tile.row0 * dim + tile.d;
  float w[K][V], b[V], window[K][V];
  load_taps(weight, bias, tile.d, w, b);
  load_history(x, x_row_stride, tile, window);
  const int64_t t_end = min(tile.t0 + kChunk, len);
  for (int64_t base = tile.t0; base < t_end; base += kBatch) {
    Bf16Vec<V> rows[kBatch];
#pragma unroll
    for (int s = 0; s < kBatch; ++s) {
      if (base + s < t_end) rows[s] = load_raw<V>(x + (base + s) * x_row_stride);
    }
#pragma unroll
    for (int s = 0; s < kBatch; ++s) {
      if (base + s >= t_end) break;
      to_float(rows[s], window[K - 1]);
      float out[V];
      pre_activation(w, b, window, out);
#pragma unroll
      for (int e = 0; e < V; ++e) out[e] *= sigmoid(out[e]);
      store(u + (base + s) * dim, out);
      shift(window);
    }
  }
}

// Step t computes g[t] (zero past the sequence end) and, once K values of g are in hand, the complete
// dx[t-(K-1)] = sum_k w[k] g[t-k], summed from k = K-1 down to 0 as the CPU accumulates it.
template <int K, int V>
__global__ void __launch_bounds__(kMaxThreads)
    causal_conv1d_silu_backward_kernel(const __nv_bfloat16* __restrict__ x, int64_t x_row_stride,
                                       const float* __restrict__ weight, const float* __restrict__ bias,
                                       const __nv_bfloat16* __restrict__ du, __nv_bfloat16* __restrict__ dx,
                                       int64_t dx_row_stride, int64_t len, int64_t dim, int64_t d_tiles,
                                       int64_t chunks) {
  const Tile tile = tile_of(V, len, d_tiles, chunks);
  if (tile.d >= dim) return;
  x += tile.row0 * x_row_stride + tile.d;
  du += tile.row0 * dim + tile.d;
  dx += tile.row0 * dx_row_stride + tile.d;
  float w[K][V], b[V], window[K][V];
  float g_window[K][V] = {};  // g at times t-(K-1)..t; those before t0 are never used
  load_taps(weight, bias, tile.d, w, b);
  load_history(x, x_row_stride, tile, window);
  const int64_t tau_end = min(tile.t0 + kChunk, len);
  const int64_t t_end = tau_end + (K - 1);
  for (int64_t base = tile.t0; base < t_end; base += kBatch) {
    Bf16Vec<V> x_rows[kBatch], du_rows[kBatch];
#pragma unroll
    for (int s = 0; s < kBatch; ++s) {
      const int64_t t = base + s;
      if (t < t_end && t < len) {
        x_rows[s] = load_raw<V>(x + t * x_row_stride);
        du_rows[s] = load_raw<V>(du + t * dim);
      }
    }
#pragma unroll
    for (int s = 0; s < kBatch; ++s) {
      const int64_t t = base + s;
      if (t >= t_end) break;
      if (t < len) {
        to_float(x_rows[s], window[K - 1]);
        float p[V], du_t[V];
        pre_activation(w, b, window, p);
        to_float(du_rows[s], du_t);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float sig = sigmoid(p[e]);
          g_window[K - 1][e] = du_t[e] * sig * (1.0f + p[e] * (1.0f - sig));
        }
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) g_window[K - 1][e] = 0.0f;
      }
      const int64_t tau = t - (K - 1);
      if (tau >= tile.t0) {
        float out[V];
#pragma unroll
        for (int e = 0; e < V; ++e) {
          out[e] = w[K - 1][e] * g_window[0][e];
#pragma unroll
          for (int k = K - 2; k >= 0; --k) out[e] += w[k][e] * g_window[K - 1 - k][e];
        }
        store(dx + tau * dx_row_stride, out);
      }
      shift(window);
      shift(g_window);
    }
  }
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Calls f(std::integral_constant<int, K>) for the runtime kernel width K, 1..kMaxKernel (checked before).
template <int K = 1, typename F>
void with_kernel_width(int64_t kernel, F&& f) {
  if constexpr (K <= kMaxKernel) {
    if (kernel == K) {
      f(std::integral_constant<int, K>{});
    } else {
      with_kernel_width<K + 1>(kernel, f);
    }
  }
}

void check_shape(const char* op, int64_t batch, int64_t len, int64_t dim, int64_t kernel, int64_t x_row_stride) {
  if (kernel < 1 || kernel > kMaxKernel)
    throw std::invalid_argument(std::string(op) + ": kernel width " + std::to_string(kernel) + " unsupported (1.." +
                                std::to_string(kMaxKernel) + ")");
  if (batch < 0 || len < 0 || dim < 0 || x_row_stride < dim)
    throw std::invalid_argument(std::string(op) + ": bad shape (batch " + std::to_string(batch) + ", len " +
                                std::to_string(len) + ", dim " + std::to_string(dim) + ", x_row_stride " +
                                std::to_string(x_row_stride) + ")");
}

// Grid of (sequence, chunk, channel tile) blocks for V channels per thread.
struct Launch {
  int threads;
  unsigned blocks;
  int64_t d_tiles;
  int64_t chunks;
};
Launch launch_for(const char* op, int64_t batch, int64_t len, int64_t dim, int V) {
  const int64_t vectors = (dim + V - 1) / V;
  const int64_t threads = std::min<int64_t>(kMaxThreads, (vectors + 31) / 32 * 32);
  const int64_t d_tiles = (vectors + threads - 1) / threads;
  const int64_t chunks = (len + kChunk - 1) / kChunk;
  const int64_t blocks = d_tiles * chunks * batch;
  if (blocks > INT32_MAX) throw std::invalid_argument(std::string(op) + ": shape too large for one launch");
  return {static_cast<int>(threads), static_cast<unsigned>(blocks), d_tiles, chunks};
}

}  // namespace

void causal_conv1d_silu_forward(const uint16_t* x, int64_t x_row_stride, const float* weight, const float* bias,
                                uint16_t* u, int64_t batch, int64_t len, int64_t dim, int64_t kernel, void* stream) {
  constexpr const char* op = "causal_conv1d_silu_forward";
  check_shape(op, batch, len, dim, kernel, x_row_stride);
  if (batch == 0 || len == 0 || dim == 0) return;
  const auto* x_bf16 = reinterpret_cast<const __nv_bfloat16*>(x);
  auto* u_bf16 = reinterpret_cast<__nv_bfloat16*>(u);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  const bool vectorized = dim % 4 == 0 && x_row_stride % 4 == 0 && aligned(x, 8) && aligned(u, 8);
  with_kernel_width(kernel, [&](auto k) {
    constexpr int K = decltype(k)::value;
    if (vectorized) {
      const Launch l = launch_for(op, batch, len, dim, 4);
      causal_conv1d_silu_forward_kernel<K, 4><<<l.blocks, l.threads, 0, cuda_stream>>>(
          x_bf16, x_row_stride, weight, bias, u_bf16, len, dim, l.d_tiles, l.chunks);
    } else {
      const Launch l = launch_for(op, batch, len, dim, 1);
      causal_conv1d_silu_forward_kernel<K, 1><<<l.blocks, l.threads, 0, cuda_stream>>>(
          x_bf16, x_row_stride, weight, bias, u_bf16, len, dim, l.d_tiles, l.chunks);
    }
  });
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "causal_conv1d_silu_forward launch");
}

void causal_conv1d_silu_backward(const uint16_t* x, int64_t x_row_stride, const float* weight, const float* bias,
                                 const uint16_t* du, uint16_t* dx, int64_t dx_row_stride, int64_t batch, int64_t len,
                                 int64_t dim, int64_t kernel, void* stream) {
  constexpr const char* op = "causal_conv1d_silu_backward";
  check_shape(op, batch, len, dim, kernel, x_row_stride);
  if (dx_row_stride < dim) throw std::invalid_argument(std::string(op) + ": dx_row_stride < dim");
  if (batch == 0 || len == 0 || dim == 0) return;
  const auto* x_bf16 = reinterpret_cast<const __nv_bfloat16*>(x);
  const auto* du_bf16 = reinterpret_cast<const __nv_bfloat16*>(du);
  auto* dx_bf16 = reinterpret_cast<__nv_bfloat16*>(dx);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  const bool vectorized = dim % 4 == 0 && x_row_stride % 4 == 0 && dx_row_stride % 4 == 0 && aligned(x, 8) &&
                          aligned(du, 8) && aligned(dx, 8);
  with_kernel_width(kernel, [&](auto k) {
    constexpr int K = decltype(k)::value;
    if (vectorized) {
      const Launch l = launch_for(op, batch, len, dim, 4);
      causal_conv1d_silu_backward_kernel<K, 4><<<l.blocks, l.threads, 0, cuda_stream>>>(
          x_bf16, x_row_stride, weight, bias, du_bf16, dx_bf16, dx_row_stride, len, dim, l.d_tiles, l.chunks);
    } else {
      const Launch l = launch_for(op, batch, len, dim, 1);
      causal_conv1d_silu_backward_kernel<K, 1><<<l.blocks, l.threads, 0, cuda_stream>>>(
          x_bf16, x_row_stride, weight, bias, du_bf16, dx_bf16, dx_row_stride, len, dim, l.d_tiles, l.chunks);
    }
  });
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "causal_conv1d_silu_backward launch");
}

}  // namespace ssmtune::cuda
