// The one interface through which the framework runs ops, filled by the CPU backend (framework/
// cpu_backend.cpp, the reference) and the CUDA backend. Buffers are untyped device pointers with a
// role that fixes their element type for the backend:
//   act    - activations and frozen 16-bit weights: fp32 on the CPU (fp64 in gradient checks), bf16 on CUDA
//   master - residual stream, adapters, their gradients and optimizer state, small frozen vectors:
//            fp32 (fp64 in gradient checks)
// Every op documents which role each argument has; shapes are explicit. No op allocates: scratch comes
// from the caller's memory plan.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "framework/dtype.h"

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
  void* dA = nullptr;           // master, accumulated
  void* dB = nullptr;           // master, accumulated
};

struct LinearOp {
  const Nf4Weight* base = nullptr;
  const LoraPath* lora = nullptr;  // null when the projection has no adapter
};

struct ScanShape {
  int64_t batch = 0, len = 0, dim = 0, state = 0, chunk_len = 0;
  int64_t num_chunks() const { return (len + chunk_len - 1) / chunk_len; }
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual DType act_dtype() const = 0;
  virtual DType master_dtype() const = 0;

  // Memory. allocate is called only while building memory plans, never inside a step.
  virtual void* allocate(size_t bytes) = 0;
  virtual void release(void* ptr) = 0;
  virtual void copy_from_host(void* dst, const void* src, size_t bytes) = 0;
  virtual void copy_to_host(void* dst, const void* src, size_t bytes) = 0;
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;
  virtual void fill_zero(void* dst, size_t bytes) = 0;
  virtual void synchronize() = 0;
  // The stream every op runs on (a cudaStream_t), for communicators that must order their work against
  // it; null on the CPU, where ops complete before they return.
  virtual void* stream() const { return nullptr; }

  // Bytes currently allocated through allocate() (the memory plans: weights, adapters, activations).
  virtual size_t allocated_bytes() const = 0;

  // Scratch that linear_forward/linear_backward need for any of these [out, in] weights applied to
  // `rows` rows with adapters of up to max_rank.
  virtual size_t linear_workspace_bytes(std::span<const std::array<int64_t, 2>> weight_shapes, int64_t rows,
                                        int64_t max_rank) const = 0;
  virtual size_t scan_workspace_bytes(const ScanShape& shape) const = 0;
  virtual size_t cross_entropy_workspace_bytes(int64_t rows, int64_t slice_rows, int64_t vocab) const = 0;

  // NF4-quantizes a host fp32 weight of numel elements (REFERENCE.md §3) into device buffers of
  // cpu::nf4_sizes(numel); the second-level offset comes back to the host. Used while loading.
  virtual void nf4_quantize(const float* host_weight, int64_t numel, uint8_t* packed, uint8_t* absmax_codes,
                            float* nested_absmax, float* nested_offset) = 0;

  // out[r] (master) = table[tokens[r]] (act)
  virtual void embedding_forward(const int32_t* tokens, int64_t rows, const void* table, int64_t dim,
                                 void* out) = 0;
  // The residual add fused with the next norm. Without add: y (act) = rmsnorm(x (master)) * weight
  // (master, may be null). With add (act): x_out (master) = x + add, then y = rmsnorm(x_out) * weight.
  // rstd (master) [rows] is saved for the backward.
  virtual void rmsnorm_forward(const void* x, const void* add, void* x_out, const void* weight, void* y,
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
  // lora_h (act) [rows, rank] keeps A(dropout(x)) for the backward.
  virtual void linear_forward(const LinearOp& op, const void* x, int64_t ldx, int64_t rows, void* y,
                              int64_t ldy, void* lora_h, void* workspace) = 0;
  // dx (act, stride lddx) = dy · W + LoRA path (or += when accumulate_dx); adapter grads accumulated.
  virtual void linear_backward(const LinearOp& op, const void* x, int64_t ldx, int64_t rows, const void* dy,
                               int64_t ldy, const void* lora_h, void* dx, int64_t lddx, bool accumulate_dx,
                               void* workspace) = 0;

  // u (act) [batch*len, dim] = silu(causal depthwise conv(x) + bias); weights master [dim, kernel].
  virtual void conv1d_silu_forward(const void* x, int64_t ldx, const void* weight, const void* bias, void* u,
                                   int64_t batch, int64_t len, int64_t dim, int64_t kernel) = 0;
  virtual void conv1d_silu_backward(const void* x, int64_t ldx, const void* weight, const void* bias,
                                    const void* du, void* dx, int64_t lddx, int64_t batch, int64_t len,
                                    int64_t dim, int64_t kernel) = 0;

  // Selective scan with softplus(delta + delta_bias), D skip and SiLU(z) gate (kernels/cpu/selective_scan.h).
  // u, delta, B, C, z, out: act; delta_bias, A, Dskip: master; chunk_states: master [batch, chunks, dim, state].
  // workspace: scan_workspace_bytes(s), scratch for both directions (a backend may ignore it in the forward).
  virtual void selective_scan_forward(const ScanShape& s, const void* u, const void* delta,
                                      const void* delta_bias, const void* A, const void* B, const void* C,
                                      int64_t bc_stride, const void* Dskip, const void* z, int64_t z_stride,
                                      void* out, void* chunk_states, void* workspace) = 0;
  virtual void selective_scan_backward(const ScanShape& s, const void* u, const void* delta,
                                       const void* delta_bias, const void* A, const void* B, const void* C,
                                       int64_t bc_stride, const void* Dskip, const void* z, int64_t z_stride,
                                       const void* chunk_states, const void* dout, void* du, void* ddelta,
                                       void* dB, void* dC, void* dz, void* workspace) = 0;

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
};

}  // namespace ssmtune
