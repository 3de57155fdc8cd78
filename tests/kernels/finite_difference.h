// Helpers shared by the kernel gradient checks: seeded random inputs and central finite differences in
// double precision.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <random>
#include <vector>

namespace ssmtune::test {

inline std::vector<double> random_values(size_t n, std::mt19937_64& rng, double lo = -1.0, double hi = 1.0) {
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<double> v(n);
  for (double& e : v) e = dist(rng);
  return v;
}

// Central differences in double: truncation error ~ step^2 * |L'''| ~ 1e-12 and rounding error
// ~ 1e-16 * |L| / step ~ 1e-10 for the O(1)-sized losses of these tests, so 1e-7 (relative, with an
// absolute floor of 1e-7) leaves two orders of margin and still catches any wrong term (errors of 1e-2
// or more).
constexpr double kFdStep = 1e-6;
constexpr double kFdTolerance = 1e-7;

inline bool close_to_fd(double analytic, double fd) {
  return std::abs(analytic - fd) <= kFdTolerance * std::max(1.0, std::abs(fd));
}

// dL/dvalues[i] by central difference; loss() reads `values`, which is restored afterwards.
template <typename Loss>
double central_difference(std::vector<double>& values, size_t i, Loss loss) {
  const double saved = values[i];
  values[i] = saved + kFdStep;
  const double plus = loss();
  values[i] = saved - kFdStep;
  const double minus = loss();
  values[i] = saved;
  return (plus - minus) / (2 * kFdStep);
}

}  // namespace ssmtune::test
