// One token of recurrent decoding (framework/generation.h) for `rows` independent sequences: the causal
// conv1d + SiLU of causal_conv1d.h and the selective scan of selective_scan.h advanced by one token
// from a carried state instead of over a whole sequence, with the same math and the same order of
// every sum, so a sequence fed token by token gives what the full-sequence ops give (bit for bit on
// the CPU).
//
// conv1d_silu_step, per row r and channel d, with window[r,d,0..K-2] the previous K-1 inputs of the
// channel, oldest first (zeros before the sequence start):
//   p        = bias[d] + sum_{k=0}^{K-2} w[d,k] * window[r,d,k] + w[d,K-1] * x[r,d]
//   u[r,d]   = silu(p) = p * sigmoid(p)
//   window[r,d,·] <- (window[r,d,1..K-2], x[r,d])          (shifted by one: the newest input last)
// The full-sequence sum adds the taps in the same order k = 0..K-1, skipping taps before the start,
// where the window holds zeros: adding w * 0 = +0 leaves every partial sum unchanged.
//
// selective_scan_step, per row r, channel d, state n, with delta = softplus(delta_in[r,d] + delta_bias[d]):
//   h[r,d,n]  = exp(delta * A[d,n]) * h[r,d,n] + B[r,n] * (delta * u[r,d])      (h = 0 before the start)
//   y         = sum_n C[r,n] * h[r,d,n] + Dskip[d] * u[r,d]
//   out[r,d]  = y * silu(z[r,d])
// B and C are strided views (bc_row_stride elements between rows: the x_proj output), z likewise
// (z_row_stride: the second half of the in_proj output). Instantiated for float and double.
#pragma once
#include <cstdint>

namespace ssmtune::cpu {

// x: row stride x_row_stride (the first half of the in_proj output row); weight [dim, K], bias [dim] or
// nullptr; window [rows, dim, K-1], updated in place; u [rows, dim], written. kernel >= 1.
template <typename T>
void causal_conv1d_silu_step(const T* x, int64_t x_row_stride, const T* weight, const T* bias, T* window, T* u,
                             int64_t rows, int64_t dim, int64_t kernel);

// u, delta, out: [rows, dim]; A [dim, state]; delta_bias, Dskip [dim]; h [rows, dim, state], updated in
// place; out written.
template <typename T>
void selective_scan_step(const T* u, const T* delta, const T* delta_bias, const T* A, const T* Bm, const T* Cm,
                         int64_t bc_row_stride, const T* Dskip, const T* z, int64_t z_row_stride, T* h, T* out,
                         int64_t rows, int64_t dim, int64_t state);

}  // namespace ssmtune::cpu
