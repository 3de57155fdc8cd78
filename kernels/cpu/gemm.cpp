#include "kernels/cpu/gemm.h"

namespace ssmtune::cpu {

// One thread owns a row of C and always sums it in the same order, so results do not depend on the
// thread count. With B not transposed the inner loop streams rows of B; with B transposed each
// element of C is a dot product of two rows. No scratch memory: the CPU backend allocates nothing
// inside a training step.
template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  const int64_t a_row_stride = trans_a ? 1 : lda;
  const int64_t a_k_stride = trans_a ? lda : 1;
#pragma omp parallel for schedule(static) if (M * N * K > (1 << 16))
  for (int64_t m = 0; m < M; ++m) {
    const T* arow = A + m * a_row_stride;
    T* crow = C + m * ldc;
    if (trans_b) {
      for (int64_t n = 0; n < N; ++n) {
        const T* brow = B + n * ldb;
        T acc = T(0);
        for (int64_t k = 0; k < K; ++k) acc += arow[k * a_k_stride] * brow[k];
        crow[n] = beta == T(0) ? alpha * acc : alpha * acc + beta * crow[n];
      }
    } else {
      for (int64_t n = 0; n < N; ++n) crow[n] = beta == T(0) ? T(0) : beta * crow[n];
      for (int64_t k = 0; k < K; ++k) {
        const T a = alpha * arow[k * a_k_stride];
        const T* brow = B + k * ldb;
        for (int64_t n = 0; n < N; ++n) crow[n] += a * brow[n];
      }
    }
  }
}

template void gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                          int64_t, float, float*, int64_t);
template void gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t,
                           const double*, int64_t, double, double*, int64_t);

}  // namespace ssmtune::cpu
