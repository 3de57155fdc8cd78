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
void rmsnorm_forward(const T* x, const T* weight, T* y, T* rstd, int64_t rows, int64_t dim, T eps) {
#pragma omp parallel for schedule(static) if (rows * dim > (1 << 14))
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    T* yr = y + r * dim;
    T sum_sq = T(0);
    for (int64_t i = 0; i < dim; ++i) sum_sq += xr[i] * xr[i];
    const T row_rstd = T(1) / std::sqrt(sum_sq / T(dim) + eps);
    rstd[r] = row_rstd;
    for (int64_t i = 0; i < dim; ++i) yr[i] = xr[i] * row_rstd * (weight ? weight[i] : T(1));
  }
}

template <typename T>
void rmsnorm_backward(const T* x, const T* weight, const T* rstd, const T* dy, T* dx, T* dweight, int64_t rows,
                      int64_t dim) {
#pragma omp parallel for schedule(static) if (rows * dim > (1 << 14))
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * dim;
    const T* dyr = dy + r * dim;
    T* dxr = dx + r * dim;
    const T row_rstd = rstd[r];
    T dot = T(0);  // sum_i dy_i * w_i * x_i
    for (int64_t i = 0; i < dim; ++i) dot += dyr[i] * (weight ? weight[i] : T(1)) * xr[i];
    const T x_coeff = row_rstd * row_rstd * row_rstd * dot / T(dim);
    for (int64_t i = 0; i < dim; ++i) dxr[i] += row_rstd * (weight ? weight[i] : T(1)) * dyr[i] - xr[i] * x_coeff;
  }
  if (!dweight) return;
  const int64_t blocks = (dim + kChannelBlock - 1) / kChannelBlock;
#pragma omp parallel for schedule(static) if (rows * dim > (1 << 14))
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t begin = block * kChannelBlock;
    const int64_t end = std::min(dim, begin + kChannelBlock);
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x + r * dim;
      const T* dyr = dy + r * dim;
      for (int64_t i = begin; i < end; ++i) dweight[i] += dyr[i] * xr[i] * rstd[r];
    }
  }
}

template void rmsnorm_forward<float>(const float*, const float*, float*, float*, int64_t, int64_t, float);
template void rmsnorm_forward<double>(const double*, const double*, double*, double*, int64_t, int64_t, double);
template void rmsnorm_backward<float>(const float*, const float*, const float*, const float*, float*, float*,
                                      int64_t, int64_t);
template void rmsnorm_backward<double>(const double*, const double*, const double*, const double*, double*,
                                       double*, int64_t, int64_t);

}  // namespace ssmtune::cpu
