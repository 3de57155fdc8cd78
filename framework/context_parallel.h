// Context parallelism: every sequence of a micro-batch is split along its length over the ranks of a
// context group, rank c holding positions [c * len, (c + 1) * len) (len = data.seq_len / parallel.context).
// Each rank runs the whole layer stack on its slice; inside each layer two things cross slice boundaries,
// in the forward and, mirrored, in the backward:
//  - the causal conv reads the previous slice's last K-1 inputs (its history) and returns their gradient;
//  - the selective scan's state. The state is linear in the state a slice starts from
//    (kernels/cpu/selective_scan.h), so every slice scans from a zero state for its final state and the
//    decay that carries an incoming state through it, and the state entering slice c is the fold over the
//    slices before it, h = final_r + decay_r * h (r = 0 .. c-1, from h = 0). The backward folds the
//    gradients w.r.t. the slices' first states from the last slice down the same way.
// Every exchange is an all-gather over the group of small per-slice pieces ([batch, K-1, d_inner] act or
// [batch, d_inner, d_state] master), ordered on the device after the work that produced them; each rank
// then takes its neighbour's piece or folds the ones before (after) it. The results equal the unsplit
// run up to the rounding of the fold. The buffers are planned once, in the constructor.
#pragma once
#include <cstdint>

#include "distributed/communicator.h"
#include "framework/arena.h"
#include "framework/backend.h"

namespace ssmtune {

// Slice `index` (of len positions) of `count` sequences sampled whole at seq_len: tokens [count, seq_len+1]
// -> [count, len+1] (the slice's inputs and the target after its last), target_mask and doc_start [count,
// seq_len] -> [count, len], doc_start made relative to the slice's first position (negative where the
// document began in an earlier slice).
void take_context_slice(int index, int64_t len, int64_t count, int64_t seq_len, const uint32_t* tokens,
                        const uint8_t* target_mask, const int32_t* doc_start, uint32_t* slice_tokens,
                        uint8_t* slice_mask, int32_t* slice_doc_start);

struct ContextSliceShape {
  int64_t batch = 1, len = 1;  // sequences of the micro-batch, and the positions of each in this slice
  int64_t d_inner = 1, d_state = 1, conv_kernel = 4;
};

class ContextExchange {
 public:
  // group: the context group, ordered by position along the sequence (collective over it).
  ContextExchange(Backend& backend, Communicator& group, const ContextSliceShape& shape);

  int index() const { return group_.rank(); }
  int size() const { return group_.size(); }
  bool first() const { return index() == 0; }
  bool last() const { return index() + 1 == size(); }

  // Forward conv. x: the conv input of this slice (act, row stride ldx, [batch * len] rows). history
  // (act [batch, K-1, d_inner]) receives the previous slice's last K-1 inputs of each sequence. Returns
  // history, or null on the first slice (its sequences start there).
  const void* conv_history(const void* x, int64_t ldx, void* history);
  // Backward conv. d_history: this slice's gradient w.r.t. its history (Backend::conv1d_silu_history_grad).
  // Returns the next slice's, the gradient w.r.t. this slice's last K-1 inputs, or null on the last slice.
  const void* conv_tail_gradient(const void* d_history);

  // Forward scan. final_state and decay (master [batch, d_inner, d_state]): this slice's from a zero state
  // (Backend::selective_scan_forward_begin). initial_state receives the state entering this slice; returns
  // it, or null on the first slice.
  const void* scan_initial_state(const void* final_state, const void* decay, void* initial_state);
  // Backward scan. d_initial_state: the gradient w.r.t. this slice's first state when none arrives at its
  // last (Backend::selective_scan_backward_begin); decay as in the forward. Returns the gradient
  // arriving at this slice's last state, or null on the last slice.
  const void* scan_final_state_grad(const void* d_initial_state, const void* decay);

  // Blocks until every exchange issued has completed (before the host blocks on the backend's stream).
  void wait() { group_.wait(); }

 private:
  // All-gathers `bytes` per rank of buffer (rank r's piece at r * bytes) and orders later compute after it.
  void gather(void* buffer, size_t bytes);
  // state (master) = sum over the folded slices, in order, of h = first + second * h, from h = 0; each
  // slice's pair lies at pairs + slice * 2 * state_bytes (first) and + state_bytes (second).
  void fold(void* state, int begin, int end, int step);

  Backend& backend_;
  Communicator& group_;
  ContextSliceShape shape_;
  size_t act_ = 0, master_ = 0;
  size_t history_bytes_ = 0, state_bytes_ = 0;  // one slice's piece of each kind
  Arena arena_;
  void* history_gather_ = nullptr;  // act [size, batch, K-1, d_inner]
  void* state_gather_ = nullptr;    // master [size, 2, batch, d_inner, d_state]: (final or d_initial, decay)
  void* carried_ = nullptr;         // master [batch, d_inner, d_state]: the backward's folded gradient
};

}  // namespace ssmtune
