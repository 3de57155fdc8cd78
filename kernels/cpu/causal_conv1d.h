// Depthwise causal convolution with bias and SiLU (Mamba mixer step 2), token-major layout:
//   p[b,t,d] = bias[d] + sum_{k=0}^{K-1} w[d,k] * x[b, t-(K-1)+k, d]     (x = 0 at negative times)
//   u[b,t,d] = silu(p) = p * sigmoid(p)
// Backward, with g = du * silu'(p) and silu'(p) = s * (1 + p * (1 - s)), s = sigmoid(p):
//   dx[b,tau,d] = sum_k w[d,k] * g[b, tau+(K-1)-k, d]     (terms past the end of the sequence are 0)
//   dw[d,k]     = sum_{b,t} g[b,t,d] * x[b, t-(K-1)+k, d]
//   dbias[d]    = sum_{b,t} g[b,t,d]
// The backward recomputes p from x rather than storing it: K multiply-adds per element are cheaper than
// a [batch*len, dim] buffer.
// x is a strided view: row (b*len + t) starts at x + (b*len + t) * x_row_stride, because it is the first
// half of each in_proj output row. Instantiated for float (training) and double (gradient checks).
#pragma once
#include <cstdint>

namespace ssmtune::cpu {

// weight: [dim, K] (the conv1d weight [dim, 1, K] without its unit axis); bias: [dim] or nullptr;
// u: [batch*len, dim], contiguous, written.
template <typename T>
void causal_conv1d_silu_forward(const T* x, int64_t x_row_stride, const T* weight, const T* bias, T* u,
                                int64_t batch, int64_t len, int64_t dim, int64_t kernel);

// dx: written, row stride dx_row_stride; only its first dim values of each row are touched, so dx may be
// the x half of the in_proj output gradient. dweight ([dim, K]) and dbias ([dim]) are nullable and
// accumulated (+=), each channel summed by one thread in (b, t) order. dx must not alias x.
template <typename T>
void causal_conv1d_silu_backward(const T* x, int64_t x_row_stride, const T* weight, const T* bias, const T* du,
                                 T* dx, int64_t dx_row_stride, T* dweight, T* dbias, int64_t batch, int64_t len,
                                 int64_t dim, int64_t kernel);

}  // namespace ssmtune::cpu
