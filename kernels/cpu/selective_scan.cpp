// Selective scan (Mamba-1), forward and backward; the math is in selective_scan.h.
//
// Backward, per (b, d), walking t from last to first with dy_t = dout_t * silu(z_t),
// e_t[n] = r_t * exp(delta_t*A[n]) (the decay factor, 0 at a document's first token) and
// a_t[n] = e_t[n] * h_{t-1}[n] (the decayed previous state):
//   dh_t[n]    = dy_t * C_t[n] + e_{t+1}[n] * dh_{t+1}[n]      (e_len * dh_len = d_final_state, or 0)
//   du_t       = dy_t * Dskip + sum_n dh_t[n] * delta_t * B_t[n]
//   ddelta_t   = sigmoid(delta[b,t,d] + delta_bias[d]) * sum_n dh_t[n] * (B_t[n]*u_t + A[n]*a_t[n])
//   dB_t[n]   += dh_t[n] * delta_t * u_t          dC_t[n] += dy_t * h_t[n]       (summed over d)
//   dA[n]     += dh_t[n] * delta_t * a_t[n]       dDskip  += dy_t * u_t     ddelta_bias += ddelta_t
//   dz_t       = dout_t * y_t * sigmoid(z_t) * (1 + z_t * (1 - sigmoid(z_t)))
//   d h_{-1}   = e_0 * dh_0
// (ddelta_t has no A*a_t term at a document's first token: r_t = 0 does not depend on delta.)
// mamba-ssm recovers a_t as h_t - delta_t*B_t*u_t; here the recomputed h_{t-1} is at hand, so a_t is
// formed directly, which avoids the cancellation.
//
// Exactness across chunk lengths: every state is produced by the same scan_step expression whether it
// is computed in the forward or recomputed in the backward, and chunk end states are stored and
// reloaded without rounding, so the states, the reverse scan and every sum (always taken in the same
// order of t, d and n) are identical for any chunk_len. selective_scan_final_state and
// selective_scan_initial_state_grad use the same expressions too, so they agree bit for bit with the
// forward's last state and the backward's d_initial_state.
#include "kernels/cpu/selective_scan.h"
#include "kernels/cpu/activations.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace ssmtune::cpu {
namespace {

// The factor e_t that multiplies h_{t-1}: 0 at a document's first token, where the state restarts.
template <typename T>
T decay_factor(bool starts, T delta_t, T A) {
  return starts ? T(0) : std::exp(delta_t * A);
}

// One recurrence step for all states of a channel; h_prev may equal h (in place).
template <typename T>
void scan_step(int64_t state, T delta_t, const T* A_row, const T* B_t, T u_t, bool starts, const T* h_prev, T* h) {
  const T delta_u = delta_t * u_t;
  for (int64_t n = 0; n < state; ++n) h[n] = decay_factor(starts, delta_t, A_row[n]) * h_prev[n] + B_t[n] * delta_u;
}

bool document_starts(const int32_t* doc_start, int64_t row, int64_t t) {
  return doc_start != nullptr && doc_start[row] == t;
}

// The rules of selective_scan.h, checked before any parallel region (an exception must not leave one).
void check_doc_start(const SelectiveScanShape& s, const int32_t* doc_start, const char* op) {
  if (doc_start == nullptr) return;
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t t = 0; t < s.len; ++t) {
      const int64_t row = b * s.len + t;
      const int32_t v = doc_start[row];
      if (v == t || (t > 0 && v == doc_start[row - 1]) || (t == 0 && v < 0)) continue;
      throw std::invalid_argument(std::string(op) + ": doc_start of row " + std::to_string(b) + ", token " +
                                  std::to_string(t) + " is " + std::to_string(v) + "; expected " +
                                  std::to_string(t) + " (a document starts) or " +
                                  (t > 0 ? "the previous token's " + std::to_string(doc_start[row - 1])
                                         : std::string("a negative value (continued from an earlier slice)")));
    }
  }
}

// The state before token 0 of row b, channel d: initial_state's, or zero.
template <typename T>
void load_initial_state(const SelectiveScanShape& s, const T* initial_state, int64_t b, int64_t d, T* h) {
  if (initial_state == nullptr) {
    std::fill(h, h + s.state, T(0));
  } else {
    const T* h0 = initial_state + (b * s.dim + d) * s.state;
    std::copy(h0, h0 + s.state, h);
  }
}

template <typename T>
T scan_output(int64_t state, const T* C_t, const T* h, T Dskip_d, T u_t) {
  T y = T(0);
  for (int64_t n = 0; n < state; ++n) y += C_t[n] * h[n];
  return y + Dskip_d * u_t;
}

int64_t chunk_rows(const SelectiveScanShape& s) { return std::min(s.chunk_len, s.len); }

// Per thread: the state before the chunk and after each of its tokens, then the dh carry.
int64_t per_thread_workspace(const SelectiveScanShape& s) { return (chunk_rows(s) + 2) * s.state; }

// Per batch: partial dA [dim, state], dDskip [dim], ddelta_bias [dim].
int64_t per_batch_partials(const SelectiveScanShape& s) { return s.dim * s.state + 2 * s.dim; }

}  // namespace

int64_t selective_scan_num_chunks(const SelectiveScanShape& s) { return (s.len + s.chunk_len - 1) / s.chunk_len; }

int64_t selective_scan_backward_workspace_size(const SelectiveScanShape& s) {
  return int64_t(omp_get_max_threads()) * per_thread_workspace(s) + s.batch * per_batch_partials(s);
}

// Every (b, d) is an independent recurrence; the running state lives in the chunk_states slot of the
// current chunk, which is exactly what has to be left there at the chunk's end.
template <typename T>
void selective_scan_forward(const SelectiveScanShape& s, const T* u, const T* delta, const T* delta_bias,
                            const T* A, const T* Bm, const T* Cm, int64_t bc_row_stride, const T* Dskip,
                            const T* z, int64_t z_row_stride, T* out, int64_t out_row_stride, T* chunk_states,
                            const int32_t* doc_start, const T* initial_state) {
  const int64_t D = s.dim, N = s.state, num_chunks = selective_scan_num_chunks(s);
  if (out_row_stride < D)
    throw std::invalid_argument("selective_scan_forward: out_row_stride " + std::to_string(out_row_stride) +
                                " is smaller than dim " + std::to_string(D));
  check_doc_start(s, doc_start, "selective_scan_forward");
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t d = 0; d < D; ++d) {
      const T* A_row = A + d * N;
      for (int64_t c = 0; c < num_chunks; ++c) {
        T* h = chunk_states + ((b * num_chunks + c) * D + d) * N;
        if (c == 0) {
          load_initial_state(s, initial_state, b, d, h);
        } else {
          std::copy(h - D * N, h - D * N + N, h);
        }
        const int64_t t_end = std::min((c + 1) * s.chunk_len, s.len);
        for (int64_t t = c * s.chunk_len; t < t_end; ++t) {
          const int64_t row = b * s.len + t;
          const T u_t = u[row * D + d];
          const T delta_t = softplus(delta[row * D + d] + delta_bias[d]);
          scan_step(N, delta_t, A_row, Bm + row * bc_row_stride, u_t, document_starts(doc_start, row, t), h, h);
          const T y = scan_output(N, Cm + row * bc_row_stride, h, Dskip[d], u_t);
          const T z_t = z[row * z_row_stride + d];
          out[row * out_row_stride + d] = y * (z_t * sigmoid(z_t));
        }
      }
    }
  }
}

// Parallel over batch, deterministic: one thread owns batch b and walks its channels in order
// d = 0..dim-1, so each dB/dC element is summed over d in that fixed order (and over t in descending
// order within a channel) whatever the thread count. dA, dDskip and ddelta_bias also sum over b: each
// batch writes its own partial sums to the workspace, and they are added in order b = 0..batch-1.
template <typename T>
void selective_scan_backward(const SelectiveScanShape& s, const T* u, const T* delta, const T* delta_bias,
                             const T* A, const T* Bm, const T* Cm, int64_t bc_row_stride, const T* Dskip,
                             const T* z, int64_t z_row_stride, const T* chunk_states, const T* dout, T* du,
                             T* ddelta, T* dB, T* dC, T* dz, T* dA, T* dDskip, T* ddelta_bias, T* workspace,
                             const int32_t* doc_start, const T* initial_state, const T* d_final_state,
                             T* d_initial_state) {
  const int64_t D = s.dim, N = s.state, num_chunks = selective_scan_num_chunks(s);
  check_doc_start(s, doc_start, "selective_scan_backward");
  T* partials = workspace + int64_t(omp_get_max_threads()) * per_thread_workspace(s);
#pragma omp parallel
  {
    T* states = workspace + int64_t(omp_get_thread_num()) * per_thread_workspace(s);
    T* dh = states + (chunk_rows(s) + 1) * N;  // dh_t before the C term: the carry from t+1
#pragma omp for schedule(static)
    for (int64_t b = 0; b < s.batch; ++b) {
      T* dA_b = partials + b * per_batch_partials(s);
      T* dDskip_b = dA_b + D * N;
      T* ddelta_bias_b = dDskip_b + D;
      std::fill(dA_b, dA_b + per_batch_partials(s), T(0));
      for (int64_t t = 0; t < s.len; ++t) {
        const int64_t row = b * s.len + t;
        std::fill(dB + row * bc_row_stride, dB + row * bc_row_stride + N, T(0));
        std::fill(dC + row * bc_row_stride, dC + row * bc_row_stride + N, T(0));
      }
      for (int64_t d = 0; d < D; ++d) {
        const T* A_row = A + d * N;
        if (d_final_state == nullptr) {
          std::fill(dh, dh + N, T(0));
        } else {
          std::copy(d_final_state + (b * D + d) * N, d_final_state + (b * D + d + 1) * N, dh);
        }
        for (int64_t c = num_chunks - 1; c >= 0; --c) {
          const int64_t t_begin = c * s.chunk_len, t_end = std::min(t_begin + s.chunk_len, s.len);
          // states row i = state after token t_begin + i - 1; row 0 = previous chunk's end state.
          if (c == 0) {
            load_initial_state(s, initial_state, b, d, states);
          } else {
            const T* h_saved = chunk_states + ((b * num_chunks + c - 1) * D + d) * N;
            std::copy(h_saved, h_saved + N, states);
          }
          for (int64_t t = t_begin; t < t_end; ++t) {
            const int64_t row = b * s.len + t;
            const T delta_t = softplus(delta[row * D + d] + delta_bias[d]);
            T* h_prev = states + (t - t_begin) * N;
            scan_step(N, delta_t, A_row, Bm + row * bc_row_stride, u[row * D + d], document_starts(doc_start, row, t),
                      h_prev, h_prev + N);
          }
          for (int64_t t = t_end - 1; t >= t_begin; --t) {
            const int64_t row = b * s.len + t;
            const T* h_prev = states + (t - t_begin) * N;
            const T* h = h_prev + N;
            const T* B_t = Bm + row * bc_row_stride;
            const T* C_t = Cm + row * bc_row_stride;
            T* dB_t = dB + row * bc_row_stride;
            T* dC_t = dC + row * bc_row_stride;
            const T u_t = u[row * D + d];
            const T delta_pre = delta[row * D + d] + delta_bias[d];
            const T delta_t = softplus(delta_pre);
            const T z_t = z[row * z_row_stride + d];
            const T sig_z = sigmoid(z_t);
            const T dout_t = dout[row * D + d];
            const T y = scan_output(N, C_t, h, Dskip[d], u_t);
            dz[row * z_row_stride + d] = dout_t * y * sig_z * (T(1) + z_t * (T(1) - sig_z));
            const T dy = dout_t * (z_t * sig_z);
            const bool starts = document_starts(doc_start, row, t);
            T du_t = dy * Dskip[d];
            T ddelta_t = T(0);
            for (int64_t n = 0; n < N; ++n) {
              const T dh_t = dh[n] + dy * C_t[n];
              const T decay = decay_factor(starts, delta_t, A_row[n]);
              const T a = decay * h_prev[n];
              dC_t[n] += dy * h[n];
              dB_t[n] += dh_t * delta_t * u_t;
              du_t += dh_t * delta_t * B_t[n];
              ddelta_t += dh_t * (B_t[n] * u_t + A_row[n] * a);
              dA_b[d * N + n] += dh_t * delta_t * a;
              dh[n] = decay * dh_t;
            }
            ddelta_t *= sigmoid(delta_pre);
            du[row * D + d] = du_t;
            ddelta[row * D + d] = ddelta_t;
            dDskip_b[d] += dy * u_t;
            ddelta_bias_b[d] += ddelta_t;
          }
        }
        if (d_initial_state != nullptr) std::copy(dh, dh + N, d_initial_state + (b * D + d) * N);
      }
    }
    // The implicit barrier of the loop above makes every batch's partials visible here.
    if (dA != nullptr) {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < D * N; ++i) {
        T sum = T(0);
        for (int64_t b = 0; b < s.batch; ++b) sum += partials[b * per_batch_partials(s) + i];
        dA[i] += sum;
      }
    }
    if (dDskip != nullptr || ddelta_bias != nullptr) {
#pragma omp for schedule(static)
      for (int64_t d = 0; d < D; ++d) {
        T sum_dDskip = T(0), sum_ddelta_bias = T(0);
        for (int64_t b = 0; b < s.batch; ++b) {
          const T* p = partials + b * per_batch_partials(s) + D * N;
          sum_dDskip += p[d];
          sum_ddelta_bias += p[D + d];
        }
        if (dDskip != nullptr) dDskip[d] += sum_dDskip;
        if (ddelta_bias != nullptr) ddelta_bias[d] += sum_ddelta_bias;
      }
    }
  }
}

// The forward's recurrence from a zero state, keeping only the last state, with the product of the decay
// factors alongside.
template <typename T>
void selective_scan_final_state(const SelectiveScanShape& s, const T* u, const T* delta, const T* delta_bias,
                                const T* A, const T* Bm, int64_t bc_row_stride, const int32_t* doc_start,
                                T* final_state, T* decay) {
  const int64_t D = s.dim, N = s.state;
  check_doc_start(s, doc_start, "selective_scan_final_state");
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t d = 0; d < D; ++d) {
      const T* A_row = A + d * N;
      T* h = final_state + (b * D + d) * N;
      T* e = decay + (b * D + d) * N;
      std::fill(h, h + N, T(0));
      std::fill(e, e + N, T(1));
      for (int64_t t = 0; t < s.len; ++t) {
        const int64_t row = b * s.len + t;
        const T delta_t = softplus(delta[row * D + d] + delta_bias[d]);
        const bool starts = document_starts(doc_start, row, t);
        scan_step(N, delta_t, A_row, Bm + row * bc_row_stride, u[row * D + d], starts, h, h);
        for (int64_t n = 0; n < N; ++n) e[n] *= decay_factor(starts, delta_t, A_row[n]);
      }
    }
  }
}

// The backward's dh recurrence alone, from dh = 0 at the last token.
template <typename T>
void selective_scan_initial_state_grad(const SelectiveScanShape& s, const T* delta, const T* delta_bias,
                                       const T* A, const T* Cm, int64_t bc_row_stride, const T* z,
                                       int64_t z_row_stride, const T* dout, const int32_t* doc_start,
                                       T* d_initial_state) {
  const int64_t D = s.dim, N = s.state;
  check_doc_start(s, doc_start, "selective_scan_initial_state_grad");
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t d = 0; d < D; ++d) {
      const T* A_row = A + d * N;
      T* dh = d_initial_state + (b * D + d) * N;
      std::fill(dh, dh + N, T(0));
      for (int64_t t = s.len - 1; t >= 0; --t) {
        const int64_t row = b * s.len + t;
        const T delta_t = softplus(delta[row * D + d] + delta_bias[d]);
        const T z_t = z[row * z_row_stride + d];
        const T dy = dout[row * D + d] * (z_t * sigmoid(z_t));
        const T* C_t = Cm + row * bc_row_stride;
        const bool starts = document_starts(doc_start, row, t);
        for (int64_t n = 0; n < N; ++n) {
          const T dh_t = dh[n] + dy * C_t[n];
          dh[n] = decay_factor(starts, delta_t, A_row[n]) * dh_t;
        }
      }
    }
  }
}

#define SSMTUNE_INSTANTIATE_SELECTIVE_SCAN(T)                                                                     \
  template void selective_scan_forward<T>(const SelectiveScanShape&, const T*, const T*, const T*, const T*,      \
                                          const T*, const T*, int64_t, const T*, const T*, int64_t, T*, int64_t,  \
                                          T*, const int32_t*, const T*);                                          \
  template void selective_scan_backward<T>(const SelectiveScanShape&, const T*, const T*, const T*, const T*,     \
                                           const T*, const T*, int64_t, const T*, const T*, int64_t, const T*,    \
                                           const T*, T*, T*, T*, T*, T*, T*, T*, T*, T*, const int32_t*, const T*, \
                                           const T*, T*);                                                         \
  template void selective_scan_final_state<T>(const SelectiveScanShape&, const T*, const T*, const T*, const T*,  \
                                              const T*, int64_t, const int32_t*, T*, T*);                         \
  template void selective_scan_initial_state_grad<T>(const SelectiveScanShape&, const T*, const T*, const T*,     \
                                                     const T*, int64_t, const T*, int64_t, const T*,              \
                                                     const int32_t*, T*);
SSMTUNE_INSTANTIATE_SELECTIVE_SCAN(float)
SSMTUNE_INSTANTIATE_SELECTIVE_SCAN(double)
#undef SSMTUNE_INSTANTIATE_SELECTIVE_SCAN

}  // namespace ssmtune::cpu
