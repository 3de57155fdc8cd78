#include "framework/cuda_backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <unordered_map>

#include "framework/error.h"
#include "kernels/cpu/nf4.h"
#include "kernels/cuda/adamw.h"
#include "kernels/cuda/causal_conv1d.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/cross_entropy.h"
#include "kernels/cuda/embedding.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/lora.h"
#include "kernels/cuda/nf4.h"
#include "kernels/cuda/recurrent_step.h"
#include "kernels/cuda/rmsnorm.h"
#include "kernels/cuda/scan_carry.h"
#include "kernels/cuda/selective_scan.h"

namespace ssmtune {
namespace {

constexpr size_t kBf16 = 2;

size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

const uint16_t* bf16(const void* p) { return static_cast<const uint16_t*>(p); }
uint16_t* bf16(void* p) { return static_cast<uint16_t*>(p); }
const float* f32(const void* p) { return static_cast<const float*>(p); }
float* f32(void* p) { return static_cast<float*>(p); }

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {
    SSMTUNE_CUDA_CHECK(cudaSetDevice(device), "cuda backend");
    SSMTUNE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cuda backend");
    gemm_ = std::make_unique<cuda::Gemm>(stream_);
    cuda::nf4_upload_tables();
    // The norm reduction's partial sums: a fixed grid, so a fixed size whatever the buffer.
    norm_workspace_ = allocate(cuda::sum_of_squares_workspace_bytes(int64_t{1} << 40));
  }
  // Sizes only (cuda_backend_sizes): touches no device and is handed out as BackendSizes alone, so that
  // no op can run on it; the element and scratch sizes are those of the backend proper.
  struct SizesOnly {};
  explicit CudaBackend(SizesOnly) : device_(-1) {}
  ~CudaBackend() override {
    if (!stream_) return;  // sizes only
    release(norm_workspace_);
    gemm_.reset();
    cudaStreamDestroy(stream_);
  }

  std::string name() const override { return "cuda"; }
  DType act_dtype() const override { return DType::BF16; }
  DType master_dtype() const override { return DType::F32; }

  void* allocate(size_t bytes) override {
    void* ptr = nullptr;
    if (bytes == 0) bytes = 1;
    count_allocation(bytes);
    const cudaError_t status = cudaMalloc(&ptr, bytes);
    if (status == cudaErrorMemoryAllocation) {
      cudaGetLastError();  // clear the sticky-free allocation error
      size_t free = 0, total = 0;
      cudaMemGetInfo(&free, &total);
      fail("out of GPU memory on device {}: asked for {:.1f} MiB with {:.1f} MiB free of {:.1f} MiB ({:.1f} MiB "
           "already planned by ssmtune); reduce data.seq_len or train.batch_size, or set memory.recompute=true (and "
           "memory.checkpoint_every, e.g. 8, for long sequences)",
           device_, bytes / 1048576.0, free / 1048576.0, total / 1048576.0, allocated_ / 1048576.0);
    }
    SSMTUNE_CUDA_CHECK(status, "cuda backend allocate");
    sizes_[ptr] = bytes;
    allocated_ += bytes;
    return ptr;
  }
  void release(void* ptr) override {
    if (!ptr) return;
    auto it = sizes_.find(ptr);
    if (it != sizes_.end()) {
      allocated_ -= it->second;
      sizes_.erase(it);
    }
    cudaFree(ptr);
  }
  size_t allocated_bytes() const override { return allocated_; }
  DeviceMemory device_memory() const override {
    size_t free = 0, total = 0;
    SSMTUNE_CUDA_CHECK(cudaMemGetInfo(&free, &total), "device_memory");
    return {total - free, total};
  }

  // Host buffers are pageable and the caller may reuse them at once: the copies complete before returning.
  void copy_from_host(void* dst, const void* src, size_t bytes) override {
    SSMTUNE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_), "copy_from_host");
    synchronize();
  }
  void copy_to_host(void* dst, const void* src, size_t bytes) override {
    SSMTUNE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_), "copy_to_host");
    synchronize();
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    SSMTUNE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_), "copy");
  }
  void master_to_act(const void* master, void* act, int64_t n) override {
    cuda::lora_adapters_to_bf16(f32(master), n, bf16(act), stream_);
  }
  void fill_zero(void* dst, size_t bytes) override {
    SSMTUNE_CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, stream_), "fill_zero");
  }
  void copy_rows(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t row_bytes,
                 int64_t rows) override {
    if (rows == 0) return;
    SSMTUNE_CUDA_CHECK(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, row_bytes, static_cast<size_t>(rows),
                                         cudaMemcpyDeviceToDevice, stream_),
                       "copy_rows");
  }
  void synchronize() override { SSMTUNE_CUDA_CHECK(cudaStreamSynchronize(stream_), "synchronize"); }
  void* stream() const override { return stream_; }

  // The dequantized bf16 weight, then the LoRA path's scratch.
  size_t linear_workspace_bytes(std::span<const std::array<int64_t, 2>> weight_shapes, int64_t rows,
                                int64_t max_rank, bool dropout) const override {
    size_t weight = 0, lora = 0;
    for (const auto& [out, in] : weight_shapes) {
      weight = std::max(weight, weight_workspace_bytes(out, in, max_rank));
      if (max_rank > 0) lora = std::max(lora, cuda::lora_workspace_bytes({rows, in, out, max_rank}, dropout));
    }
    return weight + lora;
  }
  // The scan ops never run at the same time: one buffer serves all.
  size_t scan_workspace_bytes(const ScanShape& s) const override {
    const cpu::SelectiveScanShape shape = scan_shape(s);
    return std::max(cuda::selective_scan_forward_workspace_bytes(shape),
                    cuda::selective_scan_backward_workspace_bytes(shape));
  }
  size_t cross_entropy_workspace_bytes(int64_t rows, int64_t slice_rows, int64_t vocab) const override {
    return cuda::cross_entropy_workspace_bytes(rows, slice_rows, vocab);
  }

  // Runs while loading: the staging buffers are allocated and released here, outside any step.
  void nf4_quantize(const float* host_weight, int64_t numel, uint8_t* packed, uint8_t* absmax_codes,
                    float* nested_absmax, float* nested_offset) override {
    const size_t weight_bytes = align256(static_cast<size_t>(numel) * sizeof(float));
    std::byte* staging = static_cast<std::byte*>(allocate(weight_bytes + cuda::nf4_quantize_workspace_bytes(numel)));
    copy_from_host(staging, host_weight, static_cast<size_t>(numel) * sizeof(float));
    cuda::nf4_quantize(reinterpret_cast<const float*>(staging), numel, packed, absmax_codes, nested_absmax,
                       nested_offset, staging + weight_bytes, stream_);
    synchronize();
    release(staging);
  }

  void embedding_forward(const int32_t* tokens, int64_t rows, const void* table, int64_t dim, void* out) override {
    cuda::embedding_forward(tokens, rows, bf16(table), dim, f32(out), stream_);
  }
  void rmsnorm_forward(const void* x, const void* add, void* x_out, const void* weight, void* y, int64_t ldy,
                       void* rstd, int64_t rows, int64_t dim, double eps) override {
    cuda::rmsnorm_forward(f32(x), bf16(add), f32(x_out), f32(weight), bf16(y), ldy, f32(rstd), rows, dim,
                          static_cast<float>(eps), stream_);
  }
  void rmsnorm_backward(const void* x, const void* weight, const void* rstd, const void* dy, void* dx, void* dx_act,
                        int64_t rows, int64_t dim) override {
    cuda::rmsnorm_backward(f32(x), f32(weight), f32(rstd), bf16(dy), f32(dx), bf16(dx_act), rows, dim, stream_);
  }
  void weightless_rmsnorm_forward(const void* x, int64_t ldx, void* y, int64_t ldy, void* rstd, int64_t rows,
                                  int64_t dim, double eps) override {
    cuda::weightless_rmsnorm_forward(bf16(x), ldx, bf16(y), ldy, f32(rstd), rows, dim, static_cast<float>(eps),
                                     stream_);
  }
  void weightless_rmsnorm_backward(const void* x, int64_t ldx, const void* rstd, const void* dy, int64_t lddy,
                                   void* dx, int64_t lddx, int64_t rows, int64_t dim) override {
    cuda::weightless_rmsnorm_backward(bf16(x), ldx, f32(rstd), bf16(dy), lddy, bf16(dx), lddx, rows, dim, stream_);
  }

  // y = x·Wᵀ with W dequantized into the workspace for this call only; the LoRA path adds into y.
  void linear_forward(const LinearOp& op, const void* x, int64_t ldx, int64_t rows, void* y, int64_t ldy,
                      void* lora_h, void* workspace) override {
    const Nf4Weight& w = *op.base;
    if (folds_lora_into_base_gemm(op, ldx)) {
      // y = [x | h] · [W | scale·B]ᵀ: h goes into x's spare columns, scale·B beside the dequantized W, and
      // one GEMM with k = in + rank adds both paths in its fp32 accumulator: y is written once.
      const int64_t in = w.in_features, k = in + op.lora->rank;
      uint16_t* weight = bf16(workspace);
      cuda::nf4_dequantize_bf16_rows(w.packed, w.absmax_codes, w.nested_absmax, w.nested_offset, w.out_features, in,
                                     k, weight, stream_);
      cuda::lora_scaled_up_weight(lora_dims(op, rows), f32(op.lora->B), static_cast<float>(op.lora->scale),
                                  weight + in, k, stream_);
      lora_down_projection(op, x, ldx, rows, nullptr, workspace);  // h into x's columns [in, in + rank)
      gemm_->run(false, true, rows, w.out_features, k, 1.0f, bf16(x), ldx, weight, k, 0.0f, y, cuda::GemmOut::bf16,
                 ldy);
      return;
    }
    const uint16_t* weight = dequantize(w, workspace);
    gemm_->run(false, true, rows, w.out_features, w.in_features, 1.0f, bf16(x), ldx, weight, w.in_features, 0.0f, y,
               cuda::GemmOut::bf16, ldy);
    if (op.lora) {
      const LoraHView h = lora_h_view(op, x, ldx, lora_h, kBf16);
      cuda::lora_forward(*gemm_, lora_dims(op, rows), bf16(x), ldx, bf16(op.lora->A_act), bf16(op.lora->B_act),
                         static_cast<float>(op.lora->scale), dropout(*op.lora), bf16(h.data), h.ld, bf16(y), ldy,
                         lora_workspace(op, workspace));
    }
  }
  void lora_down_projection(const LinearOp& op, const void* x, int64_t ldx, int64_t rows, void* lora_h,
                            void* workspace) override {
    const LoraHView h = lora_h_view(op, x, ldx, lora_h, kBf16);
    cuda::lora_down_projection(*gemm_, lora_dims(op, rows), bf16(x), ldx, bf16(op.lora->A_act), dropout(*op.lora),
                               bf16(h.data), h.ld, lora_workspace(op, workspace));
  }
  // dx = dy·W (+ dx), then the LoRA path's share of dx and its adapter gradients.
  void linear_backward(const LinearOp& op, const void* x, int64_t ldx, int64_t rows, const void* dy, int64_t ldy,
                       const void* lora_h, void* dx, int64_t lddx, bool accumulate_dx, void* workspace) override {
    const Nf4Weight& w = *op.base;
    const uint16_t* weight = dequantize(w, workspace);
    gemm_->run(false, false, rows, w.in_features, w.out_features, 1.0f, bf16(dy), ldy, weight, w.in_features,
               accumulate_dx ? 1.0f : 0.0f, dx, cuda::GemmOut::bf16, lddx);
    if (op.lora) {
      const LoraHView h = lora_h_view(op, x, ldx, lora_h, kBf16);
      cuda::lora_backward(*gemm_, lora_dims(op, rows), bf16(x), ldx, bf16(op.lora->A_act), bf16(op.lora->B_act),
                          static_cast<float>(op.lora->scale), dropout(*op.lora), bf16(h.data), h.ld, bf16(dy), ldy,
                          f32(op.lora->dA), f32(op.lora->dB), bf16(dx), lddx, lora_workspace(op, workspace));
    }
  }

  void conv1d_silu_forward(const void* x, int64_t ldx, const void* weight, const void* bias, void* u, int64_t batch,
                           int64_t len, int64_t dim, int64_t kernel, const int32_t* doc_start,
                           const void* history) override {
    cuda::causal_conv1d_silu_forward(bf16(x), ldx, f32(weight), f32(bias), bf16(u), batch, len, dim, kernel,
                                     doc_start, bf16(history), stream_);
  }
  void conv1d_silu_backward(const void* x, int64_t ldx, const void* weight, const void* bias, const void* du,
                            void* dx, int64_t lddx, int64_t batch, int64_t len, int64_t dim, int64_t kernel,
                            const int32_t* doc_start, const void* history, const void* d_tail) override {
    cuda::causal_conv1d_silu_backward(bf16(x), ldx, f32(weight), f32(bias), bf16(du), bf16(dx), lddx, batch, len,
                                      dim, kernel, doc_start, bf16(history), bf16(d_tail), stream_);
  }
  void conv1d_silu_history_grad(const void* x, int64_t ldx, const void* weight, const void* bias, const void* du,
                                int64_t batch, int64_t len, int64_t dim, int64_t kernel, const int32_t* doc_start,
                                const void* history, void* d_history) override {
    cuda::causal_conv1d_silu_history_grad(bf16(x), ldx, f32(weight), f32(bias), bf16(du), batch, len, dim, kernel,
                                          doc_start, bf16(history), bf16(d_history), stream_);
  }

  void selective_scan_forward(const ScanShape& s, const void* u, const void* delta, const void* delta_bias,
                              const void* A, const void* B, const void* C, int64_t bc_stride, const void* Dskip,
                              const void* z, int64_t z_stride, void* out, int64_t out_stride, void* chunk_states,
                              void* workspace, const int32_t* doc_start, const void* initial_state) override {
    cuda::selective_scan_forward(scan_shape(s), bf16(u), bf16(delta), f32(delta_bias), f32(A), bf16(B), bf16(C),
                                 bc_stride, f32(Dskip), bf16(z), z_stride, bf16(out), out_stride, f32(chunk_states),
                                 workspace, doc_start, f32(initial_state), stream_);
  }
  void selective_scan_backward(const ScanShape& s, const void* u, const void* delta, const void* delta_bias,
                               const void* A, const void* B, const void* C, int64_t bc_stride, const void* Dskip,
                               const void* z, int64_t z_stride, const void* chunk_states, const void* dout, void* du,
                               void* ddelta, void* dB, void* dC, void* dz, void* workspace, const int32_t* doc_start,
                               const void* initial_state, const void* d_final_state, void* d_initial_state) override {
    cuda::selective_scan_backward(scan_shape(s), bf16(u), bf16(delta), f32(delta_bias), f32(A), bf16(B), bf16(C),
                                  bc_stride, f32(Dskip), bf16(z), z_stride, f32(chunk_states), bf16(dout), bf16(du),
                                  bf16(ddelta), bf16(dB), bf16(dC), bf16(dz), workspace, doc_start, f32(initial_state),
                                  f32(d_final_state), f32(d_initial_state), stream_);
  }
  void selective_scan_forward_begin(const ScanShape& s, const void* u, const void* delta, const void* delta_bias,
                                    const void* A, const void* B, int64_t bc_stride, void* chunk_states,
                                    void* workspace, const int32_t* doc_start, void* final_state,
                                    void* decay) override {
    cuda::selective_scan_forward_begin(scan_shape(s), bf16(u), bf16(delta), f32(delta_bias), f32(A), bf16(B),
                                       bc_stride, f32(chunk_states), workspace, doc_start, f32(final_state),
                                       f32(decay), stream_);
  }
  void selective_scan_forward_end(const ScanShape& s, const void* u, const void* delta, const void* delta_bias,
                                  const void* A, const void* B, const void* C, int64_t bc_stride, const void* Dskip,
                                  const void* z, int64_t z_stride, void* out, int64_t out_stride, void* chunk_states,
                                  void* workspace, const int32_t* doc_start, const void* initial_state) override {
    cuda::selective_scan_forward_end(scan_shape(s), bf16(u), bf16(delta), f32(delta_bias), f32(A), bf16(B), bf16(C),
                                     bc_stride, f32(Dskip), bf16(z), z_stride, bf16(out), out_stride,
                                     f32(chunk_states), workspace, doc_start, f32(initial_state), stream_);
  }
  void selective_scan_backward_begin(const ScanShape& s, const void* u, const void* delta, const void* delta_bias,
                                     const void* A, const void* B, const void* C, int64_t bc_stride, const void* z,
                                     int64_t z_stride, const void* chunk_states, const void* dout, void* workspace,
                                     const int32_t* doc_start, const void* initial_state,
                                     void* d_initial_state) override {
    cuda::selective_scan_backward_begin(scan_shape(s), bf16(u), bf16(delta), f32(delta_bias), f32(A), bf16(B),
                                        bf16(C), bc_stride, bf16(z), z_stride, f32(chunk_states), bf16(dout),
                                        workspace, doc_start, f32(initial_state), f32(d_initial_state), stream_);
  }
  void selective_scan_backward_end(const ScanShape& s, const void* u, const void* delta, const void* delta_bias,
                                   const void* A, const void* B, const void* C, int64_t bc_stride, const void* Dskip,
                                   const void* z, int64_t z_stride, const void* chunk_states, const void* dout,
                                   void* du, void* ddelta, void* dB, void* dC, void* dz, void* workspace,
                                   const int32_t* doc_start, const void* initial_state,
                                   const void* d_final_state) override {
    cuda::selective_scan_backward_end(scan_shape(s), bf16(u), bf16(delta), f32(delta_bias), f32(A), bf16(B), bf16(C),
                                      bc_stride, f32(Dskip), bf16(z), z_stride, f32(chunk_states), bf16(dout),
                                      bf16(du), bf16(ddelta), bf16(dB), bf16(dC), bf16(dz), workspace, doc_start,
                                      f32(initial_state), f32(d_final_state), stream_);
  }
  void scan_state_carry(void* state, const void* first, const void* second, int64_t n) override {
    cuda::scan_state_carry(f32(state), f32(first), f32(second), n, stream_);
  }
  void conv1d_silu_step(const void* x, int64_t ldx, const void* weight, const void* bias, void* conv_window, void* u,
                        int64_t rows, int64_t dim, int64_t kernel) override {
    cuda::causal_conv1d_silu_step(bf16(x), ldx, f32(weight), f32(bias), f32(conv_window), bf16(u), rows, dim, kernel,
                                  stream_);
  }
  void selective_scan_step(const void* u, const void* delta, const void* delta_bias, const void* A, const void* B,
                           const void* C, int64_t bc_stride, const void* Dskip, const void* z, int64_t z_stride,
                           void* ssm_state, void* out, int64_t rows, int64_t dim, int64_t state) override {
    cuda::selective_scan_step(bf16(u), bf16(delta), f32(delta_bias), f32(A), bf16(B), bf16(C), bc_stride, f32(Dskip),
                              bf16(z), z_stride, f32(ssm_state), bf16(out), rows, dim, state, stream_);
  }
  // fp32 logits straight from the GEMM's accumulator: sampling sees them unrounded.
  void lm_head_logits(const void* h, const void* table, int64_t rows, int64_t dim, int64_t vocab,
                      void* logits) override {
    gemm_->run(false, true, rows, vocab, dim, 1.0f, bf16(h), dim, bf16(table), dim, 0.0f, logits, cuda::GemmOut::f32,
               vocab);
  }


  double cross_entropy(const void* h, const void* table, int64_t rows, int64_t dim, int64_t vocab,
                       const int32_t* targets, const void* weights, double grad_scale, void* dh,
                       void* logits_workspace, int64_t slice_rows) override {
    return cuda::cross_entropy_forward_backward(*gemm_, bf16(h), bf16(table), rows, dim, vocab, targets,
                                                bf16(weights), static_cast<float>(grad_scale), bf16(dh),
                                                logits_workspace, slice_rows);
  }

  double sum_of_squares(const void* x, int64_t n) override {
    return cuda::sum_of_squares(f32(x), n, norm_workspace_, stream_);
  }
  void scale(void* x, int64_t n, double factor) override { cuda::scale(f32(x), n, factor, stream_); }
  void adamw_update(void* params, const void* grads, void* m, void* v, int64_t n, double lr, double beta1,
                    double beta2, double eps, double weight_decay, double bc1, double bc2) override {
    cuda::adamw_update(f32(params), f32(grads), f32(m), f32(v), n, lr, beta1, beta2, eps, weight_decay, bc1, bc2,
                       stream_);
  }

 private:
  static cpu::SelectiveScanShape scan_shape(const ScanShape& s) {
    return {s.batch, s.len, s.dim, s.state, s.chunk_len};
  }
  static cpu::LoraDims lora_dims(const LinearOp& op, int64_t rows) {
    return {rows, op.base->in_features, op.base->out_features, op.lora->rank};
  }
  static cpu::LoraDropout dropout(const LoraPath& lora) { return {lora.dropout, lora.dropout_seed, lora.dropout_stream}; }
  // The dequantized weight, with room for the up-projection's columns: [out, in + lora_h_columns(rank)].
  static size_t weight_workspace_bytes(int64_t out, int64_t in, int64_t rank) {
    return align256(static_cast<size_t>(out * (in + (rank > 0 ? lora_h_columns(rank) : 0))) * kBf16);
  }
  static void* lora_workspace(const LinearOp& op, void* workspace) {
    return static_cast<std::byte*>(workspace) +
           weight_workspace_bytes(op.base->out_features, op.base->in_features, op.lora->rank);
  }
  // The K-concatenated GEMM needs h in x's columns and whole 16-byte rows: in (for the dequantizer's
  // 16-byte stores), the rank and ldx all multiples of 8. Other shapes take the two-GEMM path.
  static bool folds_lora_into_base_gemm(const LinearOp& op, int64_t ldx) {
    return op.lora && op.h_in_x_columns && op.base->in_features % 8 == 0 && op.lora->rank % 8 == 0 && ldx % 8 == 0;
  }
  uint16_t* dequantize(const Nf4Weight& w, void* workspace) {
    uint16_t* out = bf16(workspace);
    cuda::nf4_dequantize_bf16(w.packed, w.absmax_codes, w.nested_absmax, w.nested_offset,
                              w.out_features * w.in_features, out, stream_);
    return out;
  }

  int device_;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<cuda::Gemm> gemm_;
  void* norm_workspace_ = nullptr;
  size_t allocated_ = 0;
  std::unordered_map<void*, size_t> sizes_;
};

}  // namespace

int cuda_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

std::unique_ptr<Backend> make_cuda_backend(int device) { return std::make_unique<CudaBackend>(device); }

std::unique_ptr<BackendSizes> cuda_backend_sizes() { return std::make_unique<CudaBackend>(CudaBackend::SizesOnly{}); }

}  // namespace ssmtune
