// The recurrent step ops (kernels/cpu/recurrent_step.h) fed a sequence token by token give what the
// full-sequence ops give over it: every conv and scan output, and at the end the conv window holds the
// last K-1 inputs and the scan state equals the full scan's final state. Strided views as in the model
// (x and z in the in_proj row, B and C in the x_proj row), several sequences stepped together.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "kernels/cpu/causal_conv1d.h"
#include "kernels/cpu/recurrent_step.h"
#include "kernels/cpu/selective_scan.h"
#include "tests/catch.h"
#include "tests/kernels/finite_difference.h"

using namespace ssmtune;

namespace {

// The step ops evaluate the full-sequence expressions in the same order, so in double they agree to the
// last bits; 1e-13 relative (a few hundred ulps of the largest value) leaves room for a compiler that
// contracts differently in the two translation units and still catches any wrong term (>= 1e-3).
constexpr double kTolerance = 1e-13;

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

// max |a - b| / max |b|; infinity for a non-finite a.
double relative_max_error(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double diff = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    diff = std::max(diff, std::abs(a[i] - b[i]));
  }
  return diff / std::max(max_abs(b), 1e-300);
}

// Row (b, t) of a token-major [batch, len, stride] array copied into row b of a [batch, stride] one.
std::vector<double> token_rows(const std::vector<double>& full, int64_t batch, int64_t len, int64_t stride, int64_t t) {
  std::vector<double> out(batch * stride);
  for (int64_t b = 0; b < batch; ++b)
    std::copy_n(full.begin() + (b * len + t) * stride, stride, out.begin() + b * stride);
  return out;
}

}  // namespace

TEST_CASE("conv1d + SiLU stepped token by token equals the full-sequence conv") {
  std::mt19937_64 rng(11);
  for (const int64_t kernel : {1, 2, 4}) {
    for (const bool with_bias : {true, false}) {
      INFO("kernel " << kernel << ", bias " << with_bias);
      const int64_t batch = 3, len = 9, dim = 5, ldx = 2 * dim + 1;  // x: the first half of an in_proj row
      const std::vector<double> x = test::random_values(batch * len * ldx, rng);
      const std::vector<double> weight = test::random_values(dim * kernel, rng, -0.5, 0.5);
      const std::vector<double> bias = test::random_values(dim, rng, -0.5, 0.5);
      const double* b = with_bias ? bias.data() : nullptr;
      std::vector<double> full(batch * len * dim);
      cpu::causal_conv1d_silu_forward<double>(x.data(), ldx, weight.data(), b, full.data(), batch, len, dim, kernel,
                                              nullptr, nullptr);

      std::vector<double> window(batch * dim * (kernel - 1), 0.0), stepped(batch * len * dim);
      for (int64_t t = 0; t < len; ++t) {
        const std::vector<double> x_t = token_rows(x, batch, len, ldx, t);
        std::vector<double> u(batch * dim, NAN);
        cpu::causal_conv1d_silu_step<double>(x_t.data(), ldx, weight.data(), b, window.data(), u.data(), batch, dim,
                                             kernel);
        for (int64_t r = 0; r < batch; ++r)
          std::copy_n(u.begin() + r * dim, dim, stepped.begin() + (r * len + t) * dim);
      }
      CHECK(relative_max_error(stepped, full) < kTolerance);
      // The window ends holding the last K-1 inputs of each channel, oldest first.
      for (int64_t r = 0; r < batch; ++r)
        for (int64_t d = 0; d < dim; ++d)
          for (int64_t k = 0; k < kernel - 1; ++k)
            CHECK(window[(r * dim + d) * (kernel - 1) + k] == x[(r * len + len - (kernel - 1) + k) * ldx + d]);
    }
  }
}

TEST_CASE("selective scan stepped token by token equals the full-sequence scan") {
  std::mt19937_64 rng(12);
  const int64_t batch = 2, len = 11, dim = 6, state = 4;
  const int64_t bc_stride = 3 + 2 * state, z_stride = 2 * dim + 1;  // [dt_r (3) | B | C] and [x | z | pad]
  const std::vector<double> u = test::random_values(batch * len * dim, rng);
  const std::vector<double> delta = test::random_values(batch * len * dim, rng);
  const std::vector<double> delta_bias = test::random_values(dim, rng, -1, 0);
  const std::vector<double> A = test::random_values(dim * state, rng, -1.5, -0.2);
  const std::vector<double> xdbl = test::random_values(batch * len * bc_stride, rng);
  const std::vector<double> Dskip = test::random_values(dim, rng);
  const std::vector<double> xz = test::random_values(batch * len * z_stride, rng, -2, 2);
  const double* B = xdbl.data() + 3;
  const double* C = xdbl.data() + 3 + state;
  const double* z = xz.data() + dim;

  const cpu::SelectiveScanShape shape{batch, len, dim, state, 4};
  const int64_t chunks = cpu::selective_scan_num_chunks(shape);
  std::vector<double> full(batch * len * dim), chunk_states(batch * chunks * dim * state);
  cpu::selective_scan_forward<double>(shape, u.data(), delta.data(), delta_bias.data(), A.data(), B, C, bc_stride,
                                      Dskip.data(), z, z_stride, full.data(), dim, chunk_states.data(), nullptr,
                                      nullptr);

  std::vector<double> h(batch * dim * state, 0.0), stepped(batch * len * dim);
  for (int64_t t = 0; t < len; ++t) {
    const std::vector<double> u_t = token_rows(u, batch, len, dim, t), delta_t = token_rows(delta, batch, len, dim, t);
    const std::vector<double> xdbl_t = token_rows(xdbl, batch, len, bc_stride, t);
    const std::vector<double> xz_t = token_rows(xz, batch, len, z_stride, t);
    std::vector<double> out(batch * dim, NAN);
    cpu::selective_scan_step<double>(u_t.data(), delta_t.data(), delta_bias.data(), A.data(), xdbl_t.data() + 3,
                                     xdbl_t.data() + 3 + state, bc_stride, Dskip.data(), xz_t.data() + dim, z_stride,
                                     h.data(), out.data(), batch, dim, state);
    for (int64_t r = 0; r < batch; ++r) std::copy_n(out.begin() + r * dim, dim, stepped.begin() + (r * len + t) * dim);
  }
  CHECK(relative_max_error(stepped, full) < kTolerance);
  // The carried state is the full scan's state after the last token (the last chunk's end state).
  std::vector<double> final_states(batch * dim * state);
  for (int64_t b = 0; b < batch; ++b)
    std::copy_n(chunk_states.begin() + (b * chunks + chunks - 1) * dim * state, dim * state,
                final_states.begin() + b * dim * state);
  CHECK(relative_max_error(h, final_states) < kTolerance);
}
