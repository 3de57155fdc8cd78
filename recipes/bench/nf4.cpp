// NF4 dequantization (both levels, bf16 out) at issue 6's shapes (a 7B-class MLP weight and a square
// 8192 one; mamba-2.8b's in_proj is 10240 x 2560). Bytes-bound:
// half a byte per weight and the scales in, two bytes per weight out.
#include <cuda_runtime.h>
#include <fmt/format.h>

#include "kernels/cpu/nf4.h"
#include "kernels/cuda/check.h"
#include "kernels/cuda/nf4.h"
#include "recipes/bench/entries.h"

namespace ssmtune::bench {

void bench_nf4_dequantize(KernelBench& bench) {
  struct Weight {
    int64_t out, in;
  };
  for (const Weight& w : {Weight{4096, 14336}, Weight{8192, 8192}}) {
    const std::string shape = fmt::format("{}x{}", w.out, w.in);
    bench.attempt("nf4 dequantize", shape, [&] {
      cuda::nf4_upload_tables();
      const cpu::Nf4Sizes n = cpu::nf4_sizes(w.out * w.in);
      // Any byte is a valid pair of codes and any uint8 a valid scale code: random bytes are random weights.
      const DeviceBuffer packed = random_bytes(n.packed_bytes, 31), codes = random_bytes(n.blocks, 32);
      const DeviceBuffer nested = random_f32(n.nested_blocks, 0.01f, 0.1f, 33);
      DeviceBuffer out(n.numel * 2);
      const double bytes = static_cast<double>(n.packed_bytes + n.blocks + 4 * n.nested_blocks + 2 * n.numel);
      bench.record("nf4 dequantize", shape, Bound::bytes, bytes, {}, [&] {
        cuda::nf4_dequantize_bf16(packed.as<uint8_t>(), codes.as<uint8_t>(), nested.as<float>(), 0.02f, n.numel,
                                  out.as<uint16_t>(), bench.stream());
      });
      // The copy ceiling at this size: a device-to-device copy moving the same bytes. Below ~200 MB the
      // fixed costs of a kernel (launch, the first loads' latency, the L2 the flush left dirty) are a
      // visible share, so this copy reaches less of the 1 GiB copy than a large one.
      DeviceBuffer copy_from(static_cast<size_t>(bytes / 2)), copy_to(static_cast<size_t>(bytes / 2));
      bench.record(kSameBytesCopy, shape, Bound::bytes, 2.0 * copy_from.bytes(), {}, [&] {
        SSMTUNE_CUDA_CHECK(cudaMemcpyAsync(copy_to.as<void>(), copy_from.as<void>(), copy_from.bytes(),
                                           cudaMemcpyDeviceToDevice, static_cast<cudaStream_t>(bench.stream())),
                           "bench copy of the dequantize's bytes");
      });
    });
  }
}

}  // namespace ssmtune::bench
