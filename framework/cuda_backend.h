// The CUDA backend: bf16 activations and frozen 16-bit weights, fp32 residual stream, adapters,
// gradients and optimizer state; every op a kernel of kernels/cuda/ on one stream. Nothing allocates
// after the memory plans are built (framework/arena.h); allocation failures name the bytes asked for
// and the bytes the device had free.
#pragma once
#include <memory>

#include "framework/backend.h"

namespace ssmtune {

// Number of CUDA devices visible; 0 when there is no driver or no device.
int cuda_device_count();

// A backend on CUDA device `device`.
std::unique_ptr<Backend> make_cuda_backend(int device = 0);

// The CUDA backend's element and scratch sizes, for sizing its memory plans without a device.
std::unique_ptr<BackendSizes> cuda_backend_sizes();

}  // namespace ssmtune
