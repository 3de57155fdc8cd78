// The LoRA path of a linear layer on the GPU: the CUDA counterpart of kernels/cpu/lora.h, whose header
// has the math. The adapters A, B and their gradients are fp32; x, y, h, dy, dx are bf16 (raw uint16
// bits). The dropout mask is the CPU reference's, regenerated from the counter RNG
// (kernels/common/counter_rng.h) with the same (seed, stream, t*in + i), never stored.
#pragma once
#include <cstddef>
#include <cstdint>

#include "kernels/cpu/lora.h"
#include "kernels/cuda/gemm.h"

namespace ssmtune::cuda {

// Scratch that lora_forward and lora_backward need for these dimensions (bf16 copies of A and B, the
// dropped-out input, dh, ...).
size_t lora_workspace_bytes(const cpu::LoraDims& d);

// h[rows, rank] (dense) = A(dropout(x)); y (row stride ldy) += scale * B h, added by the tensor cores
// into y as it stands (beta = 1), not through a separate pass.
void lora_forward(Gemm& gemm, const cpu::LoraDims& d, const uint16_t* x, int64_t ldx, const float* A, const float* B,
                  float scale, const cpu::LoraDropout& dropout, uint16_t* h, uint16_t* y, int64_t ldy,
                  void* workspace);

// dA, dB (fp32) += their gradients; dx (row stride lddx) += the gradient through the LoRA path.
void lora_backward(Gemm& gemm, const cpu::LoraDims& d, const uint16_t* x, int64_t ldx, const float* A,
                   const float* B, float scale, const cpu::LoraDropout& dropout, const uint16_t* h, const uint16_t* dy,
                   int64_t ldy, float* dA, float* dB, uint16_t* dx, int64_t lddx, void* workspace);

}  // namespace ssmtune::cuda
