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
// The scratch each op needs; one buffer of the largest size serves all, one call at a time.
size_t selective_scan_forward_workspace_bytes(const cpu::SelectiveScanShape& s);
size_t selective_scan_backward_workspace_bytes(const cpu::SelectiveScanShape& s);
size_t selective_scan_final_state_workspace_bytes(const cpu::SelectiveScanShape& s);
size_t selective_scan_initial_state_grad_workspace_bytes(const cpu::SelectiveScanShape& s);

// workspace: selective_scan_forward_workspace_bytes(s) bytes (the per-chunk sums of softplus(delta + bias)
// pass through it from the first launch to the second); its contents afterwards mean nothing.
// out has out_row_stride (>= dim) between tokens. doc_start (int32 [batch*len]) and initial_state (fp32
// [batch, dim, state]) may be null, with the meaning of kernels/cpu/selective_scan.h; doc_start is not
// validated here.
void selective_scan_forward(const cpu::SelectiveScanShape& s, const uint16_t* u, const uint16_t* delta,
                            const float* delta_bias, const float* A, const uint16_t* B, const uint16_t* C,
                            int64_t bc_row_stride, const float* Dskip, const uint16_t* z, int64_t z_row_stride,
                            uint16_t* out, int64_t out_row_stride, float* chunk_states, void* workspace,
                            const int32_t* doc_start, const float* initial_state, void* stream);

// du, ddelta, dB, dC, dz are written (not accumulated), as in the CPU reference; elements between the
// strided views' rows are left untouched. d_final_state (fp32 [batch, dim, state]) may be null;
// d_initial_state (fp32 [batch, dim, state]) is written when not null.
void selective_scan_backward(const cpu::SelectiveScanShape& s, const uint16_t* u, const uint16_t* delta,
                             const float* delta_bias, const float* A, const uint16_t* B, const uint16_t* C,
                             int64_t bc_row_stride, const float* Dskip, const uint16_t* z, int64_t z_row_stride,
                             const float* chunk_states, const uint16_t* dout, uint16_t* du, uint16_t* ddelta,
                             uint16_t* dB, uint16_t* dC, uint16_t* dz, void* workspace, const int32_t* doc_start,
                             const float* initial_state, const float* d_final_state, float* d_initial_state,
                             void* stream);

// final_state and decay (fp32 [batch, dim, state], written): the row's last state from a zero start and
// d h_{len-1} / d h_{-1}, as cpu::selective_scan_final_state.
void selective_scan_final_state(const cpu::SelectiveScanShape& s, const uint16_t* u, const uint16_t* delta,
                                const float* delta_bias, const float* A, const uint16_t* B, int64_t bc_row_stride,
                                const int32_t* doc_start, float* final_state, float* decay, void* workspace,
                                void* stream);

// d_initial_state (fp32 [batch, dim, state], written), as cpu::selective_scan_initial_state_grad.
void selective_scan_initial_state_grad(const cpu::SelectiveScanShape& s, const uint16_t* delta,
                                       const float* delta_bias, const float* A, const uint16_t* C,
                                       int64_t bc_row_stride, const uint16_t* z, int64_t z_row_stride,
                                       const uint16_t* dout, const int32_t* doc_start, float* d_initial_state,
                                       void* workspace, void* stream);

}  // namespace ssmtune::cuda
