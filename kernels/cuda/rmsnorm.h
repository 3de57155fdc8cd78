// RMSNorm on the GPU fused with the residual add: the CUDA counterpart of kernels/cpu/rmsnorm.h, whose
// header has the math. The residual stream is fp32; the normed output and the incoming gradient bf16.
#pragma once
#include <cstdint>

namespace ssmtune::cuda {

// With add == nullptr: y = rmsnorm(x) * weight. With add: x_out = x + add (written, may alias x), then
// y = rmsnorm(x_out) * weight, in one pass. x, x_out, weight (nullable: w = 1), rstd [rows]: fp32;
// add, y: bf16 [rows, dim].
void rmsnorm_forward(const float* x, const uint16_t* add, float* x_out, const float* weight, uint16_t* y, float* rstd,
                     int64_t rows, int64_t dim, float eps, void* stream);

// dx (fp32) += d rmsnorm/dx · dy; then, when dx_act is given, dx_act (bf16) = the updated dx, which is
// the gradient of the previous layer's mixer output. dx_act may alias dy (the step reuses one buffer):
// every element of a row of dy is read before any element of that row of dx_act is written.
void rmsnorm_backward(const float* x, const float* weight, const float* rstd, const uint16_t* dy, float* dx,
                      uint16_t* dx_act, int64_t rows, int64_t dim, void* stream);

}  // namespace ssmtune::cuda
