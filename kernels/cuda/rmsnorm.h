// RMSNorm on the GPU: the CUDA counterpart of kernels/cpu/rmsnorm.h, whose header has the math. Two
// kinds: the residual stream's norms, fused with the residual add (the stream fp32; the normed output and
// the incoming gradient bf16), and falcon-mamba's weightless norm of narrow strided bf16 rows (dt_r, B
// and C inside the x_proj output), bf16 in and out with fp32 math.
#pragma once
#include <cstdint>

namespace ssmtune::cuda {

// With add == nullptr: y = rmsnorm(x) * weight. With add: x_out = x + add (written, may alias x), then
// y = rmsnorm(x_out) * weight, in one pass. x, x_out, weight (nullable: w = 1), rstd [rows]: fp32;
// add: bf16 [rows, dim]; y: bf16 [rows, dim] with row stride ldy >= dim (the columns past dim are not
// touched: the LoRA path of in_proj keeps its h there, framework/backend.h).
void rmsnorm_forward(const float* x, const uint16_t* add, float* x_out, const float* weight, uint16_t* y, int64_t ldy,
                     float* rstd, int64_t rows, int64_t dim, float eps, void* stream);

// dx (fp32) += d rmsnorm/dx · dy; then, when dx_act is given, dx_act (bf16) = the updated dx, which is
// the gradient of the previous layer's mixer output. dx_act may alias dy (the step reuses one buffer):
// every element of a row of dy is read before any element of that row of dx_act is written.
void rmsnorm_backward(const float* x, const float* weight, const float* rstd, const uint16_t* dy, float* dx,
                      uint16_t* dx_act, int64_t rows, int64_t dim, void* stream);

// y = x * rstd with rstd = 1 / sqrt(mean(x^2) + eps) per row, as HF's rms_forward: x converted to fp32,
// the product rounded to bf16. x [rows, dim] (row stride ldx) and y (row stride ldy, not overlapping x):
// bf16; rstd: fp32 [rows], written. ld >= dim; any dim >= 1.
void weightless_rmsnorm_forward(const uint16_t* x, int64_t ldx, uint16_t* y, int64_t ldy, float* rstd, int64_t rows,
                                int64_t dim, float eps, void* stream);

// dx = rstd * dy - x * rstd^3 * sum(dy * x) / dim, written as bf16 (row stride lddx, overlapping neither
// x nor dy); x (ldx), dy (lddy): bf16; rstd: fp32 as the forward saved it.
void weightless_rmsnorm_backward(const uint16_t* x, int64_t ldx, const float* rstd, const uint16_t* dy, int64_t lddy,
                                 uint16_t* dx, int64_t lddx, int64_t rows, int64_t dim, void* stream);

}  // namespace ssmtune::cuda
