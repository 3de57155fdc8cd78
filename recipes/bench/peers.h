// The figures REFERENCE.md §7 measured on an H100 80GB (nvidia-h100-x1, 2026-11-22) and on 2 x H200
// (nvidia-h200-x2): the ceilings and the peers the benchmarks set their numbers beside. Times in
// microseconds, as there.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace ssmtune::bench::peers {

inline constexpr double kCopyBytesPerSecond = 3.02e12;  // device-to-device copy, bytes read + written
inline constexpr double kGemmFlopsPerSecond = 790e12;   // bf16 GEMM 8192^3

// A kernel pair timed by its own library, forward alone and forward then backward.
struct KernelPeer {
  int64_t batch, dim, len;
  double forward_us, forward_backward_us;
};

// mamba-ssm 2.3.2 selective_scan_fn, bf16, variable B/C, z, delta_bias, softplus; N = 16.
inline constexpr KernelPeer kMambaSsmScan[] = {
    {2, 4096, 2048, 334, 1681},
    {8, 1536, 2048, 476, 2359},
    {1, 5120, 8192, 1010, 4359},
};

// causal-conv1d 1.6 with SiLU, bf16, kernel 4.
inline constexpr KernelPeer kCausalConv1d[] = {
    {2, 4096, 2048, 119, 437},
    {8, 1536, 2048, 77, 478},
    {1, 5120, 8192, 118, 363},
};

// HF transformers 5.17 + PEFT 0.21: LoRA r=16 alpha=32 on in_proj/x_proj/dt_proj over bf16 base weights
// (not NF4), mamba-ssm and causal-conv1d kernels, AdamW, random init, sequences of 2048 tokens.
struct HfStep {
  std::string_view model;
  int64_t batch;
  double tokens_per_second, peak_gib;
};
inline constexpr HfStep kHfPeft[] = {
    {"mamba-130m", 8, 89023, 18.4},
    {"mamba-1.4b", 4, 16882, 24.4},
    {"mamba-2.8b", 2, 9592, 21.3},
};
inline constexpr int64_t kHfSeqLen = 2048;

// NCCL 2.28 through torch.distributed on 2 x H200 with NVLink (nvidia-h200-x2): bus bandwidth in GB/s
// at a buffer of `bytes` (the whole buffer, as nccl-tests sizes it).
struct CollectivePeer {
  std::string_view op;
  size_t bytes;
  double bus_gb_per_second;
};
inline constexpr CollectivePeer kNcclTwoH200[] = {
    {"all_reduce", size_t{16} << 20, 215},  {"all_reduce", size_t{64} << 20, 267},
    {"all_reduce", size_t{256} << 20, 299}, {"all_reduce", size_t{1} << 30, 332},
    {"all_gather", size_t{1} << 30, 288},   {"reduce_scatter", size_t{1} << 30, 266},
};

}  // namespace ssmtune::bench::peers
