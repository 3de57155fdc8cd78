// The selective scan, forward and forward+backward, at mamba-ssm's benchmark shapes, called as the
// training step calls it: B and C strided inside an x_proj-like buffer [T, R + 2N] (R = dim/32, the
// dt_rank of a model with d_model = dim/2), z inside an in_proj-like buffer [T, 2*dim], chunks of 64.
// Then the same rows packed with documents of kDocument tokens (no peer: mamba-ssm has no document
// boundaries); against the unpacked rows, what packing costs the scan (issue 7 allows 5% of a step).
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <vector>

#include "kernels/cuda/check.h"
#include "kernels/cuda/selective_scan.h"
#include "recipes/bench/entries.h"
#include "recipes/bench/peers.h"

namespace ssmtune::bench {

void bench_selective_scan(KernelBench& bench) {
  constexpr int64_t kState = 16, kChunk = 64, kDocument = 500;  // not a multiple of the chunk
  for (const peers::KernelPeer& peer : peers::kMambaSsmScan) {
    const std::string shape = fmt::format("({},{},{},{})", peer.batch, peer.dim, peer.len, kState);
    bench.attempt("selective scan", shape, [&] {
      const cpu::SelectiveScanShape s{peer.batch, peer.len, peer.dim, kState, kChunk};
      const int64_t T = s.batch * s.len, D = s.dim, N = s.state, R = D / 32, xdbl_cols = R + 2 * N;
      const int64_t states = s.batch * cpu::selective_scan_num_chunks(s) * D * N;
      // Typical trained magnitudes: delta_bias puts softplus(delta + bias) near Mamba's dt range
      // (1e-3..1e-1), A = -exp(A_log) spans -1..-16.
      const DeviceBuffer u = random_bf16(T * D, -1, 1, 11), delta = random_bf16(T * D, -0.5f, 0.5f, 12);
      const DeviceBuffer xdbl = random_bf16(T * xdbl_cols, -1, 1, 13), xz = random_bf16(T * 2 * D, -1, 1, 14);
      const DeviceBuffer delta_bias = random_f32(D, -5, -2, 15), A = random_f32(D * N, -16, -1, 16);
      const DeviceBuffer Dskip = random_f32(D, 0.5f, 1.5f, 17), dout = random_bf16(T * D, -1, 1, 18);
      DeviceBuffer out(T * D * 2), chunk_states(states * 4), du(T * D * 2), ddelta(T * D * 2);
      DeviceBuffer dxdbl(T * xdbl_cols * 2), dxz(T * 2 * D * 2);
      // One scratch buffer for both directions, as the training step has.
      DeviceBuffer workspace(std::max(cuda::selective_scan_forward_workspace_bytes(s),
                                      cuda::selective_scan_backward_workspace_bytes(s)));
      const uint16_t* B = xdbl.as<uint16_t>() + R;
      const uint16_t* C = xdbl.as<uint16_t>() + R + N;
      const uint16_t* z = xz.as<uint16_t>() + D;

      std::vector<int32_t> host_doc_start(T);
      for (int64_t row = 0; row < T; ++row) {
        const int64_t t = row % s.len;
        host_doc_start[row] = static_cast<int32_t>(t - t % kDocument);
      }
      DeviceBuffer doc_start(T * sizeof(int32_t));
      SSMTUNE_CUDA_CHECK(cudaMemcpy(doc_start.as<void>(), host_doc_start.data(), T * sizeof(int32_t),
                                    cudaMemcpyHostToDevice),
                         "bench selective scan doc_start");

      auto forward_with = [&](const int32_t* starts) {
        cuda::selective_scan_forward(s, u.as<uint16_t>(), delta.as<uint16_t>(), delta_bias.as<float>(),
                                     A.as<float>(), B, C, xdbl_cols, Dskip.as<float>(), z, 2 * D,
                                     out.as<uint16_t>(), D, chunk_states.as<float>(), workspace.as<void>(), starts,
                                     nullptr, bench.stream());
      };
      auto backward_with = [&](const int32_t* starts) {
        cuda::selective_scan_backward(s, u.as<uint16_t>(), delta.as<uint16_t>(), delta_bias.as<float>(),
                                      A.as<float>(), B, C, xdbl_cols, Dskip.as<float>(), z, 2 * D,
                                      chunk_states.as<float>(), dout.as<uint16_t>(), du.as<uint16_t>(),
                                      ddelta.as<uint16_t>(), dxdbl.as<uint16_t>() + R, dxdbl.as<uint16_t>() + R + N,
                                      dxz.as<uint16_t>() + D, workspace.as<void>(), starts, nullptr, nullptr,
                                      nullptr, bench.stream());
      };
      auto forward = [&] { forward_with(nullptr); };
      auto backward = [&] { backward_with(nullptr); };
      // Minimum traffic: the bf16 tensors [T, D] and [T, N], the fp32 parameters, the fp32 chunk states.
      const double act = 2.0 * T * D, bc = 2.0 * T * N, params = 4.0 * D * (N + 2), saved = 4.0 * states;
      const double forward_bytes = 3 * act + 2 * bc + params + act + saved;          // u delta z B C -> out, states
      const double backward_bytes = 4 * act + 2 * bc + params + saved + 3 * act + 2 * bc;  // + dout -> du ddelta dz dB dC
      bench.record_forward_backward("selective scan", shape, forward_bytes, backward_bytes, peer.forward_us * 1e-6,
                                    peer.forward_backward_us * 1e-6, forward, backward);
      const double doc_bytes = 4.0 * T;  // one int32 per token, read by each direction
      bench.record("selective scan packed fwd", shape, Bound::bytes, forward_bytes + doc_bytes, std::nullopt,
                   [&] { forward_with(doc_start.as<int32_t>()); });
      bench.record("selective scan packed fwd+bwd", shape, Bound::bytes, forward_bytes + backward_bytes + 2 * doc_bytes,
                   std::nullopt, [&] {
                     forward_with(doc_start.as<int32_t>());
                     backward_with(doc_start.as<int32_t>());
                   });
    });
  }
}

}  // namespace ssmtune::bench
