#include "kernels/cpu/cross_entropy.h"

#include <algorithm>
#include <cmath>

#include "kernels/cpu/gemm.h"

namespace ssmtune::cpu {

template <typename T>
double cross_entropy_forward_backward(const T* h, const T* W, int64_t rows, int64_t dim, int64_t vocab,
                                      const int32_t* targets, const T* weights, T grad_scale, T* dh,
                                      T* logits_workspace, int64_t slice_rows) {
  double total = 0.0;
  for (int64_t first = 0; first < rows; first += slice_rows) {
    const int64_t count = std::min(slice_rows, rows - first);
    gemm<T>(false, true, count, vocab, dim, T(1), h + first * dim, dim, W, dim, T(0), logits_workspace, vocab);
    // `ordered` adds the row losses in row order whatever the thread count; the exps run in parallel.
#pragma omp parallel for ordered schedule(static, 1) if (count * vocab > (1 << 14))
    for (int64_t i = 0; i < count; ++i) {
      const int64_t t = first + i;
      T* logits = logits_workspace + i * vocab;
      const T weight = weights[t];
      double weighted_loss = 0.0;
      if (weight == T(0)) {
        // Zero gradient row, so the second product writes dh[t] = 0.
        if (dh) std::fill(logits, logits + vocab, T(0));
      } else {
        const T max_logit = *std::max_element(logits, logits + vocab);
        T sum_exp = T(0);
        for (int64_t v = 0; v < vocab; ++v) sum_exp += std::exp(logits[v] - max_logit);
        const T logsumexp = max_logit + std::log(sum_exp);
        weighted_loss = double(weight) * double(logsumexp - logits[targets[t]]);
        if (dh) {
          const T scale = grad_scale * weight;
          for (int64_t v = 0; v < vocab; ++v) logits[v] = scale * std::exp(logits[v] - logsumexp);
          logits[targets[t]] -= scale;
        }
      }
#pragma omp ordered
      total += weighted_loss;
    }
    if (dh) {
      gemm<T>(false, false, count, dim, vocab, T(1), logits_workspace, vocab, W, dim, T(0), dh + first * dim, dim);
    }
  }
  return total;
}

template double cross_entropy_forward_backward<float>(const float*, const float*, int64_t, int64_t, int64_t,
                                                      const int32_t*, const float*, float, float*, float*,
                                                      int64_t);
template double cross_entropy_forward_backward<double>(const double*, const double*, int64_t, int64_t, int64_t,
                                                       const int32_t*, const double*, double, double*, double*,
                                                       int64_t);

}  // namespace ssmtune::cpu
