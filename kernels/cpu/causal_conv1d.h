// Depthwise causal convolution with bias and SiLU (Mamba mixer step 2), token-major layout:
//   p[b,t,d] = bias[d] + sum_{k=0}^{K-1} w[d,k] * in[b, t-(K-1)+k, d]
//   u[b,t,d] = silu(p) = p * sigmoid(p)
// where in[b,s,d] is x[b,s,d] for s >= 0, history[b, s+(K-1), d] for -(K-1) <= s < 0 (zero when history
// is null), and zero for s < doc_start[b,t] (the first position of t's document; see "Document
// boundaries"). Backward, with g = du * silu'(p) and silu'(p) = s * (1 + p * (1 - s)), s = sigmoid(p):
//   dx[b,tau,d] = sum_k w[d,k] * g[b, tau+(K-1)-k, d] over the taps that read tau (terms past the end of
//                 the sequence are 0), + d_tail[b, tau-(len-(K-1)), d] for the last K-1 positions
//   d_history[b,j,d] = the same sum for the position tau = j-(K-1) < 0
//   dw[d,k]     = sum_{b,t} g[b,t,d] * in[b, t-(K-1)+k, d]
//   dbias[d]    = sum_{b,t} g[b,t,d]
// The backward recomputes p from x rather than storing it: K multiply-adds per element are cheaper than
// a [batch*len, dim] buffer.
//
// Document boundaries (packed documents, sequences split across ranks): doc_start (nullable, [batch*len])
// gives for each token the position of its document's first token, doc_start[b*len+t] <= t, negative when
// the document began before this slice (its exact start, or any value <= -(K-1) when it began that far
// back or further). A tap whose position is below doc_start reads zero, so each document is convolved as
// if it were its own sequence. Null doc_start: the whole row is one document that continues from history.
// Splitting a row into slices: slice r gets history = the last K-1 inputs before it, d_tail = the next
// slice's d_history; then u and dx equal those of the unsplit row (d_tail needs len >= K-1).
//
// x is a strided view: row (b*len + t) starts at x + (b*len + t) * x_row_stride, because it is the first
// half of each in_proj output row. history, d_tail, d_history: contiguous [batch, K-1, dim]; the nullable
// ones take a plain nullptr (they do not take part in deducing T).
// Instantiated for float (training) and double (gradient checks).
#pragma once
#include <cstdint>
#include <type_traits>

namespace ssmtune::cpu {

// weight: [dim, K] (the conv1d weight [dim, 1, K] without its unit axis); bias: [dim] or nullptr;
// u: [batch*len, dim], contiguous, written.
template <typename T>
void causal_conv1d_silu_forward(const T* x, int64_t x_row_stride, const T* weight, const T* bias, T* u,
                                int64_t batch, int64_t len, int64_t dim, int64_t kernel, const int32_t* doc_start,
                                const std::type_identity_t<T>* history);

// dx: written, row stride dx_row_stride; only its first dim values of each row are touched, so dx may be
// the x half of the in_proj output gradient. dweight ([dim, K]) and dbias ([dim]) are nullable and
// accumulated (+=), each channel summed by one thread in (b, t) order. dx must not alias x. d_tail
// (nullable) is added into the last K-1 rows of dx after the taps.
template <typename T>
void causal_conv1d_silu_backward(const T* x, int64_t x_row_stride, const T* weight, const T* bias, const T* du,
                                 T* dx, int64_t dx_row_stride, T* dweight, T* dbias, int64_t batch, int64_t len,
                                 int64_t dim, int64_t kernel, const int32_t* doc_start,
                                 const std::type_identity_t<T>* history, const std::type_identity_t<T>* d_tail);

// d_history: written, the gradient w.r.t. history for upstream gradient du (what the previous slice gets
// as its d_tail). Only the first K-1 outputs of each row read history, so this touches only those.
template <typename T>
void causal_conv1d_silu_history_grad(const T* x, int64_t x_row_stride, const T* weight, const T* bias, const T* du,
                                     int64_t batch, int64_t len, int64_t dim, int64_t kernel,
                                     const int32_t* doc_start, const std::type_identity_t<T>* history,
                                     T* d_history);

}  // namespace ssmtune::cpu
