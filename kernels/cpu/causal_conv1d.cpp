#include "kernels/cpu/causal_conv1d.h"

#include <algorithm>
#include <cmath>

namespace ssmtune::cpu {

namespace {

// Channels per task of the backward: one thread walks every token for its block of channels, which keeps
// the weight and bias sums deterministic while the innermost loop reads a contiguous run of each row.
constexpr int64_t kChannelBlock = 64;

template <typename T>
T sigmoid(T p) {
  return T(1) / (T(1) + std::exp(-p));
}

}  // namespace

template <typename T>
void causal_conv1d_silu_forward(const T* x, int64_t x_row_stride, const T* weight, const T* bias, T* u,
                                int64_t batch, int64_t len, int64_t dim, int64_t kernel) {
#pragma omp parallel for schedule(static) if (batch * len * dim * kernel > (1 << 14))
  for (int64_t row = 0; row < batch * len; ++row) {
    const int64_t t = row % len;
    T* urow = u + row * dim;
    for (int64_t d = 0; d < dim; ++d) urow[d] = bias ? bias[d] : T(0);
    // Tap k reads the token k-(K-1) steps back; taps before the sequence start read zeros, so skip them.
    for (int64_t k = std::max<int64_t>(0, kernel - 1 - t); k < kernel; ++k) {
      const T* xrow = x + (row - (kernel - 1) + k) * x_row_stride;
      for (int64_t d = 0; d < dim; ++d) urow[d] += weight[d * kernel + k] * xrow[d];
    }
    for (int64_t d = 0; d < dim; ++d) urow[d] *= sigmoid(urow[d]);
  }
}

template <typename T>
void causal_conv1d_silu_backward(const T* x, int64_t x_row_stride, const T* weight, const T* bias, const T* du,
                                 T* dx, int64_t dx_row_stride, T* dweight, T* dbias, int64_t batch, int64_t len,
                                 int64_t dim, int64_t kernel) {
  const int64_t blocks = (dim + kChannelBlock - 1) / kChannelBlock;
#pragma omp parallel for schedule(static) if (batch * len * dim * kernel > (1 << 14))
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t begin = block * kChannelBlock;
    const int64_t end = std::min(dim, begin + kChannelBlock);
    for (int64_t b = 0; b < batch; ++b) {
      // Walking t forward, g_t is the last contribution any earlier dx row needs from the future, and the
      // first one dx[t] gets (through tap K-1): so dx[t] is initialised here and the earlier taps scatter
      // into rows already initialised. No buffer of past g values is needed.
      for (int64_t t = 0; t < len; ++t) {
        const int64_t row = b * len + t;
        const int64_t first_tap = std::max<int64_t>(0, kernel - 1 - t);
        for (int64_t d = begin; d < end; ++d) {
          const T* w = weight + d * kernel;
          T p = bias ? bias[d] : T(0);  // the same summation order as the forward
          for (int64_t k = first_tap; k < kernel; ++k) p += w[k] * x[(row - (kernel - 1) + k) * x_row_stride + d];
          const T s = sigmoid(p);
          const T g = du[row * dim + d] * s * (T(1) + p * (T(1) - s));
          dx[row * dx_row_stride + d] = w[kernel - 1] * g;
          for (int64_t k = first_tap; k < kernel - 1; ++k) dx[(row - (kernel - 1) + k) * dx_row_stride + d] += w[k] * g;
          if (dweight) {
            for (int64_t k = first_tap; k < kernel; ++k) {
              dweight[d * kernel + k] += g * x[(row - (kernel - 1) + k) * x_row_stride + d];
            }
          }
          if (dbias) dbias[d] += g;
        }
      }
    }
  }
}

template void causal_conv1d_silu_forward<float>(const float*, int64_t, const float*, const float*, float*, int64_t,
                                                int64_t, int64_t, int64_t);
template void causal_conv1d_silu_forward<double>(const double*, int64_t, const double*, const double*, double*,
                                                 int64_t, int64_t, int64_t, int64_t);
template void causal_conv1d_silu_backward<float>(const float*, int64_t, const float*, const float*, const float*,
                                                 float*, int64_t, float*, float*, int64_t, int64_t, int64_t,
                                                 int64_t);
template void causal_conv1d_silu_backward<double>(const double*, int64_t, const double*, const double*,
                                                  const double*, double*, int64_t, double*, double*, int64_t,
                                                  int64_t, int64_t, int64_t);

}  // namespace ssmtune::cpu
