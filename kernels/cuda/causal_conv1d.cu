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
// Document starts are a compile-time variant (kBounded): without them the kernels are the plain causal
// conv, with no per-token index loads or tap masks. history and d_tail are runtime pointers touched only
// by the first and last K-1 rows of a sequence.
constexpr int kMaxKernel = 8;
constexpr int kChunk = 32;
constexpr int kBatch = 4;
constexpr int kMaxThreads = 128;

__device__ float sigmoid(float p) { return 1.0f / (1.0f + expf(-p)); }

// Where a thread works: blocks enumerate (sequence, chunk, channel tile), channel tiles fastest.
struct Tile {
  int64_t seq;   // the sequence
  int64_t row0;  // the sequence's first row
  int64_t t0;    // first time step of the chunk
  int64_t d;     // first channel
};
__device__ Tile tile_of(int V, int64_t len, int64_t d_tiles, int64_t chunks) {
  const int64_t block = blockIdx.x;
  const int64_t rest = block / d_tiles;
  const int64_t seq = rest / chunks;
  return {seq, seq * len, (rest % chunks) * kChunk, ((block % d_tiles) * blockDim.x + threadIdx.x) * V};
}

// The first tap of token t that reads t's own document: tap k reads position t-(K-1)+k, which must not be
// before doc_start (<= t, so tap K-1 always counts).
template <int K>
__device__ int first_tap(int32_t doc_start, int64_t t) {
  const int64_t first = doc_start - t + (K - 1);
  return first > 0 ? static_cast<int>(first) : 0;
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

// window[k] holds the input at time t-(K-1)+k. The pre-activation in the CPU's order: bias, then taps
// first..K-1 (the CPU also skips taps that read a null history or zeros before the sequence start; here
// they read zeros, and adding w*0 changes nothing).
template <int K, int V>
__device__ void pre_activation(const float (&w)[K][V], const float (&b)[V], const float (&window)[K][V],
                               float (&p)[V], int first) {
#pragma unroll
  for (int e = 0; e < V; ++e) {
    p[e] = b[e];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (k >= first) p[e] += w[k][e] * window[k][e];
    }
  }
}

template <int V>
__device__ void silu_grad(const float (&p)[V], const float (&du)[V], float (&g)[V]) {
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const float sig = sigmoid(p[e]);
    g[e] = du[e] * sig * (1.0f + p[e] * (1.0f - sig));
  }
}

template <int K, typename T>
__device__ void shift(T (&window)[K]) {
#pragma unroll
  for (int k = 0; k + 1 < K; ++k) window[k] = window[k + 1];
}
template <int K, int V>
__device__ void shift(float (&window)[K][V]) {
#pragma unroll
  for (int k = 0; k + 1 < K; ++k) {
#pragma unroll
    for (int e = 0; e < V; ++e) window[k][e] = window[k + 1][e];
  }
}

// The K-1 inputs before t0 into window[0..K-2]: x, or before the sequence start the history (this
// sequence's rows, at this thread's channels) or zeros.
template <int K, int V>
__device__ void load_history(const __nv_bfloat16* __restrict__ x, int64_t x_row_stride,
                             const __nv_bfloat16* __restrict__ history, int64_t dim, int64_t t0,
                             float (&window)[K][V]) {
#pragma unroll
  for (int k = 0; k + 1 < K; ++k) {
    const int64_t t = t0 - (K - 1) + k;
    if (t >= 0) {
      load(x + t * x_row_stride, window[k]);
    } else if (history) {
      load(history + (t + K - 1) * dim, window[k]);
    } else {
#pragma unroll
      for (int e = 0; e < V; ++e) window[k][e] = 0.0f;
    }
  }
}

template <int K, int V, bool kBounded>
__global__ void __launch_bounds__(kMaxThreads)
    causal_conv1d_silu_forward_kernel(const __nv_bfloat16* __restrict__ x, int64_t x_row_stride,
                                      const float* __restrict__ weight, const float* __restrict__ bias,
                                      __nv_bfloat16* __restrict__ u, int64_t len, int64_t dim, int64_t d_tiles,
                                      int64_t chunks, const int32_t* __restrict__ doc_start,
                                      const __nv_bfloat16* __restrict__ history) {
  const Tile tile = tile_of(V, len, d_tiles, chunks);
  if (tile.d >= dim) return;
  x += tile.row0 * x_row_stride + tile.d;
  u += tile.row0 * dim + tile.d;
  if (history) history += tile.seq * (K - 1) * dim + tile.d;
  if constexpr (kBounded) doc_start += tile.row0;
  float w[K][V], b[V], window[K][V];
  load_taps(weight, bias, tile.d, w, b);
  load_history(x, x_row_stride, history, dim, tile.t0, window);
  const int64_t t_end = min(tile.t0 + kChunk, len);
  for (int64_t base = tile.t0; base < t_end; base += kBatch) {
    Bf16Vec<V> rows[kBatch];
    int32_t starts[kBatch];
#pragma unroll
    for (int s = 0; s < kBatch; ++s) {
      if (base + s < t_end) {
        rows[s] = load_raw<V>(x + (base + s) * x_row_stride);
        if constexpr (kBounded) starts[s] = doc_start[base + s];
      }
    }
#pragma unroll
    for (int s = 0; s < kBatch; ++s) {
      if (base + s >= t_end) break;
      to_float(rows[s], window[K - 1]);
      int first = 0;
      if constexpr (kBounded) first = first_tap<K>(starts[s], base + s);
      float out[V];
      pre_activation(w, b, window, out, first);
#pragma unroll
      for (int e = 0; e < V; ++e) out[e] *= sigmoid(out[e]);
      store(u + (base + s) * dim, out);
      shift(window);
    }
  }
}

// Step t computes g[t] (zero past the sequence end) and, once K values of g are in hand, the complete
// dx[t-(K-1)] = sum_k w[k] g[t-k] over the taps that read t-(K-1) inside their token's document, summed
// from k = K-1 down to 0 as the CPU accumulates it, then d_tail for the last K-1 rows.
template <int K, int V, bool kBounded>
__global__ void __launch_bounds__(kMaxThreads)
    causal_conv1d_silu_backward_kernel(const __nv_bfloat16* __restrict__ x, int64_t x_row_stride,
                                       const float* __restrict__ weight, const float* __restrict__ bias,
                                       const __nv_bfloat16* __restrict__ du, __nv_bfloat16* __restrict__ dx,
                                       int64_t dx_row_stride, int64_t len, int64_t dim, int64_t d_tiles,
                                       int64_t chunks, const int32_t* __restrict__ doc_start,
                                       const __nv_bfloat16* __restrict__ history,
                                       const __nv_bfloat16* __restrict__ d_tail) {
  const Tile tile = tile_of(V, len, d_tiles, chunks);
  if (tile.d >= dim) return;
  x += tile.row0 * x_row_stride + tile.d;
  du += tile.row0 * dim + tile.d;
  dx += tile.row0 * dx_row_stride + tile.d;
  if (history) history += tile.seq * (K - 1) * dim + tile.d;
  if (d_tail) d_tail += tile.seq * (K - 1) * dim + tile.d;
  if constexpr (kBounded) doc_start += tile.row0;
  float w[K][V], b[V], window[K][V];
  float g_window[K][V] = {};  // g at times t-(K-1)..t; those before t0 are never used
  int32_t start_window[K] = {};  // doc_start at the same times (kBounded only)
  load_taps(weight, bias, tile.d, w, b);
  load_history(x, x_row_stride, history, dim, tile.t0, window);
  const int64_t tau_end = min(tile.t0 + kChunk, len);
  const int64_t t_end = tau_end + (K - 1);
  const int64_t tail_begin = len - (K - 1);
  for (int64_t base = tile.t0; base < t_end; base += kBatch) {
    Bf16Vec<V> x_rows[kBatch], du_rows[kBatch];
    int32_t starts[kBatch];
#pragma unroll
    for (int s = 0; s < kBatch; ++s) {
      const int64_t t = base + s;
      if (t < t_end && t < len) {
        x_rows[s] = load_raw<V>(x + t * x_row_stride);
        du_rows[s] = load_raw<V>(du + t * dim);
        if constexpr (kBounded) starts[s] = doc_start[t];
      }
    }
#pragma unroll
    for (int s = 0; s < kBatch; ++s) {
      const int64_t t = base + s;
      if (t >= t_end) break;
      if (t < len) {
        to_float(x_rows[s], window[K - 1]);
        int first = 0;
        if constexpr (kBounded) {
          start_window[K - 1] = starts[s];
          first = first_tap<K>(starts[s], t);
        }
        float p[V], du_t[V];
        pre_activation(w, b, window, p, first);
        to_float(du_rows[s], du_t);
        silu_grad(p, du_t, g_window[K - 1]);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) g_window[K - 1][e] = 0.0f;
        if constexpr (kBounded) start_window[K - 1] = 0;
      }
      const int64_t tau = t - (K - 1);
      if (tau >= tile.t0) {
        float out[V];
#pragma unroll
        for (int e = 0; e < V; ++e) {
          out[e] = w[K - 1][e] * g_window[0][e];
#pragma unroll
          for (int k = K - 2; k >= 0; --k) {
            // Tap k of the token at tau+(K-1)-k reads tau: only inside that token's document.
            if (!kBounded || start_window[K - 1 - k] <= tau) out[e] += w[k][e] * g_window[K - 1 - k][e];
          }
        }
        if (d_tail && tau >= tail_begin) {
          float tail[V];
          load(d_tail + (tau - tail_begin) * dim, tail);
#pragma unroll
          for (int e = 0; e < V; ++e) out[e] += tail[e];
        }
        store(dx + tau * dx_row_stride, out);
      }
      shift(window);
      shift(g_window);
      if constexpr (kBounded) shift(start_window);
    }
  }
}

// One thread per V channels of a sequence: g at the first K-1 tokens (the only ones whose taps reach the
// history), scattered onto the history positions they read, in increasing t as the CPU sums them.
template <int K, int V, bool kBounded>
__global__ void __launch_bounds__(kMaxThreads)
    causal_conv1d_silu_history_grad_kernel(const __nv_bfloat16* __restrict__ x, int64_t x_row_stride,
                                           const float* __restrict__ weight, const float* __restrict__ bias,
                                           const __nv_bfloat16* __restrict__ du, int64_t len, int64_t dim,
                                           int64_t d_tiles, const int32_t* __restrict__ doc_start,
                                           const __nv_bfloat16* __restrict__ history,
                                           __nv_bfloat16* __restrict__ d_history) {
  const Tile tile = tile_of(V, len, d_tiles, 1);
  if (tile.d >= dim) return;
  x += tile.row0 * x_row_stride + tile.d;
  du += tile.row0 * dim + tile.d;
  if (history) history += tile.seq * (K - 1) * dim + tile.d;
  d_history += tile.seq * (K - 1) * dim + tile.d;
  if constexpr (kBounded) doc_start += tile.row0;
  float w[K][V], b[V], window[K][V];
  float acc[K][V] = {};  // acc[j]: the gradient of history position j (j < K-1)
  load_taps(weight, bias, tile.d, w, b);
  load_history(x, x_row_stride, history, dim, 0, window);
#pragma unroll
  for (int t = 0; t + 1 < K; ++t) {
    if (t >= len) break;
    load(x + t * x_row_stride, window[K - 1]);
    const int first = kBounded ? first_tap<K>(doc_start[t], t) : 0;
    float p[V], du_t[V], g[V];
    pre_activation(w, b, window, p, first);
    load(du + t * dim, du_t);
    silu_grad(p, du_t, g);
    // Tap k of token t reads history position t+k while t+k < K-1.
#pragma unroll
    for (int k = 0; t + k + 1 < K; ++k) {
      if (k >= first) {
#pragma unroll
        for (int e = 0; e < V; ++e) acc[t + k][e] += w[k][e] * g[e];
      }
    }
    shift(window);
  }
#pragma unroll
  for (int j = 0; j + 1 < K; ++j) store(d_history + j * dim, acc[j]);
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

// Calls f(K, V, kBounded) as integral constants: the kernel width, 4 channels per thread when every
// row is 8-byte aligned (else 1), and whether document starts are given.
template <typename F>
void with_variant(int64_t kernel, bool vectorized, bool bounded, F&& f) {
  with_kernel_width(kernel, [&](auto k) {
    auto with_bounds = [&](auto v) {
      if (bounded) {
        f(k, v, std::true_type{});
      } else {
        f(k, v, std::false_type{});
      }
    };
    if (vectorized) {
      with_bounds(std::integral_constant<int, 4>{});
    } else {
      with_bounds(std::integral_constant<int, 1>{});
    }
  });
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
                                uint16_t* u, int64_t batch, int64_t len, int64_t dim, int64_t kernel,
                                const int32_t* doc_start, const uint16_t* history, void* stream) {
  constexpr const char* op = "causal_conv1d_silu_forward";
  check_shape(op, batch, len, dim, kernel, x_row_stride);
  if (batch == 0 || len == 0 || dim == 0) return;
  const auto* x_bf16 = reinterpret_cast<const __nv_bfloat16*>(x);
  const auto* history_bf16 = reinterpret_cast<const __nv_bfloat16*>(history);
  auto* u_bf16 = reinterpret_cast<__nv_bfloat16*>(u);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  const bool vectorized =
      dim % 4 == 0 && x_row_stride % 4 == 0 && aligned(x, 8) && aligned(u, 8) && aligned(history, 8);
  with_variant(kernel, vectorized, doc_start != nullptr, [&](auto k, auto v, auto bounded) {
    const Launch l = launch_for(op, batch, len, dim, decltype(v)::value);
    causal_conv1d_silu_forward_kernel<decltype(k)::value, decltype(v)::value, decltype(bounded)::value>
        <<<l.blocks, l.threads, 0, cuda_stream>>>(x_bf16, x_row_stride, weight, bias, u_bf16, len, dim, l.d_tiles,
                                                  l.chunks, doc_start, history_bf16);
  });
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "causal_conv1d_silu_forward launch");
}

void causal_conv1d_silu_backward(const uint16_t* x, int64_t x_row_stride, const float* weight, const float* bias,
                                 const uint16_t* du, uint16_t* dx, int64_t dx_row_stride, int64_t batch, int64_t len,
                                 int64_t dim, int64_t kernel, const int32_t* doc_start, const uint16_t* history,
                                 const uint16_t* d_tail, void* stream) {
  constexpr const char* op = "causal_conv1d_silu_backward";
  check_shape(op, batch, len, dim, kernel, x_row_stride);
  if (dx_row_stride < dim) throw std::invalid_argument(std::string(op) + ": dx_row_stride < dim");
  if (d_tail && len < kernel - 1)
    throw std::invalid_argument(std::string(op) + ": d_tail needs len >= kernel-1 (len " + std::to_string(len) +
                                ", kernel " + std::to_string(kernel) + ")");
  if (batch == 0 || len == 0 || dim == 0) return;
  const auto* x_bf16 = reinterpret_cast<const __nv_bfloat16*>(x);
  const auto* du_bf16 = reinterpret_cast<const __nv_bfloat16*>(du);
  const auto* history_bf16 = reinterpret_cast<const __nv_bfloat16*>(history);
  const auto* d_tail_bf16 = reinterpret_cast<const __nv_bfloat16*>(d_tail);
  auto* dx_bf16 = reinterpret_cast<__nv_bfloat16*>(dx);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  const bool vectorized = dim % 4 == 0 && x_row_stride % 4 == 0 && dx_row_stride % 4 == 0 && aligned(x, 8) &&
                          aligned(du, 8) && aligned(dx, 8) && aligned(history, 8) && aligned(d_tail, 8);
  with_variant(kernel, vectorized, doc_start != nullptr, [&](auto k, auto v, auto bounded) {
    const Launch l = launch_for(op, batch, len, dim, decltype(v)::value);
    causal_conv1d_silu_backward_kernel<decltype(k)::value, decltype(v)::value, decltype(bounded)::value>
        <<<l.blocks, l.threads, 0, cuda_stream>>>(x_bf16, x_row_stride, weight, bias, du_bf16, dx_bf16,
                                                  dx_row_stride, len, dim, l.d_tiles, l.chunks, doc_start,
                                                  history_bf16, d_tail_bf16);
  });
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "causal_conv1d_silu_backward launch");
}

void causal_conv1d_silu_history_grad(const uint16_t* x, int64_t x_row_stride, const float* weight, const float* bias,
                                     const uint16_t* du, int64_t batch, int64_t len, int64_t dim, int64_t kernel,
                                     const int32_t* doc_start, const uint16_t* history, uint16_t* d_history,
                                     void* stream) {
  constexpr const char* op = "causal_conv1d_silu_history_grad";
  check_shape(op, batch, len, dim, kernel, x_row_stride);
  if (batch == 0 || dim == 0 || kernel == 1) return;  // no history to differentiate
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  const auto* x_bf16 = reinterpret_cast<const __nv_bfloat16*>(x);
  const auto* du_bf16 = reinterpret_cast<const __nv_bfloat16*>(du);
  const auto* history_bf16 = reinterpret_cast<const __nv_bfloat16*>(history);
  auto* d_history_bf16 = reinterpret_cast<__nv_bfloat16*>(d_history);
  const bool vectorized = dim % 4 == 0 && x_row_stride % 4 == 0 && aligned(x, 8) && aligned(du, 8) &&
                          aligned(history, 8) && aligned(d_history, 8);
  with_variant(kernel, vectorized, doc_start != nullptr, [&](auto k, auto v, auto bounded) {
    // One chunk per sequence: only its first kernel-1 tokens are read.
    const Launch l = launch_for(op, batch, 1, dim, decltype(v)::value);
    causal_conv1d_silu_history_grad_kernel<decltype(k)::value, decltype(v)::value, decltype(bounded)::value>
        <<<l.blocks, l.threads, 0, cuda_stream>>>(x_bf16, x_row_stride, weight, bias, du_bf16, len, dim, l.d_tiles,
                                                  doc_start, history_bf16, d_history_bf16);
  });
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "causal_conv1d_silu_history_grad launch");
}

}  // namespace ssmtune::cuda
