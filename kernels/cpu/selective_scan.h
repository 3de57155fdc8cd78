// Selective scan of Mamba-1 (mixer steps 4-8 after dt_proj), forward and backward, on the CPU.
//
// Per batch b, channel d, state n, token t, with delta_t = softplus(delta[b,t,d] + delta_bias[d]):
//   h_t[n]  = r_t * exp(delta_t * A[d,n]) * h_{t-1}[n] + delta_t * B_t[n] * u_t[d]   (h_{-1} = initial_state)
//   y_t[d]  = sum_n C_t[n] * h_t[n] + Dskip[d] * u_t[d]
//   out_t[d] = y_t[d] * silu(z_t[d])
// r_t = 0 where a document starts at token t (doc_start[b*len + t] == t), else 1: the state restarts from
// zero at every document's first token, so nothing flows from one packed document into the next, and a
// row that continues a document from an earlier slice (context parallelism) starts from initial_state.
//
// doc_start (int32 [batch*len], may be null = no document starts in the slice): the position within the
// row of the first token of t's document; negative when that document began in an earlier slice. Valid
// rows: doc_start[t] == t (a start), or doc_start[t] == doc_start[t-1] (t > 0), or doc_start[0] < 0.
// initial_state ([batch, dim, state], may be null = 0) is h_{-1}.
//
// Because h is linear in h_{-1}, a row split into slices is recombined exactly (context parallelism):
// with final_state and decay of selective_scan_final_state (from a zero start),
//   h_{len-1} = final_state + decay * h_{-1}
// and the gradient w.r.t. h_{-1} given the gradient g arriving at h_{len-1} is
//   d_initial_state(g) = selective_scan_initial_state_grad(...) + decay * g.
//
// Layout is token-major: u, delta, du, ddelta, dout are dense [batch, len, dim]; out has out_row_stride
// (>= dim) between tokens. B, C (and dB, dC) are strided views with bc_row_stride elements between tokens:
// B[b,t,n] = Bm[(b*len + t)*bc_row_stride + n]; z (and dz) likewise with z_row_stride, so they can point
// into the x_proj / in_proj outputs. A is [dim, state] (already -exp(A_log)); Dskip and delta_bias are [dim].
// initial_state, d_final_state, d_initial_state, final_state, decay are [batch, dim, state].
//
// Organised like the CUDA kernel: the sequence is walked in chunks of chunk_len tokens and the forward
// keeps only the state at the end of each chunk, chunk_states[b, c, d, n]; the backward walks the
// chunks from last to first, recomputes the in-chunk states from the previous chunk's end state (or
// initial_state) and runs the reverse scan for dh, carrying dh across chunk boundaries.
//
// The result does not depend on chunk_len or on the number of OpenMP threads (bit for bit). A doc_start
// that breaks the rules above is refused with std::invalid_argument naming the row and token.
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

// Writes out [batch, len, dim] (row stride out_row_stride; the columns past dim are left untouched) and
// chunk_states [batch, num_chunks, dim, state], which include initial_state's effect.
template <typename T>
void selective_scan_forward(const SelectiveScanShape& s, const T* u, const T* delta, const T* delta_bias,
                            const T* A, const T* Bm, const T* Cm, int64_t bc_row_stride, const T* Dskip,
                            const T* z, int64_t z_row_stride, T* out, int64_t out_row_stride, T* chunk_states,
                            const int32_t* doc_start, const T* initial_state);

// du, ddelta (gradient w.r.t. the delta input, before bias and softplus), dB, dC, dz are written, not
// accumulated; dB/dC use bc_row_stride and dz uses z_row_stride, and elements between the views' rows
// are left untouched. dA, dDskip, ddelta_bias may be null; when given they are accumulated (+=).
// workspace holds selective_scan_backward_workspace_size(s) elements. doc_start and initial_state are
// the forward's. d_final_state (may be null = 0) is the gradient arriving at h_{len-1} from outside the
// slice; d_initial_state (may be null) is written with the gradient w.r.t. h_{-1}.
template <typename T>
void selective_scan_backward(const SelectiveScanShape& s, const T* u, const T* delta, const T* delta_bias,
                             const T* A, const T* Bm, const T* Cm, int64_t bc_row_stride, const T* Dskip,
                             const T* z, int64_t z_row_stride, const T* chunk_states, const T* dout, T* du,
                             T* ddelta, T* dB, T* dC, T* dz, T* dA, T* dDskip, T* ddelta_bias, T* workspace,
                             const int32_t* doc_start, const T* initial_state, const T* d_final_state,
                             T* d_initial_state);

// From a zero initial state: final_state = h_{len-1}, and decay = d h_{len-1} / d h_{-1} (elementwise, the
// map is diagonal) = the product of exp(delta_t * A) over the row's tokens, 0 when a document starts in
// the row. Both written, [batch, dim, state]. chunk_len plays no part.
template <typename T>
void selective_scan_final_state(const SelectiveScanShape& s, const T* u, const T* delta, const T* delta_bias,
                                const T* A, const T* Bm, int64_t bc_row_stride, const int32_t* doc_start,
                                T* final_state, T* decay);

// d_initial_state (written, [batch, dim, state]) = the gradient w.r.t. h_{-1} when none arrives at h_{len-1}:
// the reverse recurrence alone, which needs no states.
template <typename T>
void selective_scan_initial_state_grad(const SelectiveScanShape& s, const T* delta, const T* delta_bias,
                                       const T* A, const T* Cm, int64_t bc_row_stride, const T* z,
                                       int64_t z_row_stride, const T* dout, const int32_t* doc_start,
                                       T* d_initial_state);

}  // namespace ssmtune::cpu
