#include "kernels/cpu/causal_conv1d.h"
#include "kernels/cpu/activations.h"

#include <algorithm>
#include <cmath>

namespace ssmtune::cpu {

namespace {

// Channels per task of the backward: one thread walks every token for its block of channels, which keeps
// the weight and bias sums deterministic while the innermost loop reads a contiguous run of each row.
constexpr int64_t kChannelBlock = 64;

// g = du * silu'(p).
template <typename T>
T silu_grad(T p, T du) {
  const T s = sigmoid(p);
  return du * s * (T(1) + p * (T(1) - s));
}

// The conv input of one slice: x for positions >= 0, history before, and the document bounds.
template <typename T>
struct ConvInput {
  const T* x;
  int64_t x_row_stride;
  const T* history;  // nullable: zeros
  const int32_t* doc_start;
  int64_t len, dim, kernel;

  // The first tap of token t of row b that may read a non-zero input: taps before its document's start
  // or before the history read zero. A tap reading a null history is within bounds but reads zero.
  int64_t first_tap(int64_t b, int64_t t) const {
    int64_t lowest = -(kernel - 1);
    if (doc_start) lowest = std::max<int64_t>(lowest, doc_start[b * len + t]);
    return std::max<int64_t>(0, lowest - t + (kernel - 1));
  }
  // Row of input position s >= -(K-1) of row b, or null where it is zero (a null history).
  const T* row(int64_t b, int64_t s) const {
    if (s >= 0) return x + (b * len + s) * x_row_stride;
    return history ? history + (b * (kernel - 1) + s + kernel - 1) * dim : nullptr;
  }
  // The pre-activation of channel d of token t, summed in the forward's order (bias, then taps 0..K-1).
  T pre_activation(const T* weight, const T* bias, int64_t b, int64_t t, int64_t d) const {
    T p = bias ? bias[d] : T(0);
    for (int64_t k = first_tap(b, t); k < kernel; ++k) {
      if (const T* in = row(b, t - (kernel - 1) + k)) p += weight[d * kernel + k] * in[d];
    }
    return p;
  }
};

}  // namespace

template <typename T>
void causal_conv1d_silu_forward(const T* x, int64_t x_row_stride, const T* weight, const T* bias, T* u,
                                int64_t batch, int64_t len, int64_t dim, int64_t kernel, const int32_t* doc_start,
                                const std::type_identity_t<T>* history) {
  const ConvInput<T> in{x, x_row_stride, history, doc_start, len, dim, kernel};
#pragma omp parallel for schedule(static) if (batch * len * dim * kernel > (1 << 14))
  for (int64_t row = 0; row < batch * len; ++row) {
    const int64_t b = row / len, t = row % len;
    T* urow = u + row * dim;
    for (int64_t d = 0; d < dim; ++d) urow[d] = bias ? bias[d] : T(0);
    // Tap k reads the token k-(K-1) steps back; taps that read zeros are skipped.
    for (int64_t k = in.first_tap(b, t); k < kernel; ++k) {
      const T* xrow = in.row(b, t - (kernel - 1) + k);
      if (!xrow) continue;
      for (int64_t d = 0; d < dim; ++d) urow[d] += weight[d * kernel + k] * xrow[d];
    }
    for (int64_t d = 0; d < dim; ++d) urow[d] *= sigmoid(urow[d]);
  }
}

template <typename T>
void causal_conv1d_silu_backward(const T* x, int64_t x_row_stride, const T* weight, const T* bias, const T* du,
                                 T* dx, int64_t dx_row_stride, T* dweight, T* dbias, int64_t batch, int64_t len,
                                 int64_t dim, int64_t kernel, const int32_t* doc_start,
                                 const std::type_identity_t<T>* history, const std::type_identity_t<T>* d_tail) {
  const ConvInput<T> in{x, x_row_stride, history, doc_start, len, dim, kernel};
  const int64_t blocks = (dim + kChannelBlock - 1) / kChannelBlock;
#pragma omp parallel for schedule(static) if (batch * len * dim * kernel > (1 << 14))
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t begin = block * kChannelBlock;
    const int64_t end = std::min(dim, begin + kChannelBlock);
    for (int64_t b = 0; b < batch; ++b) {
      // Walking t forward, g_t is the last contribution any earlier dx row needs from the future, and the
      // first one dx[t] gets (through tap K-1, which always reads t's own document): so dx[t] is
      // initialised here and the earlier taps scatter into rows already initialised. No buffer of past g
      // values is needed. Taps reading the history (positions < 0) are the history gradient's.
      for (int64_t t = 0; t < len; ++t) {
        const int64_t row = b * len + t;
        const int64_t first_tap = in.first_tap(b, t);
        const int64_t first_dx_tap = std::max<int64_t>(first_tap, kernel - 1 - t);
        for (int64_t d = begin; d < end; ++d) {
          const T* w = weight + d * kernel;
          const T g = silu_grad(in.pre_activation(weight, bias, b, t, d), du[row * dim + d]);
          dx[row * dx_row_stride + d] = w[kernel - 1] * g;
          for (int64_t k = first_dx_tap; k < kernel - 1; ++k) dx[(row - (kernel - 1) + k) * dx_row_stride + d] += w[k] * g;
          if (dweight) {
            for (int64_t k = first_tap; k < kernel; ++k) {
              if (const T* source = in.row(b, t - (kernel - 1) + k)) dweight[d * kernel + k] += g * source[d];
            }
          }
          if (dbias) dbias[d] += g;
        }
      }
      if (!d_tail) continue;
      for (int64_t j = std::max<int64_t>(0, kernel - 1 - len); j < kernel - 1; ++j) {
        const int64_t row = b * len + len - (kernel - 1) + j;
        for (int64_t d = begin; d < end; ++d) dx[row * dx_row_stride + d] += d_tail[(b * (kernel - 1) + j) * dim + d];
      }
    }
  }
}

template <typename T>
void causal_conv1d_silu_history_grad(const T* x, int64_t x_row_stride, const T* weight, const T* bias, const T* du,
                                     int64_t batch, int64_t len, int64_t dim, int64_t kernel,
                                     const int32_t* doc_start, const std::type_identity_t<T>* history,
                                     T* d_history) {
  const ConvInput<T> in{x, x_row_stride, history, doc_start, len, dim, kernel};
  const int64_t reach = std::min(kernel - 1, len);  // the outputs that read the history
#pragma omp parallel for schedule(static) if (batch * dim * kernel * kernel > (1 << 14))
  for (int64_t b = 0; b < batch; ++b) {
    T* dh = d_history + b * (kernel - 1) * dim;
    std::fill(dh, dh + (kernel - 1) * dim, T(0));
    // The same order as dx in the backward: each position's taps in increasing t.
    for (int64_t t = 0; t < reach; ++t) {
      const int64_t first_tap = in.first_tap(b, t);
      for (int64_t d = 0; d < dim; ++d) {
        const T g = silu_grad(in.pre_activation(weight, bias, b, t, d), du[(b * len + t) * dim + d]);
        // Tap k of token t reads history position j = t + k (the input at t-(K-1)+k < 0).
        for (int64_t k = first_tap; k < kernel - 1 - t; ++k) dh[(t + k) * dim + d] += weight[d * kernel + k] * g;
      }
    }
  }
}

template void causal_conv1d_silu_forward<float>(const float*, int64_t, const float*, const float*, float*, int64_t,
                                                int64_t, int64_t, int64_t, const int32_t*, const float*);
template void causal_conv1d_silu_forward<double>(const double*, int64_t, const double*, const double*, double*,
                                                 int64_t, int64_t, int64_t, int64_t, const int32_t*, const double*);
template void causal_conv1d_silu_backward<float>(const float*, int64_t, const float*, const float*, const float*,
                                                 float*, int64_t, float*, float*, int64_t, int64_t, int64_t, int64_t,
                                                 const int32_t*, const float*, const float*);
template void causal_conv1d_silu_backward<double>(const double*, int64_t, const double*, const double*,
                                                  const double*, double*, int64_t, double*, double*, int64_t,
                                                  int64_t, int64_t, int64_t, const int32_t*, const double*,
                                                  const double*);
template void causal_conv1d_silu_history_grad<float>(const float*, int64_t, const float*, const float*, const float*,
                                                     int64_t, int64_t, int64_t, int64_t, const int32_t*, const float*,
                                                     float*);
template void causal_conv1d_silu_history_grad<double>(const double*, int64_t, const double*, const double*,
                                                      const double*, int64_t, int64_t, int64_t, int64_t,
                                                      const int32_t*, const double*, double*);

}  // namespace ssmtune::cpu
