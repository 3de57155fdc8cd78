// The CUDA AdamW update, sum of squares and scale against the CPU reference (kernels/cpu/adamw.h) in
// float: a few steps of AdamW, the sum's determinism and accuracy, and the scale bit for bit.
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "kernels/cpu/adamw.h"
#include "kernels/cuda/adamw.h"
#include "tests/catch.h"
#include "tests/kernels/device_buffer.h"
#include "tests/kernels/finite_difference.h"

using namespace ssmtune;
using testing::DeviceBuffer;
using testing::relative_error;

namespace {

const std::vector<int64_t> kSizes{1, 1000, 12345, (1 << 20) + 3};

std::vector<float> random_floats(size_t n, std::mt19937_64& rng, double lo, double hi) {
  const std::vector<double> values = test::random_values(n, rng, lo, hi);
  return {values.begin(), values.end()};
}
std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

}  // namespace

TEST_CASE("CUDA AdamW follows the CPU update in float over several steps") {
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  const double lr = 2e-3, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.01;
  for (const int64_t n : kSizes) {
    INFO("seed " << seed << ", n " << n);
    std::vector<float> params = random_floats(n, rng, -1.0, 1.0), m(n, 0.0f), v(n, 0.0f);
    DeviceBuffer<float> d_params(params), d_m(m), d_v(v), d_grads(n);
    for (int step = 1; step <= 4; ++step) {
      INFO("step " << step);
      // Gradients spanning several orders of magnitude, as adapter gradients do.
      std::vector<float> grads = random_floats(n, rng, -1.0, 1.0);
      const std::vector<double> exponents = test::random_values(n, rng, -4.0, 0.0);
      for (int64_t i = 0; i < n; ++i) grads[i] *= static_cast<float>(std::pow(10.0, exponents[i]));
      d_grads.upload(grads);
      const double bc1 = 1.0 - std::pow(beta1, step), bc2 = 1.0 - std::pow(beta2, step);
      cuda::adamw_update(d_params.get(), d_grads.get(), d_m.get(), d_v.get(), n, lr, beta1, beta2, eps, weight_decay,
                         bc1, bc2, nullptr);
      cpu::adamw_update<float>(params.data(), grads.data(), m.data(), v.data(), n, lr, beta1, beta2, eps, weight_decay,
                               bc1, bc2);
      // The same float formula in the same order with every operation rounded on its own: equal bit for
      // bit unless the host compiler fuses multiply-adds, which moves each result by an ulp or so (1.2e-7
      // relative) per operation and step; 1e-6 allows that over these steps and catches any wrong term.
      CHECK(relative_error(to_double(d_params.download()), to_double(params)) < 1e-6);
      CHECK(relative_error(to_double(d_m.download()), to_double(m)) < 1e-6);
      CHECK(relative_error(to_double(d_v.download()), to_double(v)) < 1e-6);
      CHECK(d_grads.download() == grads);
    }
  }
}

TEST_CASE("CUDA sum of squares is deterministic and matches the CPU double sum") {
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  for (const int64_t n : {int64_t{0}, int64_t{1}, int64_t{1000}, int64_t{(1 << 24) + 5}}) {
    INFO("seed " << seed << ", n " << n);
    const std::vector<float> x = random_floats(n, rng, -3.0, 3.0);
    DeviceBuffer<float> d_x(x);
    DeviceBuffer<uint8_t> workspace(cuda::sum_of_squares_workspace_bytes(n));
    const double first = cuda::sum_of_squares(d_x.get(), n, workspace.get(), nullptr);
    workspace.poison();
    const double second = cuda::sum_of_squares(d_x.get(), n, workspace.get(), nullptr);
    CHECK(first == second);  // bit for bit: a fixed grid and a fixed order
    // Each square is exact in double and every partial sum is of positive terms, so each addition is off
    // by at most 2^-53 of the total: the CPU's n - 1 additions in a row, the GPU's chains of at most
    // n / 131072 + 20 (per thread, then two trees); |gpu - cpu| <= (n + 64) * 2^-53 * total. One element
    // lost or counted twice moves the sum by ~1/n of it, far more.
    const double reference = cpu::sum_of_squares<float>(x.data(), n);
    CHECK(std::abs(first - reference) <= static_cast<double>(n + 64) * std::ldexp(1.0, -53) * reference);
    CHECK(d_x.download() == x);
  }
}

TEST_CASE("CUDA scale equals the CPU scale bit for bit") {
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  for (const int64_t n : kSizes) {
    INFO("seed " << seed << ", n " << n);
    std::vector<float> x = random_floats(n, rng, -2.0, 2.0);
    DeviceBuffer<float> d_x(x);
    const double factor = test::random_values(1, rng, 0.1, 1.0)[0];
    cuda::scale(d_x.get(), n, factor, nullptr);
    cpu::scale<float>(x.data(), n, factor);  // one float multiply by the same float factor
    CHECK(d_x.download() == x);
  }
}
