// Selective scan of Mamba-1 (mixer steps 4-8 after dt_proj), forward and backward, on the CPU.
//
// Per batch b, channel d, state n, token t, with delta_t = softplus(delta[b,t,d] + delta_bias[d]):
//   h_t[n]  = exp(delta_t * A[d,n]) * h_{t-1}[n] + delta_t * B_t[n] * u_t[d]        (h_{-1} = 0)
//   y_t[d]  = sum_n C_t[n] * h_t[n] + Dskip[d] * u_t[d]
//   out_t[d] = y_t[d] * silu(z_t[d])
//
// Layout is token-major: u, delta, out, du, ddelta are dense [batch, len, dim]. B, C (and dB, dC) are
// strided views with bc_row_stride elements between tokens: B[b,t,n] = Bm[(b*len + t)*bc_row_stride + n];
// z (and dz) likewise with z_row_stride, so they can point into the x_proj / in_proj outputs.
// A is [dim, state] (already -exp(A_log)); Dskip and delta_bias are [dim].
//
// Organised like the CUDA kernel: the sequence is walked in chunks of chunk_len tokens and the forward
// keeps only the state at the end of each chunk, chunk_states[b, c, d, n]; the backward walks the
// chunks from last to first, recomputes the in-chunk states from the previous chunk's end state and
// runs the reverse scan for dh, carrying dh across chunk boundaries.
//
// The result does not depend on chunk_len or on the number of OpenMP threads (bit for bit).
#pragma once
#include <cstdint>

namespace ssmtune::cpu {

struct SelectiveScanShape {
  int64_t batch, len, dim, state, chunk_len;  // chunk_len >= 1
};

// ceil(len / chunk_len): the chunk_states tensor is [batch, num_chunks, dim, state].
int64_t selective_scan_num_chunks(const SelectiveScanShape& s);

// Elements of T the backward needs as workspace: recomputed in-chunk states for every OpenMP thread
// (omp_get_max_threads() at the time of the call: query it with the thread count the backward will
// run with) plus per-batch partial sums of dA, dDskip and ddelta_bias, reduced in a fixed order.
int64_t selective_scan_backward_workspace_size(const SelectiveScanShape& s);

// Writes out [batch, len, dim] and chunk_states [batch, num_chunks, dim, state].
template <typename T>
void selective_scan_forward(const SelectiveScanShape& s, const T* u, const T* delta, const T* delta_bias,
                            const T* A, const T* Bm, const T* Cm, int64_t bc_row_stride, const T* Dskip,
                            const T* z, int64_t z_row_stride, T* out, T* chunk_states);

// du, ddelta (gradient w.r.t. the delta input, before bias and softplus), dB, dC, dz are written, not
// accumulated; dB/dC use bc_row_stride and dz uses z_row_stride, and elements between the views' rows
// are left untouched. dA, dDskip, ddelta_bias may be null; when given they are accumulated (+=).
// workspace holds selective_scan_backward_workspace_size(s) elements.
template <typename T>
void selective_scan_backward(const SelectiveScanShape& s, const T* u, const T* delta, const T* delta_bias,
                             const T* A, const T* Bm, const T* Cm, int64_t bc_row_stride, const T* Dskip,
                             const T* z, int64_t z_row_stride, const T* chunk_states, const T* dout, T* du,
                             T* ddelta, T* dB, T* dC, T* dz, T* dA, T* dDskip, T* ddelta_bias, T* workspace);

}  // namespace ssmtune::cpu
