// One token of recurrent decoding on the GPU: the CUDA counterpart of kernels/cpu/recurrent_step.h,
// whose header has the math and the layouts. x, u, delta, B, C, z and out are bf16 (raw uint16 bits);
// weight, bias, delta_bias, A, Dskip, the conv window and the scan state are fp32, and so is all
// arithmetic: the carried state is never rounded to bf16, as in the full-sequence kernels.
//
// One thread per (row, channel) walks the K-1 window taps or the N states of its channel: a decoding
// step touches each state element once, so these are memory-bound and tiny next to the layer's GEMVs.
#pragma once
#include <cstdint>

namespace ssmtune::cuda {

// window [rows, dim, kernel-1] fp32, updated in place; u [rows, dim] written. kernel >= 1.
void causal_conv1d_silu_step(const uint16_t* x, int64_t x_row_stride, const float* weight, const float* bias,
                             float* window, uint16_t* u, int64_t rows, int64_t dim, int64_t kernel, void* stream);

// h [rows, dim, state] fp32, updated in place; out [rows, dim] written.
void selective_scan_step(const uint16_t* u, const uint16_t* delta, const float* delta_bias, const float* A,
                         const uint16_t* B, const uint16_t* C, int64_t bc_row_stride, const float* Dskip,
                         const uint16_t* z, int64_t z_row_stride, float* h, uint16_t* out, int64_t rows, int64_t dim,
                         int64_t state, void* stream);

}  // namespace ssmtune::cuda
