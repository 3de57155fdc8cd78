// AdamW (Loshchilov & Hutter) over one contiguous buffer, as torch.optim.AdamW computes it:
//   p -= lr * weight_decay * p
//   m = beta1*m + (1-beta1)*g;  v = beta2*v + (1-beta2)*g^2
//   p -= lr * (m / bc1) / (sqrt(v / bc2) + eps)          bc_k = 1 - beta_k^step
// plus the two reductions that global-norm clipping needs.
#pragma once
#include <cstdint>

namespace ssmtune::cpu {

template <typename T>
void adamw_update(T* params, const T* grads, T* m, T* v, int64_t n, double lr, double beta1, double beta2,
                  double eps, double weight_decay, double bias_correction1, double bias_correction2);

// Summed in double in a fixed order, so the result does not depend on threads.
template <typename T>
double sum_of_squares(const T* x, int64_t n);

template <typename T>
void scale(T* x, int64_t n, double factor);

}  // namespace ssmtune::cpu
