// Dense matrix products on the tensor cores through cuBLASLt: bf16 operands, fp32 accumulation, bf16 or
// fp32 results. Every GEMM of the step (NF4 base weights after dequantization, the LoRA paths, the LM
// head) goes through here. A plain header: no CUDA or cuBLAS types.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>

namespace ssmtune::cuda {

enum class GemmOut { bf16, f32 };

// One per stream. Owns the cuBLASLt handle, its workspace (allocated once, in the constructor) and the
// plans chosen per shape, so that repeated shapes skip the heuristic query.
class Gemm {
 public:
  explicit Gemm(void* stream);  // a cudaStream_t
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  // Row-major: C[m,n] (row stride ldc) = alpha * op(A) · op(B) + beta * C, accumulated in fp32.
  //   op(A) = A, stored [m,k] with row stride lda, or (trans_a) Aᵀ with A stored [k,m];
  //   op(B) = B, stored [k,n] with row stride ldb, or (trans_b) Bᵀ with B stored [n,k].
  // A and B are bf16 (raw uint16 bits); C is bf16 or fp32 per c_type. With beta == 0, C is not read.
  void run(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* A, int64_t lda,
           const uint16_t* B, int64_t ldb, float beta, void* C, GemmOut c_type, int64_t ldc);

  void* stream() const;
  size_t workspace_bytes() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ssmtune::cuda
