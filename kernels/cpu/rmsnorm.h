// RMSNorm as Hugging Face MambaRMSNorm computes it, per row of `dim` values:
//   rstd = 1 / sqrt(mean_i(x_i^2) + eps),   y_i = x_i * rstd * w_i
// with w = 1 when weight is nullptr (falcon-mamba's weightless norm on B, C and dt_r, HF's rms_forward).
// Backward, with s = sum_i dy_i * w_i * x_i:
//   dx_j = rstd * w_j * dy_j - x_j * rstd^3 * s / dim
//   dw_i = sum over rows of dy_i * x_i * rstd
// rstd is saved by the forward (one value per row) so the backward needs only x, not y.
// Rows may be strided (row r of x at x + r * ldx, ld >= dim): falcon-mamba normalises the dt_r, B and C
// column ranges of the x_proj output in place in that matrix. Instantiated for float (training) and
// double (gradient checks).
#pragma once
#include <cstdint>

namespace ssmtune::cpu {

// x [rows, dim] (row stride ldx); y [rows, dim] (row stride ldy), written, not overlapping x;
// weight: [dim] or nullptr; rstd: [rows], written.
template <typename T>
void rmsnorm_forward(const T* x, int64_t ldx, const T* weight, T* y, int64_t ldy, T* rstd, int64_t rows, int64_t dim,
                     T eps);

// dx (row stride lddx) is added to when `accumulate` (the norm on the residual stream, whose gradient
// already holds the skip path's share) and written otherwise; it overlaps neither x nor dy.
// dweight (+=, nullable): summed over rows in a fixed order, so it does not depend on the thread count.
template <typename T>
void rmsnorm_backward(const T* x, int64_t ldx, const T* weight, const T* rstd, const T* dy, int64_t lddy, T* dx,
                      int64_t lddx, bool accumulate, T* dweight, int64_t rows, int64_t dim);

// Contiguous rows, dx accumulated: the residual stream's norms.
template <typename T>
void rmsnorm_forward(const T* x, const T* weight, T* y, T* rstd, int64_t rows, int64_t dim, T eps) {
  rmsnorm_forward(x, dim, weight, y, dim, rstd, rows, dim, eps);
}
template <typename T>
void rmsnorm_backward(const T* x, const T* weight, const T* rstd, const T* dy, T* dx, T* dweight, int64_t rows,
                      int64_t dim) {
  rmsnorm_backward(x, dim, weight, rstd, dy, dim, dx, dim, true, dweight, rows, dim);
}

}  // namespace ssmtune::cpu
