// RMSNorm: forward against the formula written out, every gradient against central finite differences in
// double, float against double, a dweight sum that does not depend on the thread count, and strided rows
// (falcon-mamba's norm of column ranges of the x_proj output) equal to contiguous ones, bit for bit.
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/cpu/rmsnorm.h"
#include "tests/catch.h"
#include "tests/kernels/finite_difference.h"

using ssmtune::cpu::rmsnorm_backward;
using ssmtune::cpu::rmsnorm_forward;
using ssmtune::test::central_difference;
using ssmtune::test::close_to_fd;
using ssmtune::test::random_values;

namespace {

std::vector<float> to_float(const std::vector<double>& v) { return {v.begin(), v.end()}; }

// L = sum(dy * y), whose gradient is what rmsnorm_backward computes for upstream gradient dy.
double weighted_output(const std::vector<double>& x, const double* weight, const std::vector<double>& dy,
                       int64_t rows, int64_t dim, double eps) {
  std::vector<double> y(x.size()), rstd(rows);
  rmsnorm_forward(x.data(), weight, y.data(), rstd.data(), rows, dim, eps);
  return std::inner_product(y.begin(), y.end(), dy.begin(), 0.0);
}

}  // namespace

TEST_CASE("rmsnorm forward matches x / sqrt(mean(x^2) + eps) * weight") {
  std::mt19937_64 rng(11);
  const int64_t rows = 5, dim = 13;
  const double eps = 1e-5;
  const auto x = random_values(rows * dim, rng, -2.0, 2.0);
  const auto weight = random_values(dim, rng, 0.5, 1.5);
  for (const bool weighted : {true, false}) {
    std::vector<double> y(rows * dim), rstd(rows);
    rmsnorm_forward(x.data(), weighted ? weight.data() : nullptr, y.data(), rstd.data(), rows, dim, eps);
    for (int64_t r = 0; r < rows; ++r) {
      double mean_sq = 0.0;
      for (int64_t i = 0; i < dim; ++i) mean_sq += x[r * dim + i] * x[r * dim + i] / dim;
      // Same math in a different order (division, per-term mean): differs by a few ulp, so 1e-13.
      CHECK(rstd[r] == Approx(1.0 / std::sqrt(mean_sq + eps)).epsilon(1e-13));
      for (int64_t i = 0; i < dim; ++i) {
        const double expected = x[r * dim + i] / std::sqrt(mean_sq + eps) * (weighted ? weight[i] : 1.0);
        CHECK(y[r * dim + i] == Approx(expected).epsilon(1e-13).margin(1e-15));
      }
    }
  }
}

TEST_CASE("rmsnorm backward matches finite differences and accumulates") {
  std::mt19937_64 rng(12);
  const double eps = 1e-5;
  for (const int64_t dim : {1, 7, 13}) {
    for (const bool weighted : {true, false}) {
      const int64_t rows = 3;
      auto x = random_values(rows * dim, rng, -2.0, 2.0);
      auto weight = random_values(dim, rng, 0.5, 1.5);
      const auto dy = random_values(rows * dim, rng);
      const double* weight_ptr = weighted ? weight.data() : nullptr;

      std::vector<double> y(rows * dim), rstd(rows);
      rmsnorm_forward(x.data(), weight_ptr, y.data(), rstd.data(), rows, dim, eps);
      // Start from non-zero gradients: both outputs are accumulated.
      const auto dx_before = random_values(rows * dim, rng);
      const auto dweight_before = random_values(dim, rng);
      auto dx = dx_before;
      auto dweight = dweight_before;
      rmsnorm_backward(x.data(), weight_ptr, rstd.data(), dy.data(), dx.data(), weighted ? dweight.data() : nullptr,
                       rows, dim);

      const auto loss = [&] { return weighted_output(x, weight_ptr, dy, rows, dim, eps); };
      for (size_t i = 0; i < x.size(); ++i) {
        INFO("dim " << dim << " weighted " << weighted << " x index " << i);
        CHECK(close_to_fd(dx[i] - dx_before[i], central_difference(x, i, loss)));
      }
      if (!weighted) continue;
      for (size_t i = 0; i < weight.size(); ++i) {
        INFO("dim " << dim << " weight index " << i);
        CHECK(close_to_fd(dweight[i] - dweight_before[i], central_difference(weight, i, loss)));
      }
    }
  }
}

TEST_CASE("rmsnorm float agrees with double") {
  std::mt19937_64 rng(13);
  const int64_t rows = 9, dim = 301;
  const float eps = 1e-5f;
  const auto x = random_values(rows * dim, rng, -2.0, 2.0);
  const auto weight = random_values(dim, rng, 0.5, 1.5);
  const auto dy = random_values(rows * dim, rng);
  // Inputs are rounded to float first, so both runs see the same numbers.
  const auto xf = to_float(x), weightf = to_float(weight), dyf = to_float(dy);
  const std::vector<double> xd(xf.begin(), xf.end()), weightd(weightf.begin(), weightf.end()),
      dyd(dyf.begin(), dyf.end());

  std::vector<double> yd(rows * dim), rstdd(rows), dxd(rows * dim, 0.0), dweightd(dim, 0.0);
  rmsnorm_forward(xd.data(), weightd.data(), yd.data(), rstdd.data(), rows, dim, double(eps));
  rmsnorm_backward(xd.data(), weightd.data(), rstdd.data(), dyd.data(), dxd.data(), dweightd.data(), rows, dim);
  std::vector<float> yf(rows * dim), rstdf(rows), dxf(rows * dim, 0.0f), dweightf(dim, 0.0f);
  rmsnorm_forward(xf.data(), weightf.data(), yf.data(), rstdf.data(), rows, dim, eps);
  rmsnorm_backward(xf.data(), weightf.data(), rstdf.data(), dyf.data(), dxf.data(), dweightf.data(), rows, dim);

  // float rounds at 6e-8 per operation; the longest sums here have 301 terms of O(1) values whose
  // rounding errors grow at worst linearly, ~2e-5 relative to the terms' size, typically ~1e-6. Values
  // are O(1) (y, dx) or O(rows) (dweight), so 1e-4 absolute bounds the worst case and still fails for any
  // formula difference between the two instantiations.
  for (size_t i = 0; i < yd.size(); ++i) {
    CHECK(std::abs(yf[i] - yd[i]) <= 1e-4);
    CHECK(std::abs(dxf[i] - dxd[i]) <= 1e-4);
  }
  for (int64_t i = 0; i < dim; ++i) CHECK(std::abs(dweightf[i] - dweightd[i]) <= 1e-4);
}

TEST_CASE("rmsnorm dweight does not depend on the thread count") {
  std::mt19937_64 rng(14);
  // Large enough (rows * dim > 2^14) for the OpenMP loops to run in parallel.
  const int64_t rows = 64, dim = 301;
  const auto x = to_float(random_values(rows * dim, rng, -2.0, 2.0));
  const auto weight = to_float(random_values(dim, rng, 0.5, 1.5));
  const auto dy = to_float(random_values(rows * dim, rng));
  std::vector<float> y(rows * dim), rstd(rows);
  rmsnorm_forward(x.data(), weight.data(), y.data(), rstd.data(), rows, dim, 1e-5f);

  const int saved_threads = omp_get_max_threads();
  std::vector<std::vector<float>> dweights;
  for (const int threads : {1, 3}) {
    omp_set_num_threads(threads);
    std::vector<float> dx(rows * dim, 0.0f), dweight(dim, 0.0f);
    rmsnorm_backward(x.data(), weight.data(), rstd.data(), dy.data(), dx.data(), dweight.data(), rows, dim);
    dweights.push_back(dweight);
  }
  omp_set_num_threads(saved_threads);
  CHECK(dweights[0] == dweights[1]);  // bit for bit
}

TEST_CASE("rmsnorm on strided rows equals the contiguous rows and leaves the gaps alone") {
  std::mt19937_64 rng(15);
  const double eps = 1e-6, nan = std::numeric_limits<double>::quiet_NaN(), sentinel = 1234.5;
  // Every stride different and above dim, so a mixed-up stride reads or writes the wrong element.
  const int64_t rows = 6, dim = 5, ldx = 9, ldy = 7, lddy = 8, lddx = 6;
  const auto x = random_values(rows * ldx, rng, -2.0, 2.0);
  const auto dy = random_values(rows * lddy, rng);
  const auto weight = random_values(dim, rng, 0.5, 1.5);
  std::vector<double> x_rows(rows * dim), dy_rows(rows * dim);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < dim; ++i) {
      x_rows[r * dim + i] = x[r * ldx + i];
      dy_rows[r * dim + i] = dy[r * lddy + i];
    }
  for (const bool weighted : {true, false}) {
    INFO("weighted " << weighted);
    const double* w = weighted ? weight.data() : nullptr;
    std::vector<double> y_ref(rows * dim), rstd_ref(rows), dx_ref(rows * dim, 0.0), dweight_ref(dim, 0.0);
    rmsnorm_forward(x_rows.data(), w, y_ref.data(), rstd_ref.data(), rows, dim, eps);
    rmsnorm_backward(x_rows.data(), w, rstd_ref.data(), dy_rows.data(), dx_ref.data(), dweight_ref.data(), rows, dim);

    std::vector<double> y(rows * ldy, sentinel), rstd(rows, nan);
    rmsnorm_forward(x.data(), ldx, w, y.data(), ldy, rstd.data(), rows, dim, eps);
    CHECK(rstd == rstd_ref);
    // Written, not accumulated: dx starts as NaN, which any read of it would carry into the result.
    std::vector<double> dx(rows * lddx, nan), dweight(dim, 0.0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = dim; i < lddx; ++i) dx[r * lddx + i] = sentinel;
    rmsnorm_backward(x.data(), ldx, w, rstd.data(), dy.data(), lddy, dx.data(), lddx, false, dweight.data(), rows,
                     dim);
    CHECK(dweight == dweight_ref);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t i = 0; i < dim; ++i) {
        CHECK(y[r * ldy + i] == y_ref[r * dim + i]);
        CHECK(dx[r * lddx + i] == dx_ref[r * dim + i]);  // 0 + d == d exactly
      }
      for (int64_t i = dim; i < ldy; ++i) CHECK(y[r * ldy + i] == sentinel);
      for (int64_t i = dim; i < lddx; ++i) CHECK(dx[r * lddx + i] == sentinel);
    }
  }
}
