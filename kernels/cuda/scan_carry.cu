#include <cuda_runtime.h>

#include <algorithm>

#include "kernels/cuda/check.h"
#include "kernels/cuda/scan_carry.h"

namespace ssmtune::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void scan_state_carry_kernel(float* __restrict__ state, const float* __restrict__ first,
                                        const float* __restrict__ second, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    state[i] = __fmaf_rn(second[i], state[i], first[i]);
}

}  // namespace

void scan_state_carry(float* state, const float* first, const float* second, int64_t n, void* stream) {
  if (n <= 0) return;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096));
  scan_state_carry_kernel<<<blocks, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(state, first, second, n);
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "scan_state_carry launch");
}

}  // namespace ssmtune::cuda
