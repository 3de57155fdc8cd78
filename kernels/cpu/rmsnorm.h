// RMSNorm as Hugging Face MambaRMSNorm computes it, per row of `dim` values:
//   rstd = 1 / sqrt(mean_i(x_i^2) + eps),   y_i = x_i * rstd * w_i
// with w = 1 when weight is nullptr (falcon-mamba's weightless norm on B, C and dt_r).
// Backward, with s = sum_i dy_i * w_i * x_i:
//   dx_j = rstd * w_j * dy_j - x_j * rstd^3 * s / dim
//   dw_i = sum over rows of dy_i * x_i * rstd
// rstd is saved by the forward (one value per row) so the backward needs only x, not y.
// Instantiated for float (training) and double (gradient checks).
#pragma once
#include <cstdint>

namespace ssmtune::cpu {

// x, y: [rows, dim]; weight: [dim] or nullptr; rstd: [rows], written.
template <typename T>
void rmsnorm_forward(const T* x, const T* weight, T* y, T* rstd, int64_t rows, int64_t dim, T eps);

// dx (+=): the norm sits on the residual stream, whose gradient already holds the skip path's share.
// dweight (+=, nullable): summed over rows in a fixed order, so it does not depend on the thread count.
template <typename T>
void rmsnorm_backward(const T* x, const T* weight, const T* rstd, const T* dy, T* dx, T* dweight, int64_t rows,
                      int64_t dim);

}  // namespace ssmtune::cpu
