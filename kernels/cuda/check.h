// Every CUDA call and launch is checked; a failure names the op and CUDA's message.
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace ssmtune::cuda {

inline void check(cudaError_t status, const char* op, const char* call) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string(op) + ": " + call + " failed: " + cudaGetErrorString(status));
}

}  // namespace ssmtune::cuda

#define SSMTUNE_CUDA_CHECK(call, op) ::ssmtune::cuda::check((call), (op), #call)
