// RMSNorm fused with the residual add (forward) and its backward, at the rows and widths of
// mamba-130m (8 x 2048 tokens, 768) and mamba-1.4b (4 x 2048, 2048). The residual stream is fp32.
#include <fmt/format.h>

#include "kernels/cuda/rmsnorm.h"
#include "recipes/bench/entries.h"

namespace ssmtune::bench {

void bench_rmsnorm(KernelBench& bench) {
  struct Shape {
    int64_t rows, dim;
  };
  for (const Shape& sh : {Shape{8 * 2048, 768}, Shape{4 * 2048, 2048}}) {
    const std::string shape = fmt::format("{} x {}", sh.rows, sh.dim);
    bench.attempt("rmsnorm", shape, [&] {
      const int64_t r = sh.rows, d = sh.dim;
      const DeviceBuffer x = random_f32(r * d, -2, 2, 51), add = random_bf16(r * d, -1, 1, 52);
      const DeviceBuffer weight = random_f32(d, 0.5f, 1.5f, 53), dy = random_bf16(r * d, -1, 1, 54);
      // dx accumulates over the repetitions, growing linearly: it stays far from overflow.
      DeviceBuffer dx = random_f32(r * d, -1, 1, 55);
      DeviceBuffer x_out(r * d * 4), y(r * d * 2), rstd(r * 4), dx_act(r * d * 2);
      // Separate buffers where the step may alias (x_out with x, dx_act with dy): repeated runs then
      // see the same inputs; the bytes moved are the same.
      const double f32_rows = 4.0 * r * d, bf16_rows = 2.0 * r * d, vectors = 4.0 * d + 4.0 * r;  // weight, rstd
      // x, add, weight -> x_out, y, rstd
      bench.record("rmsnorm+residual fwd", shape, Bound::bytes, 2 * f32_rows + 2 * bf16_rows + vectors, {}, [&] {
        cuda::rmsnorm_forward(x.as<float>(), add.as<uint16_t>(), x_out.as<float>(), weight.as<float>(),
                              y.as<uint16_t>(), d, rstd.as<float>(), r, d, 1e-5f, bench.stream());
      });
      // x_out, weight, rstd, dy, dx -> dx, dx_act
      bench.record("rmsnorm bwd", shape, Bound::bytes, 3 * f32_rows + 2 * bf16_rows + vectors, {}, [&] {
        cuda::rmsnorm_backward(x_out.as<float>(), weight.as<float>(), rstd.as<float>(), dy.as<uint16_t>(),
                               dx.as<float>(), dx_act.as<uint16_t>(), r, d, bench.stream());
      });
    });
  }
}

}  // namespace ssmtune::bench
