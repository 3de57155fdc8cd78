// Causal depthwise conv1d with bias and SiLU on the GPU: the CUDA counterpart of
// kernels/cpu/causal_conv1d.h, whose header has the math and the strided layout. x, u, du, dx are bf16
// (raw uint16 bits); weight [dim, kernel] and bias [dim] fp32; arithmetic fp32. The conv weights are
// frozen, so the backward computes dx only, recomputing the pre-activation from x.
#pragma once
#include <cstdint>

namespace ssmtune::cuda {

void causal_conv1d_silu_forward(const uint16_t* x, int64_t x_row_stride, const float* weight, const float* bias,
                                uint16_t* u, int64_t batch, int64_t len, int64_t dim, int64_t kernel, void* stream);

void causal_conv1d_silu_backward(const uint16_t* x, int64_t x_row_stride, const float* weight, const float* bias,
                                 const uint16_t* du, uint16_t* dx, int64_t dx_row_stride, int64_t batch, int64_t len,
                                 int64_t dim, int64_t kernel, void* stream);

}  // namespace ssmtune::cuda
