#include "kernels/cpu/rmsnorm.h"

#include <algorithm>
#include <cmath>

namespace ssmtune::cpu {

namespace {
// Channels per task of the dweight reduction: a thread walks all rows for its block of channels, so each
// dweight element is summed by one thread in row order, while the inner loop still reads contiguous memory.
constexpr int64_t kChannelBlock = 64;
}  // namespace

template <typename T>
void rmsnorm_forward(const T* x, int64_t ldx, const T* weight, T* y, int64_t ldy, T* rstd, int64_t rows, int64_t dim,
                     T eps) {
#pragma omp parallel for schedule(static) if (rows * dim > (1 << 14))
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * ldx;
    T* yr = y + r * ldy;
    T sum_sq = T(0);
    for (int64_t i = 0; i < dim; ++i) sum_sq += xr[i] * xr[i];
    const T row_rstd = T(1) / std::sqrt(sum_sq / T(dim) + eps);
    rstd[r] = row_rstd;
    for (int64_t i = 0; i < dim; ++i) yr[i] = xr[i] * row_rstd * (weight ? weight[i] : T(1));
  }
}

template <typename T>
void rmsnorm_backward(const T* x, int64_t ldx, const T* weight, const T* rstd, const T* dy, int64_t lddy, T* dx,
                      int64_t lddx, bool accumulate, T* dweight, int64_t rows, int64_t dim) {
#pragma omp parallel for schedule(static) if (rows * dim > (1 << 14))
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * ldx;
    const T* dyr = dy + r * lddy;
    T* dxr = dx + r * lddx;
    const T row_rstd = rstd[r];
    T dot = T(0);  // sum_i dy_i * w_i * x_i
    for (int64_t i = 0; i < dim; ++i) dot += dyr[i] * (weight ? weight[i] : T(1)) * xr[i];
    const T x_coeff = row_rstd * row_rstd * row_rstd * dot / T(dim);
    for (int64_t i = 0; i < dim; ++i) {
      const T d = row_rstd * (weight ? weight[i] : T(1)) * dyr[i] - xr[i] * x_coeff;
      dxr[i] = accumulate ? dxr[i] + d : d;
    }
  }
  if (!dweight) return;
  const int64_t blocks = (dim + kChannelBlock - 1) / kChannelBlock;
#pragma omp parallel for schedule(static) if (rows * dim > (1 << 14))
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t begin = block * kChannelBlock;
    const int64_t end = std::min(dim, begin + kChannelBlock);
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x + r * ldx;
      const T* dyr = dy + r * lddy;
      for (int64_t i = begin; i < end; ++i) dweight[i] += dyr[i] * xr[i] * rstd[r];
    }
  }
}

template void rmsnorm_forward<float>(const float*, int64_t, const float*, float*, int64_t, float*, int64_t, int64_t,
                                     float);
template void rmsnorm_forward<double>(const double*, int64_t, const double*, double*, int64_t, double*, int64_t,
                                      int64_t, double);
template void rmsnorm_backward<float>(const float*, int64_t, const float*, const float*, const float*, int64_t, float*,
                                      int64_t, bool, float*, int64_t, int64_t);
template void rmsnorm_backward<double>(const double*, int64_t, const double*, const double*, const double*, int64_t,
                                       double*, int64_t, bool, double*, int64_t, int64_t);

}  // namespace ssmtune::cpu
