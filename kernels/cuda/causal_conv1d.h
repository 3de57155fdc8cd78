// Causal depthwise conv1d with bias and SiLU on the GPU: the CUDA counterpart of
// kernels/cpu/causal_conv1d.h, whose header has the math, the strided layout and the document/slice
// boundaries (doc_start, history, d_tail, d_history). x, u, du, dx, history, d_tail, d_history are bf16
// (raw uint16 bits); weight [dim, kernel] and bias [dim] fp32; doc_start int32 [batch*len]; arithmetic
// fp32. The conv weights are frozen, so the backward computes dx only, recomputing the pre-activation
// from x. doc_start, history and d_tail may be null.
#pragma once
#include <cstdint>

namespace ssmtune::cuda {

void causal_conv1d_silu_forward(const uint16_t* x, int64_t x_row_stride, const float* weight, const float* bias,
                                uint16_t* u, int64_t batch, int64_t len, int64_t dim, int64_t kernel,
                                const int32_t* doc_start, const uint16_t* history, void* stream);

// d_tail needs len >= kernel-1.
void causal_conv1d_silu_backward(const uint16_t* x, int64_t x_row_stride, const float* weight, const float* bias,
                                 const uint16_t* du, uint16_t* dx, int64_t dx_row_stride, int64_t batch, int64_t len,
                                 int64_t dim, int64_t kernel, const int32_t* doc_start, const uint16_t* history,
                                 const uint16_t* d_tail, void* stream);

// d_history [batch, kernel-1, dim], written.
void causal_conv1d_silu_history_grad(const uint16_t* x, int64_t x_row_stride, const float* weight, const float* bias,
                                     const uint16_t* du, int64_t batch, int64_t len, int64_t dim, int64_t kernel,
                                     const int32_t* doc_start, const uint16_t* history, uint16_t* d_history,
                                     void* stream);

}  // namespace ssmtune::cuda
