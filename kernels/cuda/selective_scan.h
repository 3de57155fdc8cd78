// Selective scan of Mamba-1 on the GPU: the CUDA counterpart of kernels/cpu/selective_scan.h, whose
// header has the math, the token-major layout and the strided views of B, C and z. u, delta, B, C, z,
// out and all gradients are bf16 (raw uint16 bits); delta_bias, A, Dskip, chunk_states and all
// arithmetic are fp32.
//
// Parallel over (batch, channel, chunk): each thread owns the N = 16 states of one channel for one chunk
// of chunk_len tokens. The forward finds every chunk's starting state from the chunks before it (a
// chunk's local scan plus the decay exp(A * sum delta) across it), then writes the outputs; it saves
// only the state at each chunk's end, exactly the CPU reference's chunk_states. The backward carries
// dh across chunks the same way in reverse and recomputes the states inside each chunk from the saved
// one. dB and dC, sums over channels, are reduced in a fixed order: results do not depend on timing.
#pragma once
#include <cstddef>
#include <cstdint>

#include "kernels/cpu/selective_scan.h"

namespace ssmtune::cuda {

// Only state == 16 (every released Mamba-1 model) is instantiated; other sizes are refused with an error.
// The scratch each direction needs; one buffer of the larger size serves both, one call at a time.
size_t selective_scan_forward_workspace_bytes(const cpu::SelectiveScanShape& s);
size_t selective_scan_backward_workspace_bytes(const cpu::SelectiveScanShape& s);

// workspace: selective_scan_forward_workspace_bytes(s) bytes (the per-chunk sums of softplus(delta + bias)
// pass through it from the first launch to the second); its contents afterwards mean nothing.
void selective_scan_forward(const cpu::SelectiveScanShape& s, const uint16_t* u, const uint16_t* delta,
                            const float* delta_bias, const float* A, const uint16_t* B, const uint16_t* C,
                            int64_t bc_row_stride, const float* Dskip, const uint16_t* z, int64_t z_row_stride,
                            uint16_t* out, float* chunk_states, void* workspace, void* stream);

// du, ddelta, dB, dC, dz are written (not accumulated), as in the CPU reference; elements between the
// strided views' rows are left untouched.
void selective_scan_backward(const cpu::SelectiveScanShape& s, const uint16_t* u, const uint16_t* delta,
                             const float* delta_bias, const float* A, const uint16_t* B, const uint16_t* C,
                             int64_t bc_row_stride, const float* Dskip, const uint16_t* z, int64_t z_row_stride,
                             const float* chunk_states, const uint16_t* dout, uint16_t* du, uint16_t* ddelta,
                             uint16_t* dB, uint16_t* dC, uint16_t* dz, void* workspace, void* stream);

}  // namespace ssmtune::cuda
