// The one interface through which the framework runs ops, filled by the CPU backend (framework/
// cpu_backend.cpp, the reference) and the CUDA backend. Buffers are untyped device pointers with a
// role that fixes their element type for the backend:
//   act    - activations and frozen 16-bit weights: fp32 on the CPU (fp64 in gradient checks), bf16 on CUDA
//   master - residual stream, adapters, their gradients and optimizer state, small frozen vectors:
//            fp32 (fp64 in gradient checks)
// Every op documents which role each argument has; shapes are explicit. No op allocates: scratch comes
// from the caller's memory plan.
#pragma once
#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "framework/dtype.h"
#include "framework/error.h"

namespace ssmtune {

// A frozen linear weight [out, in] in bitsandbytes NF4 with double-quantized absmax (REFERENCE.md §3).
struct Nf4Weight {
  int64_t out_features = 0, in_features = 0;
  const uint8_t* packed = nullptr;        // device, numel/2 bytes, even element in the high nibble
  const uint8_t* absmax_codes = nullptr;  // device, one per 64-block
  const float* nested_absmax = nullptr;   // device, one per 256 absmax
  float nested_offset = 0;
};

// The trainable low-rank path of one linear layer: y += scale * B(A(dropout(x))).
struct LoraPath {
  int64_t rank = 0;
  double scale = 0;
  double dropout = 0;
  uint64_t dropout_seed = 0;    // the mask is a pure function of (seed, stream, element)
  uint64_t dropout_stream = 0;  // distinct per (step, micro-batch, layer, projection)
  const void* A = nullptr;      // master [rank, in]
  const void* B = nullptr;      // master [out, rank]
  // A and B in act precision, which the GEMMs of a backend whose act dtype is not master's read:
  // LoraAdapters::refresh_act_params's copies (the masters themselves where the dtypes agree).
  const void* A_act = nullptr;
  const void* B_act = nullptr;
  void* dA = nullptr;           // master, accumulated
  void* dB = nullptr;           // master, accumulated
};

struct LinearOp {
  const Nf4Weight* base = nullptr;
  const LoraPath* lora = nullptr;  // null when the projection has no adapter
  // The LoRA path's h = A(dropout(x)) lives in x's own rows, in columns [in, in + rank) (ldx >= in +
  // rank), instead of in lora_h: then [x | h] is one [rows, in + rank] matrix and a backend may add the
  // up-projection inside the base GEMM, y = [x | h] · [W | scale·B]ᵀ, rather than in a second pass over y.
  bool h_in_x_columns = false;
};

// Columns an activation buffer reserves after its `in` values for h_in_x_columns: the rank, rounded up to
// a multiple of 8 so that bf16 rows stay 16-byte aligned for the tensor cores (0 without an adapter).
inline int64_t lora_h_columns(int64_t rank) { return (rank + 7) / 8 * 8; }

// Where op's h is, for an input x of row stride ldx and elements of act_bytes: x's columns [in, in +
// rank) with row stride ldx, or the dense lora_h [rows, rank].
struct LoraHView {
  void* data;
  int64_t ld;
};
inline LoraHView lora_h_view(const LinearOp& op, const void* x, int64_t ldx, const void* lora_h, size_t act_bytes) {
  if (op.h_in_x_columns)
    return {const_cast<std::byte*>(static_cast<const std::byte*>(x)) + op.base->in_features * act_bytes, ldx};
  return {const_cast<void*>(lora_h), op.lora->rank};
}

struct ScanShape {
  int64_t batch = 0, len = 0, dim = 0, state = 0, chunk_len = 0;
  int64_t num_chunks() const { return (len + chunk_len - 1) / chunk_len; }
};

// Memory of a backend's device as its driver reports it: in use by every process (the CUDA context
// included) and the device's size. Zeros where the backend has no device of its own (the CPU).
struct DeviceMemory {
  size_t used = 0, total = 0;
};

// What memory plans need to know of a backend, known without touching a device: element sizes and the
// scratch of the ops (ssmtune info sizes a GPU's plans on a machine without one).
class BackendSizes {
 public:
  virtual ~BackendSizes() = default;
  virtual std::string name() const = 0;
  virtual DType act_dtype() const = 0;
  virtual DType master_dtype() const = 0;

  // Scratch that linear_forward/linear_backward need for any of these [out, in] weights applied to
  // `rows` rows with adapters of up to max_rank; dropout: whether any LoraPath will have dropout > 0
  // (the CUDA backend then needs room for the dropped-out input, 4 bytes per element).
  virtual size_t linear_workspace_bytes(std::span<const std::array<int64_t, 2>> weight_shapes, int64_t rows,
                                        int64_t max_rank, bool dropout) const = 0;
  virtual size_t scan_workspace_bytes(const ScanShape& shape) const = 0;
  virtual size_t cross_entropy_workspace_bytes(int64_t rows, int64_t slice_rows, int64_t vocab) const = 0;
};

class Backend : public BackendSizes {
 public:
  // Memory. allocate is called only while building memory plans, never inside a step.
  virtual void* allocate(size_t bytes) = 0;
  virtual void release(void* ptr) = 0;
  virtual void copy_from_host(void* dst, const void* src, size_t bytes) = 0;
  virtual void copy_to_host(void* dst, const void* src, size_t bytes) = 0;
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;
  virtual void fill_zero(void* dst, size_t bytes) = 0;
  // act (n elements) = master (n elements) rounded to the act dtype.
  virtual void master_to_act(const void* master, void* act, int64_t n) = 0;
  // rows of row_bytes each, from src (row pitch src_pitch bytes) to dst (pitch dst_pitch), both device.
  virtual void copy_rows(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t row_bytes,
                         int64_t rows) = 0;
  virtual void synchronize() = 0;
  // The stream every op runs on (a cudaStream_t), for communicators that must order their work against
  // it; null on the CPU, where ops complete before they return.
  virtual void* stream() const { return nullptr; }

  // Bytes currently allocated through allocate() (the memory plans: weights, adapters, activations).
  virtual size_t allocated_bytes() const = 0;
  // The most bytes allocate() may hold at once (recipe key memory.budget_mb; 0: as many as the device
  // has): an allocation past it fails while the plans are built, and the Arena names the plan.
  void set_memory_budget(size_t bytes) { memory_budget_ = bytes; }
  // The most allocated_bytes() has been, loading's temporary buffers included.
  size_t peak_allocated_bytes() const { return peak_allocated_; }
  // The device's memory in use and its size, for progress output; zeros on the CPU.
  virtual DeviceMemory device_memory() const { return {}; }

  // NF4-quantizes a host fp32 weight of numel elements (REFERENCE.md §3) into device buffers of
  // cpu::nf4_sizes(numel); the second-level offset comes back to the host. Used while loading.
  virtual void nf4_quantize(const float* host_weight, int64_t numel, uint8_t* packed, uint8_t* absmax_codes,
                            float* nested_absmax, float* nested_offset) = 0;

  // out[r] (master) = table[tokens[r]] (act)
  virtual void embedding_forward(const int32_t* tokens, int64_t rows, const void* table, int64_t dim,
                                 void* out) = 0;
  // The residual add fused with the next norm. Without add: y (act, row stride ldy) = rmsnorm(x (master))
  // * weight (master, may be null). With add (act): x_out (master) = x + add, then y = rmsnorm(x_out) *
  // weight. rstd (master) [rows] is saved for the backward.
  virtual void rmsnorm_forward(const void* x, const void* add, void* x_out, const void* weight, void* y, int64_t ldy,
                               void* rstd, int64_t rows, int64_t dim, double eps) = 0;
  // dx (master) += d rmsnorm / dx · dy (act); then dx_act (act, may be null) = dx, the gradient that
  // flows into the previous layer's mixer output through the residual add.
  virtual void rmsnorm_backward(const void* x, const void* weight, const void* rstd, const void* dy,
                                void* dx, void* dx_act, int64_t rows, int64_t dim) = 0;
  // falcon-mamba's weightless RMSNorm of dt_r, B and C inside the mixer: per row of `dim` values of a
  // strided view, y = x * rstd with rstd = 1/sqrt(mean(x^2) + eps), in fp32 or wider (HF's rms_forward).
  // x (act, row stride ldx), y (act, row stride ldy; not overlapping x), rstd (master) [rows], saved.
  virtual void weightless_rmsnorm_forward(const void* x, int64_t ldx, void* y, int64_t ldy, void* rstd, int64_t rows,
                                          int64_t dim, double eps) = 0;
  // dx (act, row stride lddx, written; overlapping neither x nor dy) = d norm/dx · dy (act, row stride
  // lddy), from the forward's x and rstd.
  virtual void weightless_rmsnorm_backward(const void* x, int64_t ldx, const void* rstd, const void* dy, int64_t lddy,
                                           void* dx, int64_t lddx, int64_t rows, int64_t dim) = 0;

  // y[rows, out] (act, row stride ldy) = x[rows, in] (act, row stride ldx) · Wᵀ + LoRA path.
  // lora_h (act) [rows, rank] keeps A(dropout(x)) for the backward; unused with op.h_in_x_columns, where h
  // is written into (forward) and read from (backward) x's columns [in, in + rank).
  virtual void linear_forward(const LinearOp& op, const void* x, int64_t ldx, int64_t rows, void* y,
                              int64_t ldy, void* lora_h, void* workspace) = 0;
  // h = A(dropout(x)) of op's LoRA path alone (op.lora is set), written where linear_forward writes it
  // (x's columns with op.h_in_x_columns, else lora_h), bit for bit as linear_forward writes it: for the
  // backward's recomputation of a projection whose output y it does not need.
  virtual void lora_down_projection(const LinearOp& op, const void* x, int64_t ldx, int64_t rows, void* lora_h,
                                    void* workspace) = 0;
  // dx (act, stride lddx) = dy · W + LoRA path (or += when accumulate_dx); adapter grads accumulated.
  virtual void linear_backward(const LinearOp& op, const void* x, int64_t ldx, int64_t rows, const void* dy,
                               int64_t ldy, const void* lora_h, void* dx, int64_t lddx, bool accumulate_dx,
                               void* workspace) = 0;

  // u (act) [batch*len, dim] = silu(causal depthwise conv(x) + bias); weights master [dim, kernel]
  // (kernels/cpu/causal_conv1d.h). doc_start (device int32 [batch*len], nullable): per token, the position
  // of its document's first token within the row (negative: it began in an earlier slice); taps before it
  // read zero. history (act [batch, kernel-1, dim], nullable = zeros): the previous slice's last kernel-1
  // inputs of each row.
  virtual void conv1d_silu_forward(const void* x, int64_t ldx, const void* weight, const void* bias, void* u,
                                   int64_t batch, int64_t len, int64_t dim, int64_t kernel,
                                   const int32_t* doc_start, const void* history) = 0;
  // dx (act, stride lddx) written; d_tail (act [batch, kernel-1, dim], nullable): the next slice's
  // gradient w.r.t. this slice's last kernel-1 inputs, added into those rows of dx (needs len >= kernel-1).
  virtual void conv1d_silu_backward(const void* x, int64_t ldx, const void* weight, const void* bias,
                                    const void* du, void* dx, int64_t lddx, int64_t batch, int64_t len,
                                    int64_t dim, int64_t kernel, const int32_t* doc_start, const void* history,
                                    const void* d_tail) = 0;
  // d_history (act [batch, kernel-1, dim], written): the gradient w.r.t. history, which the previous slice
  // receives as its d_tail.
  virtual void conv1d_silu_history_grad(const void* x, int64_t ldx, const void* weight, const void* bias,
                                        const void* du, int64_t batch, int64_t len, int64_t dim, int64_t kernel,
                                        const int32_t* doc_start, const void* history, void* d_history) = 0;

  // Selective scan with softplus(delta + delta_bias), D skip and SiLU(z) gate (kernels/cpu/selective_scan.h).
  // u, delta, B, C, z, dout: act; out: act with row stride out_stride (>= dim; its other columns untouched);
  // delta_bias, A, Dskip: master; chunk_states: master [batch, chunks, dim, state], including
  // initial_state's effect. workspace: scan_workspace_bytes(s), scratch for every scan op (one at a time).
  // doc_start (device int32 [batch*len], nullable): as for the conv; the state restarts from zero at each
  // token with doc_start[t] == t. initial_state (master [batch, dim, state], nullable = 0): h_{-1}.
  // d_final_state (master [batch, dim, state], nullable = 0): the gradient arriving at h_{len-1} from the
  // next slice; d_initial_state (master [batch, dim, state], nullable): written with the gradient w.r.t. h_{-1}.
  virtual void selective_scan_forward(const ScanShape& s, const void* u, const void* delta,
                                      const void* delta_bias, const void* A, const void* B, const void* C,
                                      int64_t bc_stride, const void* Dskip, const void* z, int64_t z_stride,
                                      void* out, int64_t out_stride, void* chunk_states, void* workspace,
                                      const int32_t* doc_start, const void* initial_state) = 0;
  virtual void selective_scan_backward(const ScanShape& s, const void* u, const void* delta,
                                       const void* delta_bias, const void* A, const void* B, const void* C,
                                       int64_t bc_stride, const void* Dskip, const void* z, int64_t z_stride,
                                       const void* chunk_states, const void* dout, void* du, void* ddelta,
                                       void* dB, void* dC, void* dz, void* workspace, const int32_t* doc_start,
                                       const void* initial_state, const void* d_final_state,
                                       void* d_initial_state) = 0;
  // The same two ops in halves, for context parallelism (framework/context_parallel.h): h is linear in
  // h_{-1}, so each slice runs the first half, the slices exchange what it wrote, and each runs the second
  // half with what arrives. The halves take the one-call op's arguments; chunk_states and workspace must be
  // left as they are between them. begin then end equals the one-call op up to rounding.
  // forward_begin: from a zero initial state, final_state = h_{len-1} and decay = d h_{len-1} / d h_{-1}
  // (0 where a document starts in the row), both master [batch, dim, state], written: with initial state
  // h0, h_{len-1} = final_state + decay * h0. forward_end: out and chunk_states from initial_state.
  virtual void selective_scan_forward_begin(const ScanShape& s, const void* u, const void* delta,
                                            const void* delta_bias, const void* A, const void* B, int64_t bc_stride,
                                            void* chunk_states, void* workspace, const int32_t* doc_start,
                                            void* final_state, void* decay) = 0;
  virtual void selective_scan_forward_end(const ScanShape& s, const void* u, const void* delta,
                                          const void* delta_bias, const void* A, const void* B, const void* C,
                                          int64_t bc_stride, const void* Dskip, const void* z, int64_t z_stride,
                                          void* out, int64_t out_stride, void* chunk_states, void* workspace,
                                          const int32_t* doc_start, const void* initial_state) = 0;
  // backward_begin: d_initial_state (master [batch, dim, state], written) = the gradient w.r.t. h_{-1} with
  // d_final_state = 0; with d_final_state g it is this + decay * g. backward_end: du, ddelta, dB, dC, dz
  // with d_final_state arriving at h_{len-1}.
  virtual void selective_scan_backward_begin(const ScanShape& s, const void* u, const void* delta,
                                             const void* delta_bias, const void* A, const void* B, const void* C,
                                             int64_t bc_stride, const void* z, int64_t z_stride,
                                             const void* chunk_states, const void* dout, void* workspace,
                                             const int32_t* doc_start, const void* initial_state,
                                             void* d_initial_state) = 0;
  virtual void selective_scan_backward_end(const ScanShape& s, const void* u, const void* delta,
                                           const void* delta_bias, const void* A, const void* B, const void* C,
                                           int64_t bc_stride, const void* Dskip, const void* z, int64_t z_stride,
                                           const void* chunk_states, const void* dout, void* du, void* ddelta,
                                           void* dB, void* dC, void* dz, void* workspace, const int32_t* doc_start,
                                           const void* initial_state, const void* d_final_state) = 0;
  // One step of the fold above across context-parallel slices (framework/context_parallel.h):
  // state = first + second * state, elementwise over n master values.
  virtual void scan_state_carry(void* state, const void* first, const void* second, int64_t n) = 0;

  // One token of recurrent decoding (framework/generation.h) for `rows` independent sequences: the conv
  // and the scan above advanced from a carried state (kernels/cpu/recurrent_step.h has the math), equal to
  // the full-sequence ops fed the same tokens. x (act, row stride ldx), u (act) [rows, dim]; weight, bias
  // master as above; conv_window (master [rows, dim, kernel-1], zeros at the start) is updated in place.
  virtual void conv1d_silu_step(const void* x, int64_t ldx, const void* weight, const void* bias,
                                void* conv_window, void* u, int64_t rows, int64_t dim, int64_t kernel) = 0;
  // u, delta, B, C (row stride bc_stride), z (row stride z_stride), out: act, one row per sequence;
  // delta_bias, A, Dskip: master; ssm_state (master [rows, dim, state], zeros at the start) updated in place.
  virtual void selective_scan_step(const void* u, const void* delta, const void* delta_bias, const void* A,
                                   const void* B, const void* C, int64_t bc_stride, const void* Dskip, const void* z,
                                   int64_t z_stride, void* ssm_state, void* out, int64_t rows, int64_t dim,
                                   int64_t state) = 0;
  // logits (master) [rows, vocab] = h (act) [rows, dim] · table (act) [vocab, dim]ᵀ: the full rows of the
  // LM head that decoding samples from (training never materialises them; cross_entropy works in slices).
  virtual void lm_head_logits(const void* h, const void* table, int64_t rows, int64_t dim, int64_t vocab,
                              void* logits) = 0;

  // LM head (table act [vocab, dim]) + cross-entropy, slice by slice. weights (act) [rows]: 0 excludes a
  // token. dh (act) = grad_scale * weight * dloss/dh, or null for the loss alone. Returns sum weight*loss.
  virtual double cross_entropy(const void* h, const void* table, int64_t rows, int64_t dim, int64_t vocab,
                               const int32_t* targets, const void* weights, double grad_scale, void* dh,
                               void* logits_workspace, int64_t slice_rows) = 0;

  // Optimizer over one contiguous master buffer of n elements.
  virtual double sum_of_squares(const void* x, int64_t n) = 0;
  virtual void scale(void* x, int64_t n, double factor) = 0;
  // AdamW with decoupled weight decay; bias corrections are passed in (1 - beta^t).
  virtual void adamw_update(void* params, const void* grads, void* m, void* v, int64_t n, double lr,
                            double beta1, double beta2, double eps, double weight_decay, double bias_correction1,
                            double bias_correction2) = 0;

 protected:
  // allocate() calls this with the bytes it is about to allocate: checks them against the budget and
  // counts the peak.
  void count_allocation(size_t bytes) {
    const size_t after = allocated_bytes() + bytes;
    if (memory_budget_ > 0 && after > memory_budget_)
      fail("{:.3f} MiB more would exceed the memory budget of {:.3f} MiB (memory.budget_mb) with {:.3f} MiB already "
           "allocated; on several ranks distributed.shard_base_weights=true keeps 1/N of the NF4 base on each, and a "
           "smaller train.batch_size or data.seq_len shrinks the activations",
           bytes / 1048576.0, memory_budget_ / 1048576.0, allocated_bytes() / 1048576.0);
    peak_allocated_ = std::max(peak_allocated_, after);
  }

 private:
  size_t memory_budget_ = 0;
  size_t peak_allocated_ = 0;
};

}  // namespace ssmtune
