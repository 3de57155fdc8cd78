#include "kernels/cpu/adamw.h"

#include <cmath>

namespace ssmtune::cpu {

template <typename T>
void adamw_update(T* params, const T* grads, T* m, T* v, int64_t n, double lr, double beta1, double beta2,
                  double eps, double weight_decay, double bias_correction1, double bias_correction2) {
  const T decay = static_cast<T>(1.0 - lr * weight_decay);
  const T step_size = static_cast<T>(lr / bias_correction1);
  const T bc2_sqrt = static_cast<T>(std::sqrt(bias_correction2));
  const T b1 = static_cast<T>(beta1), b2 = static_cast<T>(beta2), e = static_cast<T>(eps);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const T g = grads[i];
    params[i] *= decay;
    m[i] = b1 * m[i] + (T(1) - b1) * g;
    v[i] = b2 * v[i] + (T(1) - b2) * g * g;
    params[i] -= step_size * m[i] / (std::sqrt(v[i]) / bc2_sqrt + e);
  }
}

template <typename T>
double sum_of_squares(const T* x, int64_t n) {
  double total = 0;
  for (int64_t i = 0; i < n; ++i) total += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  return total;
}

template <typename T>
void scale(T* x, int64_t n, double factor) {
  const T f = static_cast<T>(factor);
  for (int64_t i = 0; i < n; ++i) x[i] *= f;
}

#define SSMTUNE_INSTANTIATE_ADAMW(T)                                                                  \
  template void adamw_update<T>(T*, const T*, T*, T*, int64_t, double, double, double, double, double, \
                                double, double);                                                      \
  template double sum_of_squares<T>(const T*, int64_t);                                               \
  template void scale<T>(T*, int64_t, double);
SSMTUNE_INSTANTIATE_ADAMW(float)
SSMTUNE_INSTANTIATE_ADAMW(double)

}  // namespace ssmtune::cpu
