// Selective scan of Mamba-1 on the GPU: the CUDA counterpart of kernels/cpu/selective_scan.h, whose
// header has the math, the token-major layout and the strided views of B, C and z. u, delta, B, C, z,
// out and all gradients are bf16 (raw uint16 bits); delta_bias, A, Dskip, chunk_states and all
// arithmetic are fp32.
//
// The forward walks each sequence once, 32 channels per block and 4 states per thread, and saves only
// the state at each chunk's end, exactly the CPU reference's chunk_states. Its split form (the halves
// below) is parallel over (batch, channel, chunk) like the backward: each thread owns the N = 16 states
// of one channel for one chunk of chunk_len tokens, every chunk's starting state found from the chunks
// before it (a chunk's local scan plus the decay exp(A * sum delta) across it). The backward carries
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

// The forward's two algorithms: a single pass over each sequence (parallel over batch * dim / 32 blocks
// only, each walking the whole length), or the chunked passes (parallel over chunks too, every
// exponential formed twice). automatic takes the single pass where its blocks fill the GPU: at least 1.5
// per SM and at most 25% more on the busiest SM than on average (a long single sequence goes chunked).
// The others are for tests and benchmarks; both give the same results up to fp32 rounding.
enum class ScanForwardPath { automatic, single_pass, chunked };

// workspace: selective_scan_forward_workspace_bytes(s) bytes: the per-chunk sums of softplus(delta + bias)
// pass through it in the chunked forward (the halves below are chunked); its contents afterwards mean
// nothing.
// out has out_row_stride (>= dim) between tokens. doc_start (int32 [batch*len]) and initial_state (fp32
// [batch, dim, state]) may be null, with the meaning of kernels/cpu/selective_scan.h; doc_start is not
// validated here.
void selective_scan_forward(const cpu::SelectiveScanShape& s, const uint16_t* u, const uint16_t* delta,
                            const float* delta_bias, const float* A, const uint16_t* B, const uint16_t* C,
                            int64_t bc_row_stride, const float* Dskip, const uint16_t* z, int64_t z_row_stride,
                            uint16_t* out, int64_t out_row_stride, float* chunk_states, void* workspace,
                            const int32_t* doc_start, const float* initial_state, void* stream,
                            ScanForwardPath path = ScanForwardPath::automatic);

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

// The forward and the backward in two halves, for context parallelism (framework/context_parallel.h),
// where the state entering a slice, and the gradient arriving at its last state, are known only after
// every slice has run its first half. The halves take the one-call op's arguments and workspace; between
// them chunk_states and the workspace must be left as they are. begin then end equals the one-call op
// up to the rounding of adding the incoming state (or gradient) afterwards.
// forward_begin: the scan from a zero initial state: final_state and decay (fp32 [batch, dim, state],
// written) as cpu::selective_scan_final_state. forward_end: the forward from initial_state (nullable):
// out, and chunk_states including its effect.
void selective_scan_forward_begin(const cpu::SelectiveScanShape& s, const uint16_t* u, const uint16_t* delta,
                                  const float* delta_bias, const float* A, const uint16_t* B, int64_t bc_row_stride,
                                  float* chunk_states, void* workspace, const int32_t* doc_start, float* final_state,
                                  float* decay, void* stream);
void selective_scan_forward_end(const cpu::SelectiveScanShape& s, const uint16_t* u, const uint16_t* delta,
                                const float* delta_bias, const float* A, const uint16_t* B, const uint16_t* C,
                                int64_t bc_row_stride, const float* Dskip, const uint16_t* z, int64_t z_row_stride,
                                uint16_t* out, int64_t out_row_stride, float* chunk_states, void* workspace,
                                const int32_t* doc_start, const float* initial_state, void* stream);
// backward_begin: d_initial_state (fp32 [batch, dim, state], written) with no gradient arriving at the last
// state, as cpu::selective_scan_initial_state_grad. backward_end: du, ddelta, dB, dC, dz with
// d_final_state (nullable) arriving there.
void selective_scan_backward_begin(const cpu::SelectiveScanShape& s, const uint16_t* u, const uint16_t* delta,
                                   const float* delta_bias, const float* A, const uint16_t* B, const uint16_t* C,
                                   int64_t bc_row_stride, const uint16_t* z, int64_t z_row_stride,
                                   const float* chunk_states, const uint16_t* dout, void* workspace,
                                   const int32_t* doc_start, const float* initial_state, float* d_initial_state,
                                   void* stream);
void selective_scan_backward_end(const cpu::SelectiveScanShape& s, const uint16_t* u, const uint16_t* delta,
                                 const float* delta_bias, const float* A, const uint16_t* B, const uint16_t* C,
                                 int64_t bc_row_stride, const float* Dskip, const uint16_t* z, int64_t z_row_stride,
                                 const float* chunk_states, const uint16_t* dout, uint16_t* du, uint16_t* ddelta,
                                 uint16_t* dB, uint16_t* dC, uint16_t* dz, void* workspace, const int32_t* doc_start,
                                 const float* initial_state, const float* d_final_state, void* stream);

}  // namespace ssmtune::cuda
