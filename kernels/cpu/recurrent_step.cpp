// One token of the conv and the scan from a carried state; the math is in recurrent_step.h. Each
// expression is written as causal_conv1d.cpp and selective_scan.cpp write it (the same association,
// the same order of sums), which is what makes the step path equal the full-sequence path bit for bit.
#include "kernels/cpu/recurrent_step.h"
#include "kernels/cpu/activations.h"

#include <algorithm>
#include <cmath>

namespace ssmtune::cpu {

template <typename T>
void causal_conv1d_silu_step(const T* x, int64_t x_row_stride, const T* weight, const T* bias, T* window, T* u,
                             int64_t rows, int64_t dim, int64_t kernel) {
  const int64_t past = kernel - 1;
#pragma omp parallel for schedule(static) if (rows * dim * kernel > (1 << 14))
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t d = 0; d < dim; ++d) {
      const T* w = weight + d * kernel;
      T* win = window + (r * dim + d) * past;
      const T x_now = x[r * x_row_stride + d];
      T p = bias ? bias[d] : T(0);
      for (int64_t k = 0; k < past; ++k) p += w[k] * win[k];
      p += w[past] * x_now;
      u[r * dim + d] = p * sigmoid(p);
      for (int64_t k = 0; k + 1 < past; ++k) win[k] = win[k + 1];
      if (past > 0) win[past - 1] = x_now;
    }
  }
}

template <typename T>
void selective_scan_step(const T* u, const T* delta, const T* delta_bias, const T* A, const T* Bm, const T* Cm,
                         int64_t bc_row_stride, const T* Dskip, const T* z, int64_t z_row_stride, T* h, T* out,
                         int64_t rows, int64_t dim, int64_t state) {
#pragma omp parallel for collapse(2) schedule(static) if (rows * dim * state > (1 << 14))
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t d = 0; d < dim; ++d) {
      const T u_t = u[r * dim + d];
      const T delta_t = softplus(delta[r * dim + d] + delta_bias[d]);
      const T delta_u = delta_t * u_t;
      const T* A_row = A + d * state;
      const T* B_t = Bm + r * bc_row_stride;
      const T* C_t = Cm + r * bc_row_stride;
      T* h_rd = h + (r * dim + d) * state;
      T y = T(0);
      for (int64_t n = 0; n < state; ++n) {
        h_rd[n] = std::exp(delta_t * A_row[n]) * h_rd[n] + B_t[n] * delta_u;
        y += C_t[n] * h_rd[n];
      }
      y = y + Dskip[d] * u_t;
      const T z_t = z[r * z_row_stride + d];
      out[r * dim + d] = y * (z_t * sigmoid(z_t));
    }
  }
}

template void causal_conv1d_silu_step<float>(const float*, int64_t, const float*, const float*, float*, float*, int64_t,
                                             int64_t, int64_t);
template void causal_conv1d_silu_step<double>(const double*, int64_t, const double*, const double*, double*, double*,
                                              int64_t, int64_t, int64_t);
template void selective_scan_step<float>(const float*, const float*, const float*, const float*, const float*,
                                         const float*, int64_t, const float*, const float*, int64_t, float*, float*,
                                         int64_t, int64_t, int64_t);
template void selective_scan_step<double>(const double*, const double*, const double*, const double*, const double*,
                                          const double*, int64_t, const double*, const double*, int64_t, double*,
                                          double*, int64_t, int64_t, int64_t);

}  // namespace ssmtune::cpu
