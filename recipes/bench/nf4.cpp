// NF4 dequantization (both levels, bf16 out) of mamba-2.8b's two largest projections. Bytes-bound:
// half a byte per weight and the scales in, two bytes per weight out.
#include <fmt/format.h>

#include "kernels/cpu/nf4.h"
#include "kernels/cuda/nf4.h"
#include "recipes/bench/entries.h"

namespace ssmtune::bench {

void bench_nf4_dequantize(KernelBench& bench) {
  struct Weight {
    const char* name;
    int64_t out, in;
  };
  for (const Weight& w : {Weight{"in_proj", 10240, 2560}, Weight{"out_proj", 2560, 5120}}) {
    const std::string shape = fmt::format("2.8b {} {}x{}", w.name, w.out, w.in);
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
    });
  }
}

}  // namespace ssmtune::bench
