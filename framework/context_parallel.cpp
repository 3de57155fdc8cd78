#include "framework/context_parallel.h"

#include <algorithm>
#include <vector>

#include "framework/error.h"

namespace ssmtune {

void take_context_slice(int index, int64_t len, int64_t count, int64_t seq_len, const uint32_t* tokens,
                        const uint8_t* target_mask, const int32_t* doc_start, uint32_t* slice_tokens,
                        uint8_t* slice_mask, int32_t* slice_doc_start) {
  const int64_t first = index * len;
  for (int64_t s = 0; s < count; ++s) {
    std::copy_n(tokens + s * (seq_len + 1) + first, len + 1, slice_tokens + s * (len + 1));
    std::copy_n(target_mask + s * seq_len + first, len, slice_mask + s * len);
    for (int64_t t = 0; t < len; ++t)
      slice_doc_start[s * len + t] = static_cast<int32_t>(doc_start[s * seq_len + first + t] - first);
  }
}

ContextExchange::ContextExchange(Backend& backend, Communicator& group, const ContextSliceShape& shape)
    : backend_(backend),
      group_(group),
      shape_(shape),
      act_(dtype_size(backend.act_dtype())),
      master_(dtype_size(backend.master_dtype())),
      arena_(backend, "context-parallel exchanges") {
  const int64_t K = shape.conv_kernel;
  if (shape.len < K - 1)
    fail("parallel.context={}: each rank's slice of a sequence has {} positions, fewer than the conv's {} "
         "inputs that cross a slice boundary; use a longer data.seq_len or fewer context ranks",
         group.size(), shape.len, K - 1);
  history_bytes_ = static_cast<size_t>(shape.batch * (K - 1) * shape.d_inner) * act_;
  state_bytes_ = static_cast<size_t>(shape.batch * shape.d_inner * shape.d_state) * master_;
  arena_.add(&history_gather_, group.size() * history_bytes_);
  arena_.add(&state_gather_, group.size() * 2 * state_bytes_);
  arena_.add(&carried_, state_bytes_);
  arena_.allocate();
}

void ContextExchange::gather(void* buffer, size_t bytes) {
  const std::vector<size_t> counts(static_cast<size_t>(size()), bytes);
  group_.all_gather(buffer, counts, Element::byte);
  group_.order_compute_after(group_.collectives_issued());
}

const void* ContextExchange::conv_history(const void* x, int64_t ldx, void* history) {
  const int64_t K = shape_.conv_kernel, len = shape_.len, D = shape_.d_inner;
  auto* own = static_cast<std::byte*>(history_gather_) + index() * history_bytes_;
  for (int64_t b = 0; b < shape_.batch; ++b)  // the last K-1 rows of each sequence's slice
    backend_.copy_rows(own + b * (K - 1) * D * act_, D * act_,
                       static_cast<const std::byte*>(x) + ((b + 1) * len - (K - 1)) * ldx * act_, ldx * act_, D * act_,
                       K - 1);
  gather(history_gather_, history_bytes_);
  if (first()) return nullptr;
  backend_.copy(history, static_cast<std::byte*>(history_gather_) + (index() - 1) * history_bytes_, history_bytes_);
  return history;
}

const void* ContextExchange::conv_tail_gradient(const void* d_history) {
  auto* gathered = static_cast<std::byte*>(history_gather_);
  backend_.copy(gathered + index() * history_bytes_, d_history, history_bytes_);
  gather(history_gather_, history_bytes_);
  return last() ? nullptr : gathered + (index() + 1) * history_bytes_;
}

void ContextExchange::fold(void* state, int begin, int end, int step) {
  const auto* pairs = static_cast<const std::byte*>(state_gather_);
  const int64_t n = shape_.batch * shape_.d_inner * shape_.d_state;
  backend_.copy(state, pairs + begin * 2 * state_bytes_, state_bytes_);  // h = first + second * 0
  for (int r = begin + step; r != end; r += step)
    backend_.scan_state_carry(state, pairs + r * 2 * state_bytes_, pairs + r * 2 * state_bytes_ + state_bytes_, n);
}

const void* ContextExchange::scan_initial_state(const void* final_state, const void* decay, void* initial_state) {
  auto* own = static_cast<std::byte*>(state_gather_) + index() * 2 * state_bytes_;
  backend_.copy(own, final_state, state_bytes_);
  backend_.copy(own + state_bytes_, decay, state_bytes_);
  gather(state_gather_, 2 * state_bytes_);
  if (first()) return nullptr;
  fold(initial_state, 0, index(), +1);
  return initial_state;
}

const void* ContextExchange::scan_final_state_grad(const void* d_initial_state, const void* decay) {
  auto* own = static_cast<std::byte*>(state_gather_) + index() * 2 * state_bytes_;
  backend_.copy(own, d_initial_state, state_bytes_);
  backend_.copy(own + state_bytes_, decay, state_bytes_);
  gather(state_gather_, 2 * state_bytes_);
  if (last()) return nullptr;
  fold(carried_, size() - 1, index(), -1);
  return carried_;
}

}  // namespace ssmtune
