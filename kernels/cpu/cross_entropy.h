// The LM head fused with token cross-entropy. For each row t of h ([rows, dim]), with W the tied
// embedding ([vocab, dim]):
//   logits_t = W h_t,   loss_t = logsumexp(logits_t) - logits_t[target_t]
//   dh_t     = grad_scale * weight_t * W^T (softmax(logits_t) - onehot(target_t))
// Rows are taken slice_rows at a time so only [slice_rows, vocab] logits exist at once (the full
// [rows, vocab] tensor would be the largest activation of the step). logsumexp subtracts the row maximum
// before exponentiating. Instantiated for float (training) and double (gradient checks).
#pragma once
#include <cstdint>

namespace ssmtune::cpu {

// Returns sum_t weight_t * loss_t, summed in double in row order (independent of thread count).
// weights: [rows]; weight_t = 0 excludes a token: its row is skipped (target not read, h row ignored even
// if NaN) and its dh row is zero.
// Precondition, validated by the caller: every target with a non-zero weight lies in [0, vocab).
// dh: [rows, dim], written (not accumulated), or nullptr for the loss alone.
// logits_workspace: [slice_rows, vocab], overwritten; slice_rows >= 1.
template <typename T>
double cross_entropy_forward_backward(const T* h, const T* W, int64_t rows, int64_t dim, int64_t vocab,
                                      const int32_t* targets, const T* weights, T grad_scale, T* dh,
                                      T* logits_workspace, int64_t slice_rows);

}  // namespace ssmtune::cpu
