// Row-major GEMM on the CPU: C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C, where op(X) is X or
// its transpose (then X is stored [K,M] or [N,K]). The CPU backend's matrix product; cuBLASLt's
// counterpart is kernels/cuda. Instantiated for float (training) and double (gradient checks).
#pragma once
#include <cstdint>

namespace ssmtune::cpu {

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc);

}  // namespace ssmtune::cpu
