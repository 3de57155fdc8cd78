#include "kernels/cpu/lora.h"

#include "kernels/common/counter_rng.h"
#include "kernels/cpu/gemm.h"

namespace ssmtune::cpu {
namespace {

// x[t,i] after dropout: zero with probability p, else scaled by 1/(1-p).
template <typename T>
struct DroppedInput {
  const T* x;
  int64_t ldx, in;
  LoraDropout dropout;
  T keep_scale;

  T factor(int64_t t, int64_t i) const {
    if (dropout.p <= 0) return T(1);
    const float r = counter_random_uniform(dropout.seed, dropout.stream, static_cast<uint64_t>(t * in + i));
    return r < dropout.p ? T(0) : keep_scale;
  }
  T operator()(int64_t t, int64_t i) const { return x[t * ldx + i] * factor(t, i); }
};

template <typename T>
DroppedInput<T> dropped(const T* x, int64_t ldx, int64_t in, const LoraDropout& dropout) {
  return {x, ldx, in, dropout, dropout.p > 0 ? T(1) / T(1 - dropout.p) : T(1)};
}

}  // namespace

template <typename T>
void lora_down_projection(const LoraDims& d, const T* x, int64_t ldx, const T* A, const LoraDropout& dropout, T* h,
                          int64_t ldh) {
  const DroppedInput<T> xd = dropped(x, ldx, d.in, dropout);
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < d.rows; ++t)
    for (int64_t j = 0; j < d.rank; ++j) {
      T acc = T(0);
      for (int64_t i = 0; i < d.in; ++i) acc += A[j * d.in + i] * xd(t, i);
      h[t * ldh + j] = acc;
    }
}

template <typename T>
void lora_forward(const LoraDims& d, const T* x, int64_t ldx, const T* A, const T* B, T scale,
                  const LoraDropout& dropout, T* h, int64_t ldh, T* y, int64_t ldy) {
  lora_down_projection(d, x, ldx, A, dropout, h, ldh);
  gemm<T>(false, true, d.rows, d.out, d.rank, scale, h, ldh, B, d.rank, T(1), y, ldy);
}

template <typename T>
void lora_backward(const LoraDims& d, const T* x, int64_t ldx, const T* A, const T* B, T scale,
                   const LoraDropout& dropout, const T* h, int64_t ldh, const T* dy, int64_t ldy, T* dA, T* dB, T* dx,
                   int64_t lddx, T* dh) {
  const DroppedInput<T> xd = dropped(x, ldx, d.in, dropout);
  gemm<T>(true, false, d.out, d.rank, d.rows, scale, dy, ldy, h, ldh, T(1), dB, d.rank);
  gemm<T>(false, false, d.rows, d.rank, d.out, scale, dy, ldy, B, d.rank, T(0), dh, d.rank);
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < d.rank; ++j)
    for (int64_t t = 0; t < d.rows; ++t) {
      const T g = dh[t * d.rank + j];
      T* dA_row = dA + j * d.in;
      for (int64_t i = 0; i < d.in; ++i) dA_row[i] += g * xd(t, i);
    }
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < d.rows; ++t)
    for (int64_t i = 0; i < d.in; ++i) {
      T acc = T(0);
      for (int64_t j = 0; j < d.rank; ++j) acc += dh[t * d.rank + j] * A[j * d.in + i];
      dx[t * lddx + i] += acc * xd.factor(t, i);
    }
}

#define SSMTUNE_INSTANTIATE_LORA(T)                                                                      \
  template void lora_down_projection<T>(const LoraDims&, const T*, int64_t, const T*, const LoraDropout&, T*,    \
                                        int64_t);                                                        \
  template void lora_forward<T>(const LoraDims&, const T*, int64_t, const T*, const T*, T, const LoraDropout&, \
                                T*, int64_t, T*, int64_t);                                               \
  template void lora_backward<T>(const LoraDims&, const T*, int64_t, const T*, const T*, T,              \
                                 const LoraDropout&, const T*, int64_t, const T*, int64_t, T*, T*, T*, int64_t, T*);
SSMTUNE_INSTANTIATE_LORA(float)
SSMTUNE_INSTANTIATE_LORA(double)

}  // namespace ssmtune::cpu
