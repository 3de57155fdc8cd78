#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "kernels/common/counter_rng.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/lora.h"

namespace ssmtune::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;  // fills the GPU several times over; the loops stride past it

size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Byte offsets into the workspace, each piece 256-byte aligned as cuBLASLt likes its operands: dh [rows,
// rank] in bf16, and `input` [rows, in], which holds dropout(x) in bf16 and, in the backward once the dA
// product has read it, the fp32 product dh·A that the mask then scales into dx: 4 bytes per element cover
// both.
struct LoraLayout {
  size_t dh, input, bytes;
};

LoraLayout lora_layout(const cpu::LoraDims& d) {
  constexpr size_t kBf16 = 2, kF32 = 4;
  LoraLayout l{};
  l.dh = 0;
  l.input = l.dh + align256(static_cast<size_t>(d.rows * d.rank) * kBf16);
  l.bytes = l.input + align256(static_cast<size_t>(d.rows * d.in) * kF32);
  return l;
}

template <typename T>
T* at(void* workspace, size_t offset) {
  return reinterpret_cast<T*>(static_cast<char*>(workspace) + offset);
}

float keep_scale_of(const cpu::LoraDropout& dropout) { return static_cast<float>(1.0 / (1.0 - dropout.p)); }

unsigned blocks_for(int64_t n) { return static_cast<unsigned>(std::min((n + kThreads - 1) / kThreads, kMaxBlocks)); }

// The CPU reference's factor: 0 when r < p (r promoted to double as there), else 1/(1-p).
__device__ __forceinline__ float dropout_factor(const cpu::LoraDropout& dropout, float keep_scale, int64_t index) {
  const float r = counter_random_uniform(dropout.seed, dropout.stream, static_cast<uint64_t>(index));
  return static_cast<double>(r) < dropout.p ? 0.0f : keep_scale;
}

__global__ void to_bf16_kernel(const float* __restrict__ src, int64_t n, __nv_bfloat16* __restrict__ dst) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] = __float2bfloat16_rn(src[i]);
}

// dst[o, j] (row stride ld) = bf16(scale * B[o, j]) for B [out, rank].
__global__ void scaled_to_bf16_rows_kernel(const float* __restrict__ B, int64_t out, int64_t rank, float scale,
                                           __nv_bfloat16* __restrict__ dst, int64_t ld) {
  const int64_t n = out * rank;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = idx / rank, j = idx - o * rank;
    dst[o * ld + j] = __float2bfloat16_rn(scale * B[idx]);
  }
}

// xd[t, i] (dense) = x[t, i] * factor(t*in + i): the flat index of the dense output is the mask's index.
__global__ void dropout_kernel(const __nv_bfloat16* __restrict__ x, int64_t ldx, int64_t rows, int64_t in,
                               cpu::LoraDropout dropout, float keep_scale, __nv_bfloat16* __restrict__ xd) {
  const int64_t n = rows * in;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = idx / in, i = idx - t * in;
    xd[idx] = __float2bfloat16_rn(__bfloat162float(x[t * ldx + i]) * dropout_factor(dropout, keep_scale, idx));
  }
}

// dx[t, i] += factor(t*in + i) * product[t, i]; a dropped element keeps its bits (dx + 0 rounds to dx).
__global__ void masked_accumulate_kernel(const float* __restrict__ product, int64_t rows, int64_t in,
                                         cpu::LoraDropout dropout, float keep_scale, __nv_bfloat16* __restrict__ dx,
                                         int64_t lddx) {
  const int64_t n = rows * in;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = idx / in, i = idx - t * in;
    __nv_bfloat16& out = dx[t * lddx + i];
    out = __float2bfloat16_rn(__bfloat162float(out) + dropout_factor(dropout, keep_scale, idx) * product[idx]);
  }
}

void validate(const char* op, const cpu::LoraDims& d, int64_t ldx, int64_t ldy, const cpu::LoraDropout& dropout) {
  if (d.rows < 0 || d.in < 1 || d.out < 1 || d.rank < 1)
    throw std::invalid_argument(std::string(op) + ": needs rows >= 0 and in, out, rank >= 1, got rows=" +
                                std::to_string(d.rows) + " in=" + std::to_string(d.in) +
                                " out=" + std::to_string(d.out) + " rank=" + std::to_string(d.rank));
  if (ldx < d.in || ldy < d.out)
    throw std::invalid_argument(std::string(op) + ": row strides (" + std::to_string(ldx) + ", " +
                                std::to_string(ldy) + ") smaller than the rows (in=" + std::to_string(d.in) +
                                ", out=" + std::to_string(d.out) + ")");
  if (!(dropout.p >= 0 && dropout.p < 1))
    throw std::invalid_argument(std::string(op) + ": dropout must lie in [0, 1), got " + std::to_string(dropout.p));
}

void check_h_stride(const char* op, const cpu::LoraDims& d, int64_t ldh) {
  if (ldh < d.rank)
    throw std::invalid_argument(std::string(op) + ": h row stride " + std::to_string(ldh) + " below rank " +
                                std::to_string(d.rank));
}

struct Operand {
  const uint16_t* data;
  int64_t ld;
};

// x itself without dropout; else dropout(x) materialised densely in the workspace.
Operand dropped_input(const cpu::LoraDims& d, const uint16_t* x, int64_t ldx, const cpu::LoraDropout& dropout,
                      void* workspace, const LoraLayout& layout, cudaStream_t stream, const char* op) {
  if (dropout.p <= 0) return {x, ldx};
  uint16_t* xd = at<uint16_t>(workspace, layout.input);
  dropout_kernel<<<blocks_for(d.rows * d.in), kThreads, 0, stream>>>(reinterpret_cast<const __nv_bfloat16*>(x), ldx,
                                                                     d.rows, d.in, dropout, keep_scale_of(dropout),
                                                                     reinterpret_cast<__nv_bfloat16*>(xd));
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), op);
  return {xd, d.in};
}

}  // namespace

void lora_adapters_to_bf16(const float* params, int64_t n, uint16_t* params_bf16, void* stream) {
  if (n == 0) return;
  to_bf16_kernel<<<blocks_for(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      params, n, reinterpret_cast<__nv_bfloat16*>(params_bf16));
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "lora_adapters_to_bf16 launch");
}

// Without dropout nothing touches `input`, the layout's last piece: the workspace may end where it begins.
size_t lora_workspace_bytes(const cpu::LoraDims& d, bool dropout) {
  const LoraLayout layout = lora_layout(d);
  return dropout ? layout.bytes : layout.input;
}

void lora_down_projection(Gemm& gemm, const cpu::LoraDims& d, const uint16_t* x, int64_t ldx, const uint16_t* A16,
                          const cpu::LoraDropout& dropout, uint16_t* h, int64_t ldh, void* workspace) {
  validate("lora_down_projection", d, ldx, d.out, dropout);
  check_h_stride("lora_down_projection", d, ldh);
  if (d.rows == 0) return;
  const auto stream = static_cast<cudaStream_t>(gemm.stream());
  const Operand xd = dropped_input(d, x, ldx, dropout, workspace, lora_layout(d), stream,
                                   "lora_down_projection dropout launch");
  gemm.run(false, true, d.rows, d.rank, d.in, 1.0f, xd.data, xd.ld, A16, d.in, 0.0f, h, GemmOut::bf16, ldh);
}

void lora_scaled_up_weight(const cpu::LoraDims& d, const float* B, float scale, uint16_t* up, int64_t ld,
                           void* stream) {
  if (ld < d.rank)
    throw std::invalid_argument("lora_scaled_up_weight: row stride " + std::to_string(ld) + " below rank " +
                                std::to_string(d.rank));
  scaled_to_bf16_rows_kernel<<<blocks_for(d.out * d.rank), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      B, d.out, d.rank, scale, reinterpret_cast<__nv_bfloat16*>(up), ld);
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "lora_scaled_up_weight launch");
}

void lora_forward(Gemm& gemm, const cpu::LoraDims& d, const uint16_t* x, int64_t ldx, const uint16_t* A16,
                  const uint16_t* B16, float scale, const cpu::LoraDropout& dropout, uint16_t* h, int64_t ldh,
                  uint16_t* y, int64_t ldy, void* workspace) {
  validate("lora_forward", d, ldx, ldy, dropout);
  if (d.rows == 0) return;
  lora_down_projection(gemm, d, x, ldx, A16, dropout, h, ldh, workspace);
  gemm.run(false, true, d.rows, d.out, d.rank, scale, h, ldh, B16, d.rank, 1.0f, y, GemmOut::bf16, ldy);
}

void lora_backward(Gemm& gemm, const cpu::LoraDims& d, const uint16_t* x, int64_t ldx, const uint16_t* A16,
                   const uint16_t* B16, float scale, const cpu::LoraDropout& dropout, const uint16_t* h, int64_t ldh,
                   const uint16_t* dy, int64_t ldy, float* dA, float* dB, uint16_t* dx, int64_t lddx, void* workspace) {
  validate("lora_backward", d, ldx, ldy, dropout);
  check_h_stride("lora_backward", d, ldh);
  if (lddx < d.in)
    throw std::invalid_argument("lora_backward: dx row stride " + std::to_string(lddx) + " smaller than in=" +
                                std::to_string(d.in));
  if (d.rows == 0) return;
  const auto stream = static_cast<cudaStream_t>(gemm.stream());
  const LoraLayout layout = lora_layout(d);
  uint16_t* dh = at<uint16_t>(workspace, layout.dh);

  gemm.run(true, false, d.out, d.rank, d.rows, scale, dy, ldy, h, ldh, 1.0f, dB, GemmOut::f32, d.rank);
  gemm.run(false, false, d.rows, d.rank, d.out, scale, dy, ldy, B16, d.rank, 0.0f, dh, GemmOut::bf16, d.rank);
  const Operand xd = dropped_input(d, x, ldx, dropout, workspace, layout, stream, "lora_backward dropout launch");
  gemm.run(true, false, d.rank, d.in, d.rows, 1.0f, dh, d.rank, xd.data, xd.ld, 1.0f, dA, GemmOut::f32, d.in);
  if (dropout.p <= 0) {
    gemm.run(false, false, d.rows, d.in, d.rank, 1.0f, dh, d.rank, A16, d.in, 1.0f, dx, GemmOut::bf16, lddx);
    return;
  }
  // The mask multiplies the product, not dx, so the product goes through fp32 scratch (over xd, which the
  // dA product above has consumed: same stream) before the masked add.
  float* product = at<float>(workspace, layout.input);
  gemm.run(false, false, d.rows, d.in, d.rank, 1.0f, dh, d.rank, A16, d.in, 0.0f, product, GemmOut::f32, d.in);
  masked_accumulate_kernel<<<blocks_for(d.rows * d.in), kThreads, 0, stream>>>(
      product, d.rows, d.in, dropout, keep_scale_of(dropout), reinterpret_cast<__nv_bfloat16*>(dx), lddx);
  SSMTUNE_CUDA_CHECK(cudaGetLastError(), "lora_backward masked dx launch");
}

}  // namespace ssmtune::cuda
