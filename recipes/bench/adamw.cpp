// AdamW over the flat adapter buffer of mamba-1.4b with LoRA r = 16 on all four projections.
// Bytes-bound: params, grads, m, v read (fp32), params, m, v written.
#include <fmt/format.h>

#include <cmath>

#include "framework/mamba_model.h"
#include "framework/model_sizes.h"
#include "kernels/cuda/adamw.h"
#include "recipes/bench/entries.h"

namespace ssmtune::bench {

void bench_adamw(KernelBench& bench) {
  const MambaConfig config = model_size("mamba-1.4b");
  const int64_t rank = 16;
  int64_t n = 0;
  for (Projection p : kProjections) {
    const auto [out, in] = projection_shape(config, p);
    n += rank * (in + out);  // A [rank, in] and B [out, rank]
  }
  n *= config.n_layer;
  const std::string shape = fmt::format("1.4b r16: {:.1f}M params", n * 1e-6);
  bench.attempt("adamw", shape, [&] {
    DeviceBuffer params = random_f32(n, -0.05f, 0.05f, 71), m = random_f32(n, -1e-3f, 1e-3f, 73);
    DeviceBuffer v = random_f32(n, 0, 1e-6f, 74);  // second moments are non-negative
    const DeviceBuffer grads = random_f32(n, -1e-2f, 1e-2f, 72);
    const double beta1 = 0.9, beta2 = 0.999;
    const double t = 10;  // the update number, for the bias corrections
    bench.record("adamw", shape, Bound::bytes, 7.0 * 4 * n, {}, [&] {
      cuda::adamw_update(params.as<float>(), grads.as<float>(), m.as<float>(), v.as<float>(), n, 1e-4, beta1, beta2,
                         1e-8, 0.01, 1 - std::pow(beta1, t), 1 - std::pow(beta2, t), bench.stream());
    });
  });
}

}  // namespace ssmtune::bench
