#include "framework/cpu_backend.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <unordered_map>

#include "framework/error.h"
#include "kernels/cpu/adamw.h"
#include "kernels/cpu/causal_conv1d.h"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/lora.h"
#include "kernels/cpu/nf4.h"
#include "kernels/cpu/recurrent_step.h"
#include "kernels/cpu/rmsnorm.h"
#include "kernels/cpu/selective_scan.h"

namespace ssmtune {
namespace {

template <typename T>
class CpuBackend final : public Backend {
 public:
  static constexpr DType kDType = sizeof(T) == 8 ? DType::F64 : DType::F32;

  std::string name() const override { return "cpu"; }
  DType act_dtype() const override { return kDType; }
  DType master_dtype() const override { return kDType; }

  void* allocate(size_t bytes) override {
    const size_t rounded = (bytes + 63) / 64 * 64;
    count_allocation(rounded);
    void* ptr = std::aligned_alloc(64, rounded);
    if (!ptr && bytes) fail("cpu backend: out of host memory allocating {} bytes", bytes);
    sizes_[ptr] = rounded;
    allocated_ += rounded;
    return ptr;
  }
  void release(void* ptr) override {
    if (!ptr) return;
    auto it = sizes_.find(ptr);
    allocated_ -= it->second;
    sizes_.erase(it);
    std::free(ptr);
  }
  void copy_from_host(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void copy_to_host(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void copy(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void fill_zero(void* dst, size_t bytes) override { std::memset(dst, 0, bytes); }
  // act and master are both T here.
  void master_to_act(const void* master, void* act, int64_t n) override {
    std::memcpy(act, master, static_cast<size_t>(n) * sizeof(T));
  }
  void copy_rows(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t row_bytes,
                 int64_t rows) override {
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(static_cast<std::byte*>(dst) + r * dst_pitch, static_cast<const std::byte*>(src) + r * src_pitch,
                  row_bytes);
  }
  void synchronize() override {}

  size_t allocated_bytes() const override { return allocated_; }

  // The dequantized weight, then dh of the LoRA backward; cpu::lora applies dropout on the fly.
  size_t linear_workspace_bytes(std::span<const std::array<int64_t, 2>> weight_shapes, int64_t rows,
                                int64_t max_rank, bool /*dropout*/) const override {
    int64_t max_weight = 0;
    for (const auto& [out, in] : weight_shapes) max_weight = std::max(max_weight, out * in);
    return static_cast<size_t>(max_weight + rows * max_rank) * sizeof(T);
  }
  size_t scan_workspace_bytes(const ScanShape& s) const override {
    return static_cast<size_t>(cpu::selective_scan_backward_workspace_size(cpu_shape(s))) * sizeof(T);
  }
  size_t cross_entropy_workspace_bytes(int64_t, int64_t slice_rows, int64_t vocab) const override {
    return static_cast<size_t>(slice_rows * vocab) * sizeof(T);
  }

  void nf4_quantize(const float* host_weight, int64_t numel, uint8_t* packed, uint8_t* absmax_codes,
                    float* nested_absmax, float* nested_offset) override {
    cpu::nf4_quantize(host_weight, numel, packed, absmax_codes, nested_absmax, nested_offset);
  }

  void embedding_forward(const int32_t* tokens, int64_t rows, const void* table, int64_t dim,
                         void* out) override {
    const T* tab = cast(table);
    T* o = cast(out);
    for (int64_t r = 0; r < rows; ++r) std::memcpy(o + r * dim, tab + int64_t(tokens[r]) * dim, dim * sizeof(T));
  }
  void rmsnorm_forward(const void* x, const void* add, void* x_out, const void* weight, void* y, int64_t ldy,
                       void* rstd, int64_t rows, int64_t dim, double eps) override {
    const T* normed_input = cast(x);
    if (add) {
      const T* a = cast(add);
      T* out = cast(x_out);
      for (int64_t i = 0; i < rows * dim; ++i) out[i] = normed_input[i] + a[i];
      normed_input = out;
    }
    cpu::rmsnorm_forward<T>(normed_input, dim, cast(weight), cast(y), ldy, cast(rstd), rows, dim, static_cast<T>(eps));
  }
  void rmsnorm_backward(const void* x, const void* weight, const void* rstd, const void* dy, void* dx, void* dx_act,
                        int64_t rows, int64_t dim) override {
    cpu::rmsnorm_backward<T>(cast(x), cast(weight), cast(rstd), cast(dy), cast(dx), nullptr, rows, dim);
    if (dx_act) std::memcpy(dx_act, dx, static_cast<size_t>(rows * dim) * sizeof(T));
  }
  void weightless_rmsnorm_forward(const void* x, int64_t ldx, void* y, int64_t ldy, void* rstd, int64_t rows,
                                  int64_t dim, double eps) override {
    cpu::rmsnorm_forward<T>(cast(x), ldx, nullptr, cast(y), ldy, cast(rstd), rows, dim, static_cast<T>(eps));
  }
  void weightless_rmsnorm_backward(const void* x, int64_t ldx, const void* rstd, const void* dy, int64_t lddy,
                                   void* dx, int64_t lddx, int64_t rows, int64_t dim) override {
    cpu::rmsnorm_backward<T>(cast(x), ldx, nullptr, cast(rstd), cast(dy), lddy, cast(dx), lddx, false, nullptr, rows,
                             dim);
  }

  void linear_forward(const LinearOp& op, const void* x, int64_t ldx, int64_t rows, void* y, int64_t ldy,
                      void* lora_h, void* workspace) override {
    const Nf4Weight& w = *op.base;
    T* weight = cast(workspace);
    dequantize(w, weight);
    cpu::gemm<T>(false, true, rows, w.out_features, w.in_features, T(1), cast(x), ldx, weight, w.in_features,
                 T(0), cast(y), ldy);
    if (op.lora) {
      const LoraHView h = lora_h_view(op, x, ldx, lora_h, sizeof(T));
      cpu::lora_forward<T>(lora_dims(op, rows), cast(x), ldx, cast(op.lora->A), cast(op.lora->B),
                           static_cast<T>(op.lora->scale), dropout(*op.lora), cast(h.data), h.ld, cast(y), ldy);
    }
  }
  void lora_down_projection(const LinearOp& op, const void* x, int64_t ldx, int64_t rows, void* lora_h,
                            void*) override {
    const LoraHView h = lora_h_view(op, x, ldx, lora_h, sizeof(T));
    cpu::lora_down_projection<T>(lora_dims(op, rows), cast(x), ldx, cast(op.lora->A), dropout(*op.lora), cast(h.data),
                                 h.ld);
  }
  void linear_backward(const LinearOp& op, const void* x, int64_t ldx, int64_t rows, const void* dy,
                       int64_t ldy, const void* lora_h, void* dx, int64_t lddx, bool accumulate_dx,
                       void* workspace) override {
    const Nf4Weight& w = *op.base;
    T* weight = cast(workspace);
    dequantize(w, weight);
    cpu::gemm<T>(false, false, rows, w.in_features, w.out_features, T(1), cast(dy), ldy, weight,
                 w.in_features, accumulate_dx ? T(1) : T(0), cast(dx), lddx);
    if (op.lora) {
      T* dh = weight + w.out_features * w.in_features;
      const LoraHView h = lora_h_view(op, x, ldx, lora_h, sizeof(T));
      cpu::lora_backward<T>(lora_dims(op, rows), cast(x), ldx, cast(op.lora->A), cast(op.lora->B),
                            static_cast<T>(op.lora->scale), dropout(*op.lora), cast(h.data), h.ld, cast(dy), ldy,
                            cast(op.lora->dA), cast(op.lora->dB), cast(dx), lddx, dh);
    }
  }

  void conv1d_silu_forward(const void* x, int64_t ldx, const void* weight, const void* bias, void* u,
                           int64_t batch, int64_t len, int64_t dim, int64_t kernel, const int32_t* doc_start,
                           const void* history) override {
    cpu::causal_conv1d_silu_forward<T>(cast(x), ldx, cast(weight), cast(bias), cast(u), batch, len, dim, kernel,
                                       doc_start, cast(history));
  }
  void conv1d_silu_backward(const void* x, int64_t ldx, const void* weight, const void* bias, const void* du,
                            void* dx, int64_t lddx, int64_t batch, int64_t len, int64_t dim, int64_t kernel,
                            const int32_t* doc_start, const void* history, const void* d_tail) override {
    if (d_tail && len < kernel - 1)
      fail("conv1d_silu_backward: d_tail needs a slice of at least kernel-1 = {} tokens, got {}", kernel - 1, len);
    cpu::causal_conv1d_silu_backward<T>(cast(x), ldx, cast(weight), cast(bias), cast(du), cast(dx), lddx,
                                        nullptr, nullptr, batch, len, dim, kernel, doc_start, cast(history),
                                        cast(d_tail));
  }
  void conv1d_silu_history_grad(const void* x, int64_t ldx, const void* weight, const void* bias, const void* du,
                                int64_t batch, int64_t len, int64_t dim, int64_t kernel, const int32_t* doc_start,
                                const void* history, void* d_history) override {
    cpu::causal_conv1d_silu_history_grad<T>(cast(x), ldx, cast(weight), cast(bias), cast(du), batch, len, dim,
                                            kernel, doc_start, cast(history), cast(d_history));
  }

  void selective_scan_forward(const ScanShape& s, const void* u, const void* delta, const void* delta_bias,
                              const void* A, const void* B, const void* C, int64_t bc_stride, const void* Dskip,
                              const void* z, int64_t z_stride, void* out, int64_t out_stride, void* chunk_states,
                              void* /*workspace: the CPU forward needs none*/, const int32_t* doc_start,
                              const void* initial_state) override {
    cpu::selective_scan_forward<T>(cpu_shape(s), cast(u), cast(delta), cast(delta_bias), cast(A), cast(B),
                                   cast(C), bc_stride, cast(Dskip), cast(z), z_stride, cast(out), out_stride,
                                   cast(chunk_states), doc_start, cast(initial_state));
  }
  void selective_scan_backward(const ScanShape& s, const void* u, const void* delta, const void* delta_bias,
                               const void* A, const void* B, const void* C, int64_t bc_stride,
                               const void* Dskip, const void* z, int64_t z_stride, const void* chunk_states,
                               const void* dout, void* du, void* ddelta, void* dB, void* dC, void* dz,
                               void* workspace, const int32_t* doc_start, const void* initial_state,
                               const void* d_final_state, void* d_initial_state) override {
    cpu::selective_scan_backward<T>(cpu_shape(s), cast(u), cast(delta), cast(delta_bias), cast(A), cast(B),
                                    cast(C), bc_stride, cast(Dskip), cast(z), z_stride, cast(chunk_states),
                                    cast(dout), cast(du), cast(ddelta), cast(dB), cast(dC), cast(dz), nullptr,
                                    nullptr, nullptr, cast(workspace), doc_start, cast(initial_state),
                                    cast(d_final_state), cast(d_initial_state));
  }
  // The halves here are the reference's own functions: begin the zero-start final state (or the gradient
  // w.r.t. h_{-1}), end the whole op from what arrived. Nothing passes between them.
  void selective_scan_forward_begin(const ScanShape& s, const void* u, const void* delta, const void* delta_bias,
                                    const void* A, const void* B, int64_t bc_stride, void* /*chunk_states*/,
                                    void* /*workspace*/, const int32_t* doc_start, void* final_state,
                                    void* decay) override {
    cpu::selective_scan_final_state<T>(cpu_shape(s), cast(u), cast(delta), cast(delta_bias), cast(A), cast(B),
                                       bc_stride, doc_start, cast(final_state), cast(decay));
  }
  void selective_scan_forward_end(const ScanShape& s, const void* u, const void* delta, const void* delta_bias,
                                  const void* A, const void* B, const void* C, int64_t bc_stride, const void* Dskip,
                                  const void* z, int64_t z_stride, void* out, int64_t out_stride, void* chunk_states,
                                  void* workspace, const int32_t* doc_start, const void* initial_state) override {
    selective_scan_forward(s, u, delta, delta_bias, A, B, C, bc_stride, Dskip, z, z_stride, out, out_stride,
                           chunk_states, workspace, doc_start, initial_state);
  }
  void selective_scan_backward_begin(const ScanShape& s, const void* /*u*/, const void* delta, const void* delta_bias,
                                     const void* A, const void* /*B*/, const void* C, int64_t bc_stride,
                                     const void* z, int64_t z_stride, const void* /*chunk_states*/, const void* dout,
                                     void* /*workspace*/, const int32_t* doc_start, const void* /*initial_state*/,
                                     void* d_initial_state) override {
    cpu::selective_scan_initial_state_grad<T>(cpu_shape(s), cast(delta), cast(delta_bias), cast(A), cast(C),
                                              bc_stride, cast(z), z_stride, cast(dout), doc_start,
                                              cast(d_initial_state));
  }
  void selective_scan_backward_end(const ScanShape& s, const void* u, const void* delta, const void* delta_bias,
                                   const void* A, const void* B, const void* C, int64_t bc_stride, const void* Dskip,
                                   const void* z, int64_t z_stride, const void* chunk_states, const void* dout,
                                   void* du, void* ddelta, void* dB, void* dC, void* dz, void* workspace,
                                   const int32_t* doc_start, const void* initial_state,
                                   const void* d_final_state) override {
    selective_scan_backward(s, u, delta, delta_bias, A, B, C, bc_stride, Dskip, z, z_stride, chunk_states, dout, du,
                            ddelta, dB, dC, dz, workspace, doc_start, initial_state, d_final_state, nullptr);
  }
  void scan_state_carry(void* state, const void* first, const void* second, int64_t n) override {
    T* h = cast(state);
    const T *a = cast(first), *b = cast(second);
    for (int64_t i = 0; i < n; ++i) h[i] = a[i] + b[i] * h[i];
  }

  void conv1d_silu_step(const void* x, int64_t ldx, const void* weight, const void* bias, void* conv_window, void* u,
                        int64_t rows, int64_t dim, int64_t kernel) override {
    cpu::causal_conv1d_silu_step<T>(cast(x), ldx, cast(weight), cast(bias), cast(conv_window), cast(u), rows, dim,
                                    kernel);
  }
  void selective_scan_step(const void* u, const void* delta, const void* delta_bias, const void* A, const void* B,
                           const void* C, int64_t bc_stride, const void* Dskip, const void* z, int64_t z_stride,
                           void* ssm_state, void* out, int64_t rows, int64_t dim, int64_t state) override {
    cpu::selective_scan_step<T>(cast(u), cast(delta), cast(delta_bias), cast(A), cast(B), cast(C), bc_stride,
                                cast(Dskip), cast(z), z_stride, cast(ssm_state), cast(out), rows, dim, state);
  }
  void lm_head_logits(const void* h, const void* table, int64_t rows, int64_t dim, int64_t vocab,
                      void* logits) override {
    cpu::gemm<T>(false, true, rows, vocab, dim, T(1), cast(h), dim, cast(table), dim, T(0), cast(logits), vocab);
  }

  double cross_entropy(const void* h, const void* table, int64_t rows, int64_t dim, int64_t vocab,
                       const int32_t* targets, const void* weights, double grad_scale, void* dh,
                       void* logits_workspace, int64_t slice_rows) override {
    return cpu::cross_entropy_forward_backward<T>(cast(h), cast(table), rows, dim, vocab, targets, cast(weights),
                                                  static_cast<T>(grad_scale), cast(dh), cast(logits_workspace),
                                                  slice_rows);
  }

  double sum_of_squares(const void* x, int64_t n) override { return cpu::sum_of_squares<T>(cast(x), n); }
  void scale(void* x, int64_t n, double factor) override { cpu::scale<T>(cast(x), n, factor); }
  void adamw_update(void* params, const void* grads, void* m, void* v, int64_t n, double lr, double beta1,
                    double beta2, double eps, double weight_decay, double bc1, double bc2) override {
    cpu::adamw_update<T>(cast(params), cast(grads), cast(m), cast(v), n, lr, beta1, beta2, eps, weight_decay,
                         bc1, bc2);
  }

 private:
  size_t allocated_ = 0;
  std::unordered_map<void*, size_t> sizes_;
  static T* cast(void* p) { return static_cast<T*>(p); }
  static const T* cast(const void* p) { return static_cast<const T*>(p); }
  static cpu::SelectiveScanShape cpu_shape(const ScanShape& s) {
    return {s.batch, s.len, s.dim, s.state, s.chunk_len};
  }
  static cpu::LoraDims lora_dims(const LinearOp& op, int64_t rows) {
    return {rows, op.base->in_features, op.base->out_features, op.lora->rank};
  }
  static cpu::LoraDropout dropout(const LoraPath& lora) {
    return {lora.dropout, lora.dropout_seed, lora.dropout_stream};
  }
  static void dequantize(const Nf4Weight& w, T* out) {
    cpu::nf4_dequantize<T>(w.packed, w.absmax_codes, w.nested_absmax, w.nested_offset,
                           w.out_features * w.in_features, out);
  }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(DType scalar) {
  if (scalar == DType::F32) return std::make_unique<CpuBackend<float>>();
  if (scalar == DType::F64) return std::make_unique<CpuBackend<double>>();
  throw std::invalid_argument("make_cpu_backend: scalar must be F32 or F64");
}

}  // namespace ssmtune
