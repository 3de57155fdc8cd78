#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/cuda/check.h"
#include "kernels/cuda/embedding.h"
#include "kernels/cuda/vector_access.cuh"

namespace ssmtune::cuda {
namespace {

constexpr int kMaxThreads = 256;

// V = 8: one 16-byte load of bf16 and two 16-byte stores of fp32 per thread and step.

// One block per row; the token ids were validated against the vocabulary by the caller.
template <int V>
__global__ void __launch_bounds__(kMaxThreads)
    embedding_forward_kernel(const int32_t* __restrict__ tokens, const __nv_bfloat16* __restrict__ table, int64_t dim,
                             float* __restrict__ out) {
  const int64_t row = blockIdx.x;
  const __nv_bfloat16* src = table + static_cast<int64_t>(tokens[row]) * dim;
  float* dst = out + row * dim;
  for (int64_t j = threadIdx.x; j < dim / V; j += blockDim.x) {
    float values[V];
    load<V>(src + j * V, values);
    store<V>(dst + j * V, values);
  }
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

int threads_for(int64_t vectors) { return static_cast<int>(std::min<int64_t>(kMaxThreads, (vectors + 31) / 32 * 32)); }

}  // namespace

void embedding_forward(const int32_t* tokens, int64_t rows, const uint16_t* table, int64_t dim, float* out,
                       void* stream) {
  if (rows < 0 || rows > INT32_MAX || dim < 1)
    throw std::invalid_argument("embedding_forward: needs 0 <= rows < 2^31 and dim >= 1, got rows " +
                                std::to_string(rows) + ", dim " + std::to_string(dim));
  if (rows == 0) return;
  const auto* table_bf16 = reinterpret_cast<const __nv_bfloat16*>(table);
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  if (dim % 8 == 0 && aligned(table, 16) && aligned(out, 16)) {
    embedding_forward_kernel<8>
        <<<static_cast<unsigned>(rows), threads_for(dim / 8), 0, cuda_stream>>>(tokens, table_bf16, dim, out);
  } else {
    embedding_forward_kernel<1>
        <<<static_cast<unsigned>(rows), threads_for(dim), 0, cuda_stream>>>(tokens, table_bf16, dim, out);
  }
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "embedding_forward launch");
}

}  // namespace ssmtune::cuda
