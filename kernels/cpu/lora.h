// The LoRA path of a linear layer, CPU reference.
//   forward:  h[t,j] = sum_i A[j,i] * xd[t,i]        xd = dropout(x): x * keep / (1-p)
//             y[t,o] += scale * sum_j B[o,j] * h[t,j]
//   backward: dB[o,j] += scale * sum_t dy[t,o] * h[t,j]
//             dh[t,j]  = scale * sum_o dy[t,o] * B[o,j]
//             dA[j,i] += sum_t dh[t,j] * xd[t,i]
//             dx[t,i] += keep[t,i] / (1-p) * sum_j dh[t,j] * A[j,i]
// The dropout mask is regenerated from (seed, stream, t*in + i) with the counter RNG, never stored.
#pragma once
#include <cstdint>

namespace ssmtune::cpu {

struct LoraDims {
  int64_t rows, in, out, rank;
};

struct LoraDropout {
  double p = 0;
  uint64_t seed = 0, stream = 0;
};

// h has row stride ldh (>= rank): it may be columns of x's own rows (framework/backend.h, h_in_x_columns).
// The down-projection alone: h = A(dropout(x)).
template <typename T>
void lora_down_projection(const LoraDims& d, const T* x, int64_t ldx, const T* A, const LoraDropout& dropout, T* h,
                          int64_t ldh);

// The down-projection, then y += scale * B h.
template <typename T>
void lora_forward(const LoraDims& d, const T* x, int64_t ldx, const T* A, const T* B, T scale,
                  const LoraDropout& dropout, T* h, int64_t ldh, T* y, int64_t ldy);

// dh_workspace: rows*rank elements.
template <typename T>
void lora_backward(const LoraDims& d, const T* x, int64_t ldx, const T* A, const T* B, T scale,
                   const LoraDropout& dropout, const T* h, int64_t ldh, const T* dy, int64_t ldy, T* dA, T* dB, T* dx,
                   int64_t lddx, T* dh_workspace);

}  // namespace ssmtune::cpu
