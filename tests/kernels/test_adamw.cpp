// AdamW and the clipping reductions (kernels/cpu/adamw.h) against the update written out by hand.
#include <cmath>

#include "kernels/cpu/adamw.h"
#include "tests/catch.h"

using namespace ssmtune;

TEST_CASE("adamw matches torch.optim.AdamW's update over two steps") {
  const double lr = 0.01, b1 = 0.9, b2 = 0.99, eps = 1e-8, wd = 0.1;
  std::vector<double> p{0.5, -1.0, 2.0}, m(3, 0.0), v(3, 0.0);
  const std::vector<std::vector<double>> grads{{0.1, -0.2, 0.3}, {-0.05, 0.4, 0.0}};
  std::vector<double> ref_p = p, ref_m(3, 0.0), ref_v(3, 0.0);
  for (int t = 1; t <= 2; ++t) {
    const std::vector<double>& g = grads[t - 1];
    cpu::adamw_update<double>(p.data(), g.data(), m.data(), v.data(), 3, lr, b1, b2, eps, wd, 1 - std::pow(b1, t),
                              1 - std::pow(b2, t));
    for (int i = 0; i < 3; ++i) {
      ref_p[i] -= lr * wd * ref_p[i];
      ref_m[i] = b1 * ref_m[i] + (1 - b1) * g[i];
      ref_v[i] = b2 * ref_v[i] + (1 - b2) * g[i] * g[i];
      const double mhat = ref_m[i] / (1 - std::pow(b1, t)), vhat = ref_v[i] / (1 - std::pow(b2, t));
      ref_p[i] -= lr * mhat / (std::sqrt(vhat) + eps);
    }
  }
  // Same formula, regrouped: equal to a few ulps.
  for (int i = 0; i < 3; ++i) {
    CHECK(p[i] == Approx(ref_p[i]).epsilon(1e-13));
    CHECK(m[i] == Approx(ref_m[i]).epsilon(1e-13));
    CHECK(v[i] == Approx(ref_v[i]).epsilon(1e-13));
  }
}

TEST_CASE("sum of squares and scale") {
  std::vector<float> x{3.0f, -4.0f, 12.0f};
  CHECK(cpu::sum_of_squares<float>(x.data(), 3) == 169.0);
  cpu::scale<float>(x.data(), 3, 0.5);
  CHECK(x == std::vector<float>{1.5f, -2.0f, 6.0f});
}
