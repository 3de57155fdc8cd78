// The LoRA path of a linear layer on the GPU: the CUDA counterpart of kernels/cpu/lora.h, whose header
// has the math. The adapters A, B and their gradients are fp32 masters; the GEMMs read bf16 copies of A
// and B, made for all adapters at once by lora_adapters_to_bf16 (one launch per pass instead of two per
// call). x, y, h, dy, dx are bf16 (raw uint16 bits). The dropout mask is the CPU reference's, regenerated
// from the counter RNG (kernels/common/counter_rng.h) with the same (seed, stream, t*in + i), never stored.
#pragma once
#include <cstddef>
#include <cstdint>

#include "kernels/cpu/lora.h"
#include "kernels/cuda/gemm.h"

namespace ssmtune::cuda {

// params_bf16[i] = bf16(params[i]) (round to nearest even), i < n: the copies of A and B below.
void lora_adapters_to_bf16(const float* params, int64_t n, uint16_t* params_bf16, void* stream);

// Scratch that lora_forward and lora_backward need for these dimensions (dh, and with dropout the
// dropped-out input, 4 bytes per element of x: the largest part, needed only when the calls' dropout.p > 0).
size_t lora_workspace_bytes(const cpu::LoraDims& d, bool dropout);

// A16, B16 below: lora_adapters_to_bf16's copies of A [rank, in] and B [out, rank].

// h[rows, rank] (row stride ldh) = A(dropout(x)): the down-projection alone.
void lora_down_projection(Gemm& gemm, const cpu::LoraDims& d, const uint16_t* x, int64_t ldx, const uint16_t* A16,
                          const cpu::LoraDropout& dropout, uint16_t* h, int64_t ldh, void* workspace);

// up[o, j] (bf16, row stride ld) = scale * B[o, j], o < out, j < rank: the up-projection as rank more
// columns of the dequantized base weight, so that one GEMM of [x | h] with [W | scale·B] gives both paths.
// From the fp32 B: the product is rounded once.
void lora_scaled_up_weight(const cpu::LoraDims& d, const float* B, float scale, uint16_t* up, int64_t ld,
                           void* stream);

// The down-projection, then y (row stride ldy) += scale * B h in a second GEMM accumulating into y
// (beta = 1): for callers whose x has no room for h (framework/backend.h, h_in_x_columns).
void lora_forward(Gemm& gemm, const cpu::LoraDims& d, const uint16_t* x, int64_t ldx, const uint16_t* A16,
                  const uint16_t* B16, float scale, const cpu::LoraDropout& dropout, uint16_t* h, int64_t ldh,
                  uint16_t* y, int64_t ldy, void* workspace);

// dA, dB (fp32) += their gradients; dx (row stride lddx) += the gradient through the LoRA path.
void lora_backward(Gemm& gemm, const cpu::LoraDims& d, const uint16_t* x, int64_t ldx, const uint16_t* A16,
                   const uint16_t* B16, float scale, const cpu::LoraDropout& dropout, const uint16_t* h, int64_t ldh,
                   const uint16_t* dy, int64_t ldy, float* dA, float* dB, uint16_t* dx, int64_t lddx, void* workspace);

}  // namespace ssmtune::cuda
