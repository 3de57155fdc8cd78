#include "kernels/cuda/gemm.h"

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>

#include "kernels/cuda/check.h"

namespace ssmtune::cuda {
namespace {

// 32 MiB: what cuBLAS recommends on Hopper for its split-K and stream-K kernels.
constexpr size_t kWorkspaceBytes = size_t{32} << 20;

// cuBLASLt's kernels assume operands aligned to 256 bytes unless told otherwise; pointers into strided
// views (a column slice of x_proj's output, the h rows of one LM-head slice) are often aligned less, so the
// actual alignment is part of the plan.
uint32_t alignment_of(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  uint32_t alignment = 256;
  while (alignment > 1 && address % alignment != 0) alignment /= 2;
  return alignment;
}

// Everything the heuristic's choice depends on.
struct PlanKey {
  bool trans_a, trans_b, accumulate;
  GemmOut c_type;
  int64_t m, n, k, lda, ldb, ldc;
  uint32_t align_a, align_b, align_c;
  bool operator==(const PlanKey&) const = default;
};

struct PlanKeyHash {
  size_t operator()(const PlanKey& key) const {
    size_t h = 0;
    const auto mix = [&h](uint64_t v) { h = (h ^ std::hash<uint64_t>{}(v)) * 0x100000001b3ULL; };
    mix(uint64_t{key.trans_a} | uint64_t{key.trans_b} << 1 | uint64_t{key.accumulate} << 2 |
        uint64_t(key.c_type == GemmOut::f32) << 3);
    for (const int64_t v : {key.m, key.n, key.k, key.lda, key.ldb, key.ldc}) mix(static_cast<uint64_t>(v));
    mix(uint64_t{key.align_a} | uint64_t{key.align_b} << 16 | uint64_t{key.align_c} << 32);
    return h;
  }
};

std::string describe(const PlanKey& key) {
  return "m=" + std::to_string(key.m) + " n=" + std::to_string(key.n) + " k=" + std::to_string(key.k) +
         " trans_a=" + std::to_string(key.trans_a) + " trans_b=" + std::to_string(key.trans_b) +
         " lda=" + std::to_string(key.lda) + " ldb=" + std::to_string(key.ldb) + " ldc=" + std::to_string(key.ldc) +
         " C=" + (key.c_type == GemmOut::bf16 ? "bf16" : "f32") + " beta" + (key.accumulate ? "!=0" : "=0");
}

void check_cublas(cublasStatus_t status, const char* call, const PlanKey& key) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(std::string("Gemm: ") + call + " failed (" + cublasLtGetStatusString(status) +
                             ") for " + describe(key));
}

// Descriptors and algorithm of one GEMM shape. cuBLASLt is column-major, so the row-major product
// C = op(A)·op(B) runs as Cᵀ = op(B)ᵀ·op(A)ᵀ: a row-major [r, c] matrix with row stride ld is the
// column-major [c, r] matrix with the same ld, i.e. its transpose, for free. cuBLASLt's first operand is
// our B and its second our A; D is C (in place, same layout).
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t first = nullptr, second = nullptr, out = nullptr;
  cublasLtMatmulAlgo_t algo{};

  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    if (out) cublasLtMatrixLayoutDestroy(out);
    if (second) cublasLtMatrixLayoutDestroy(second);
    if (first) cublasLtMatrixLayoutDestroy(first);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

struct PreferenceGuard {
  cublasLtMatmulPreference_t pref = nullptr;
  ~PreferenceGuard() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
  }
};

std::unique_ptr<Plan> make_plan(cublasLtHandle_t handle, const PlanKey& key) {
  auto plan = std::make_unique<Plan>();
  check_cublas(cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate", key);
  // op(B)ᵀ [n, k]: B stored [k, n] is already that (N); B stored [n, k] (trans_b) is its transpose (T).
  const cublasOperation_t op_first = key.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  // op(A)ᵀ [k, m]: likewise from A stored [m, k] (N) or [k, m] (trans_a, T).
  const cublasOperation_t op_second = key.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  check_cublas(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof(op_first)),
               "cublasLtMatmulDescSetAttribute(TRANSA)", key);
  check_cublas(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_second, sizeof(op_second)),
               "cublasLtMatmulDescSetAttribute(TRANSB)", key);
  // Column-major (rows, cols) of each stored matrix as cuBLASLt sees it.
  const uint64_t first_rows = key.trans_b ? key.k : key.n, first_cols = key.trans_b ? key.n : key.k;
  const uint64_t second_rows = key.trans_a ? key.m : key.k, second_cols = key.trans_a ? key.k : key.m;
  check_cublas(cublasLtMatrixLayoutCreate(&plan->first, CUDA_R_16BF, first_rows, first_cols, key.ldb),
               "cublasLtMatrixLayoutCreate(B)", key);
  check_cublas(cublasLtMatrixLayoutCreate(&plan->second, CUDA_R_16BF, second_rows, second_cols, key.lda),
               "cublasLtMatrixLayoutCreate(A)", key);
  const cudaDataType out_type = key.c_type == GemmOut::bf16 ? CUDA_R_16BF : CUDA_R_32F;
  check_cublas(cublasLtMatrixLayoutCreate(&plan->out, out_type, key.n, key.m, key.ldc), "cublasLtMatrixLayoutCreate(C)",
               key);

  PreferenceGuard preference;
  check_cublas(cublasLtMatmulPreferenceCreate(&preference.pref), "cublasLtMatmulPreferenceCreate", key);
  const uint64_t workspace = kWorkspaceBytes;
  check_cublas(cublasLtMatmulPreferenceSetAttribute(preference.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                    &workspace, sizeof(workspace)),
               "cublasLtMatmulPreferenceSetAttribute(MAX_WORKSPACE_BYTES)", key);
  // Split-K partial sums stay fp32 and are reduced by a separate fixed-order pass; the other two schemes add
  // them in the output type, which for a bf16 C rounds every partial sum (the LM head's dh = dlogits·W,
  // with k = vocab and few rows, is the kind of product that gets split).
  const uint32_t reduction = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  check_cublas(cublasLtMatmulPreferenceSetAttribute(preference.pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                                    &reduction, sizeof(reduction)),
               "cublasLtMatmulPreferenceSetAttribute(REDUCTION_SCHEME_MASK)", key);
  const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> alignments[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align_b},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align_a},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align_c},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align_c}};
  for (const auto& [attribute, alignment] : alignments)
    check_cublas(cublasLtMatmulPreferenceSetAttribute(preference.pref, attribute, &alignment, sizeof(alignment)),
                 "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT)", key);

  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  check_cublas(cublasLtMatmulAlgoGetHeuristic(handle, plan->desc, plan->first, plan->second, plan->out, plan->out,
                                              preference.pref, 1, &result, &found),
               "cublasLtMatmulAlgoGetHeuristic", key);
  if (found == 0) throw std::runtime_error("Gemm: cuBLASLt has no algorithm for " + describe(key));
  plan->algo = result.algo;
  return plan;
}

}  // namespace

struct Gemm::Impl {
  cudaStream_t stream = nullptr;
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  std::unordered_map<PlanKey, std::unique_ptr<Plan>, PlanKeyHash> plans;

  ~Impl() {
    plans.clear();
    if (workspace) cudaFree(workspace);
    if (handle) cublasLtDestroy(handle);
  }
};

Gemm::Gemm(void* stream) : impl_(std::make_unique<Impl>()) {
  impl_->stream = static_cast<cudaStream_t>(stream);
  const cublasStatus_t status = cublasLtCreate(&impl_->handle);
  if (status != CUBLAS_STATUS_SUCCESS)
    throw std::runtime_error(std::string("Gemm: cublasLtCreate failed (") + cublasLtGetStatusString(status) + ")");
  SSMTUNE_CUDA_CHECK(cudaMalloc(&impl_->workspace, kWorkspaceBytes), "Gemm workspace");
}

Gemm::~Gemm() = default;

void* Gemm::stream() const { return impl_->stream; }

size_t Gemm::workspace_bytes() const { return kWorkspaceBytes; }

void Gemm::run(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* A,
               int64_t lda, const uint16_t* B, int64_t ldb, float beta, void* C, GemmOut c_type, int64_t ldc) {
  const PlanKey key{trans_a,  trans_b, beta != 0.0f, c_type, m, n, k, lda, ldb, ldc, alignment_of(A), alignment_of(B),
                    alignment_of(C)};
  if (m < 0 || n < 0 || k < 1)
    throw std::invalid_argument("Gemm: needs m, n >= 0 and k >= 1, got " + describe(key));
  if (lda < (trans_a ? m : k) || ldb < (trans_b ? k : n) || ldc < n)
    throw std::invalid_argument("Gemm: a leading dimension is smaller than its row, for " + describe(key));
  if (m == 0 || n == 0) return;

  auto found = impl_->plans.find(key);
  if (found == impl_->plans.end()) found = impl_->plans.emplace(key, make_plan(impl_->handle, key)).first;
  const Plan& plan = *found->second;
  check_cublas(cublasLtMatmul(impl_->handle, plan.desc, &alpha, B, plan.first, A, plan.second, &beta, C, plan.out, C,
                              plan.out, &plan.algo, impl_->workspace, kWorkspaceBytes, impl_->stream),
               "cublasLtMatmul", key);
}

}  // namespace ssmtune::cuda
