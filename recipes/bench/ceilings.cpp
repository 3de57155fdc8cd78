// The ceilings every kernel is judged against, measured in the same run on the same device: the
// device-to-device copy bandwidth (the bytes-bound ceiling) and the bf16 GEMM rate (the FLOP-bound one).
#include <fmt/format.h>

#include "kernels/cuda/check.h"
#include "recipes/bench/harness.h"

namespace ssmtune::bench {

Ceilings measure_ceilings(KernelBench& bench) {
  Ceilings c;
  try {
    const size_t bytes = size_t{1} << 30;
    const DeviceBuffer src = random_bytes(static_cast<int64_t>(bytes), 1);
    const DeviceBuffer dst(bytes);
    c.copy_bytes = 2.0 * static_cast<double>(bytes);  // each byte read once and written once
    c.copy_seconds = median(bench.time([&] {
      SSMTUNE_CUDA_CHECK(cudaMemcpyAsync(dst.as<void>(), src.as<void>(), bytes, cudaMemcpyDeviceToDevice,
                                         static_cast<cudaStream_t>(bench.stream())),
                         "bench copy ceiling");
    }));
  } catch (const std::exception& e) {
    cudaGetLastError();
    c.copy_seconds = 0;
    c.error += fmt::format("copy: {}; ", e.what());
  }
  try {
    const int64_t n = 8192;
    const DeviceBuffer A = random_bf16(n * n, -1, 1, 2), B = random_bf16(n * n, -1, 1, 3);
    const DeviceBuffer C(static_cast<size_t>(n * n) * sizeof(uint16_t));
    c.gemm_flops = 2.0 * static_cast<double>(n) * n * n;
    c.gemm_seconds = median(bench.time([&] {
      bench.gemm().run(false, false, n, n, n, 1.0f, A.as<uint16_t>(), n, B.as<uint16_t>(), n, 0.0f, C.as<void>(),
                       cuda::GemmOut::bf16, n);
    }));
  } catch (const std::exception& e) {
    cudaGetLastError();
    c.gemm_seconds = 0;
    c.error += fmt::format("gemm: {}; ", e.what());
  }
  return c;
}

}  // namespace ssmtune::bench
