// Causal depthwise conv1d + SiLU, forward and forward+backward, at causal-conv1d's benchmark shapes,
// called as the training step calls it: x is the first half of an in_proj-like buffer (row stride
// 2*dim), dx written into the same place of its gradient; kernel 4.
#include <fmt/format.h>

#include "kernels/cuda/causal_conv1d.h"
#include "recipes/bench/entries.h"
#include "recipes/bench/peers.h"

namespace ssmtune::bench {

void bench_causal_conv1d(KernelBench& bench) {
  constexpr int64_t kKernel = 4;
  for (const peers::KernelPeer& peer : peers::kCausalConv1d) {
    const std::string shape = fmt::format("({},{},{}) K{}", peer.batch, peer.dim, peer.len, kKernel);
    bench.attempt("causal conv1d+silu", shape, [&] {
      const int64_t B = peer.batch, L = peer.len, D = peer.dim, T = B * L;
      const DeviceBuffer xz = random_bf16(T * 2 * D, -1, 1, 21), du = random_bf16(T * D, -1, 1, 22);
      const DeviceBuffer weight = random_f32(D * kKernel, -0.5f, 0.5f, 23), bias = random_f32(D, -0.5f, 0.5f, 24);
      DeviceBuffer u(T * D * 2), dxz(T * 2 * D * 2);

      auto forward = [&] {
        cuda::causal_conv1d_silu_forward(xz.as<uint16_t>(), 2 * D, weight.as<float>(), bias.as<float>(),
                                         u.as<uint16_t>(), B, L, D, kKernel, nullptr, nullptr, bench.stream());
      };
      auto backward = [&] {
        cuda::causal_conv1d_silu_backward(xz.as<uint16_t>(), 2 * D, weight.as<float>(), bias.as<float>(),
                                          du.as<uint16_t>(), dxz.as<uint16_t>(), 2 * D, B, L, D, kKernel, nullptr,
                                          nullptr, nullptr, bench.stream());
      };
      const double act = 2.0 * T * D, params = 4.0 * D * (kKernel + 1);
      const double forward_bytes = act + params + act;        // x -> u
      const double backward_bytes = 2 * act + params + act;   // x, du -> dx
      bench.record_forward_backward("causal conv1d+silu", shape, forward_bytes, backward_bytes,
                                    peer.forward_us * 1e-6, peer.forward_backward_us * 1e-6, forward, backward);
    });
  }
}

}  // namespace ssmtune::bench
