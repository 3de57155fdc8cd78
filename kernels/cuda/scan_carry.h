// The fold that joins context-parallel slices of a selective scan (framework/context_parallel.h; the
// linearity it rests on is in kernels/cpu/selective_scan.h): state = first + second * state, elementwise
// over n fp32 values. The CPU backend's counterpart is the same loop in framework/cpu_backend.cpp.
#pragma once
#include <cstdint>

namespace ssmtune::cuda {

// All pointers device fp32 [n]; runs on `stream` (a cudaStream_t).
void scan_state_carry(float* state, const float* first, const float* second, int64_t n, void* stream);

}  // namespace ssmtune::cuda
