// Causal depthwise conv1d + bias + SiLU on strided token-major views: forward against the formula written
// out, every gradient against central finite differences in double, untouched gaps, float against double,
// and weight/bias sums that do not depend on the thread count.
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <numeric>
#include <limits>
#include <random>
#include <vector>

#include "kernels/cpu/causal_conv1d.h"
#include "tests/catch.h"
#include "tests/kernels/finite_difference.h"

using ssmtune::cpu::causal_conv1d_silu_backward;
using ssmtune::cpu::causal_conv1d_silu_forward;
using ssmtune::test::central_difference;
using ssmtune::test::close_to_fd;
using ssmtune::test::random_values;

namespace {

struct Shape {
  int64_t batch, len, dim, kernel, x_row_stride, dx_row_stride;
};

// len < kernel, len = 1, odd sizes, and row strides wider than dim (the in_proj output holds x then z).
const Shape kShapes[] = {
    {2, 3, 5, 4, 13, 7},
    {3, 7, 6, 3, 6, 9},
    {1, 1, 3, 4, 5, 3},
    {2, 9, 4, 1, 11, 4},
};

// x rows of x_row_stride values; the gap after the first dim values holds NaN, so reading it poisons u.
std::vector<double> strided_input(const Shape& s, std::mt19937_64& rng) {
  auto x = random_values(s.batch * s.len * s.x_row_stride, rng, -2.0, 2.0);
  for (int64_t row = 0; row < s.batch * s.len; ++row) {
    for (int64_t d = s.dim; d < s.x_row_stride; ++d) x[row * s.x_row_stride + d] = std::numeric_limits<double>::quiet_NaN();
  }
  return x;
}

double naive_output(const Shape& s, const std::vector<double>& x, const std::vector<double>& weight,
                    const double* bias, int64_t b, int64_t t, int64_t d) {
  double p = bias ? bias[d] : 0.0;
  for (int64_t k = 0; k < s.kernel; ++k) {
    const int64_t source = t - (s.kernel - 1) + k;
    if (source >= 0) p += weight[d * s.kernel + k] * x[(b * s.len + source) * s.x_row_stride + d];
  }
  return p / (1.0 + std::exp(-p));
}

// L = sum(du * u), whose gradient is what the backward computes for upstream gradient du.
double weighted_output(const Shape& s, const std::vector<double>& x, const std::vector<double>& weight,
                       const double* bias, const std::vector<double>& du) {
  std::vector<double> u(s.batch * s.len * s.dim);
  causal_conv1d_silu_forward(x.data(), s.x_row_stride, weight.data(), bias, u.data(), s.batch, s.len, s.dim,
                             s.kernel);
  return std::inner_product(u.begin(), u.end(), du.begin(), 0.0);
}

}  // namespace

TEST_CASE("causal conv1d forward matches the formula and ignores the gaps of x") {
  std::mt19937_64 rng(21);
  for (const Shape& s : kShapes) {
    const auto x = strided_input(s, rng);
    const auto weight = random_values(s.dim * s.kernel, rng);
    const auto bias = random_values(s.dim, rng);
    for (const bool with_bias : {true, false}) {
      const double* bias_ptr = with_bias ? bias.data() : nullptr;
      std::vector<double> u(s.batch * s.len * s.dim);
      causal_conv1d_silu_forward(x.data(), s.x_row_stride, weight.data(), bias_ptr, u.data(), s.batch, s.len, s.dim,
                                 s.kernel);
      for (int64_t b = 0; b < s.batch; ++b) {
        for (int64_t t = 0; t < s.len; ++t) {
          for (int64_t d = 0; d < s.dim; ++d) {
            INFO("kernel " << s.kernel << " len " << s.len << " b " << b << " t " << t << " d " << d);
            // The same sum in the same order; only exp/division rounding may differ: 1e-14.
            CHECK(u[(b * s.len + t) * s.dim + d] ==
                  Approx(naive_output(s, x, weight, bias_ptr, b, t, d)).epsilon(1e-14).margin(1e-15));
          }
        }
      }
    }
  }
}

TEST_CASE("causal conv1d backward matches finite differences and leaves dx gaps alone") {
  std::mt19937_64 rng(22);
  const double gap_sentinel = 12345.0;
  for (const Shape& s : kShapes) {
    for (const bool with_bias : {true, false}) {
      auto x = strided_input(s, rng);
      auto weight = random_values(s.dim * s.kernel, rng);
      auto bias = random_values(s.dim, rng);
      const auto du = random_values(s.batch * s.len * s.dim, rng);
      const double* bias_ptr = with_bias ? bias.data() : nullptr;
      const auto loss = [&] { return weighted_output(s, x, weight, with_bias ? bias.data() : nullptr, du); };

      // dx is written: its rows start as NaN, its gaps as a sentinel that must survive.
      std::vector<double> dx(s.batch * s.len * s.dx_row_stride, gap_sentinel);
      for (int64_t row = 0; row < s.batch * s.len; ++row) {
        for (int64_t d = 0; d < s.dim; ++d) dx[row * s.dx_row_stride + d] = std::numeric_limits<double>::quiet_NaN();
      }
      // dweight and dbias are accumulated: they start non-zero.
      const auto dweight_before = random_values(weight.size(), rng);
      const auto dbias_before = random_values(bias.size(), rng);
      auto dweight = dweight_before;
      auto dbias = dbias_before;
      causal_conv1d_silu_backward(x.data(), s.x_row_stride, weight.data(), bias_ptr, du.data(), dx.data(),
                                  s.dx_row_stride, dweight.data(), with_bias ? dbias.data() : nullptr, s.batch, s.len,
                                  s.dim, s.kernel);

      INFO("kernel " << s.kernel << " len " << s.len << " dim " << s.dim << " bias " << with_bias);
      for (int64_t row = 0; row < s.batch * s.len; ++row) {
        for (int64_t d = 0; d < s.dim; ++d) {
          INFO("dx row " << row << " channel " << d);
          CHECK(close_to_fd(dx[row * s.dx_row_stride + d], central_difference(x, row * s.x_row_stride + d, loss)));
        }
        for (int64_t d = s.dim; d < s.dx_row_stride; ++d) CHECK(dx[row * s.dx_row_stride + d] == gap_sentinel);
      }
      for (size_t i = 0; i < weight.size(); ++i) {
        INFO("weight index " << i);
        CHECK(close_to_fd(dweight[i] - dweight_before[i], central_difference(weight, i, loss)));
      }
      for (size_t i = 0; i < bias.size(); ++i) {
        INFO("bias index " << i);
        if (with_bias) {
          CHECK(close_to_fd(dbias[i] - dbias_before[i], central_difference(bias, i, loss)));
        } else {
          CHECK(dbias[i] == dbias_before[i]);  // nullptr dbias: nothing written
        }
      }
    }
  }
}

TEST_CASE("causal conv1d without weight and bias gradients still gives dx") {
  std::mt19937_64 rng(23);
  const Shape s = kShapes[0];
  const auto x = strided_input(s, rng);
  const auto weight = random_values(s.dim * s.kernel, rng);
  const auto bias = random_values(s.dim, rng);
  const auto du = random_values(s.batch * s.len * s.dim, rng);
  std::vector<double> dx_all(s.batch * s.len * s.dx_row_stride, 0.0), dx_only(dx_all);
  std::vector<double> dweight(weight.size(), 0.0), dbias(bias.size(), 0.0);
  causal_conv1d_silu_backward(x.data(), s.x_row_stride, weight.data(), bias.data(), du.data(), dx_all.data(),
                              s.dx_row_stride, dweight.data(), dbias.data(), s.batch, s.len, s.dim, s.kernel);
  causal_conv1d_silu_backward(x.data(), s.x_row_stride, weight.data(), bias.data(), du.data(), dx_only.data(),
                              s.dx_row_stride, static_cast<double*>(nullptr), static_cast<double*>(nullptr), s.batch,
                              s.len, s.dim, s.kernel);
  CHECK(dx_only == dx_all);  // the same arithmetic, bit for bit
}

TEST_CASE("causal conv1d float agrees with double") {
  std::mt19937_64 rng(24);
  const Shape s{2, 17, 37, 4, 80, 41};
  const auto x = strided_input(s, rng);
  const auto weight = random_values(s.dim * s.kernel, rng);
  const auto bias = random_values(s.dim, rng);
  const auto du = random_values(s.batch * s.len * s.dim, rng);
  // Round the inputs to float first so both runs see the same numbers.
  const std::vector<float> xf(x.begin(), x.end()), weightf(weight.begin(), weight.end()),
      biasf(bias.begin(), bias.end()), duf(du.begin(), du.end());
  const std::vector<double> xd(xf.begin(), xf.end()), weightd(weightf.begin(), weightf.end()),
      biasd(biasf.begin(), biasf.end()), dud(duf.begin(), duf.end());

  const size_t tokens = s.batch * s.len;
  std::vector<double> ud(tokens * s.dim), dxd(tokens * s.dx_row_stride, 0.0), dweightd(weight.size(), 0.0),
      dbiasd(bias.size(), 0.0);
  std::vector<float> uf(tokens * s.dim), dxf(tokens * s.dx_row_stride, 0.0f), dweightf(weight.size(), 0.0f),
      dbiasf(bias.size(), 0.0f);
  causal_conv1d_silu_forward(xd.data(), s.x_row_stride, weightd.data(), biasd.data(), ud.data(), s.batch, s.len,
                             s.dim, s.kernel);
  causal_conv1d_silu_backward(xd.data(), s.x_row_stride, weightd.data(), biasd.data(), dud.data(), dxd.data(),
                              s.dx_row_stride, dweightd.data(), dbiasd.data(), s.batch, s.len, s.dim, s.kernel);
  causal_conv1d_silu_forward(xf.data(), s.x_row_stride, weightf.data(), biasf.data(), uf.data(), s.batch, s.len,
                             s.dim, s.kernel);
  causal_conv1d_silu_backward(xf.data(), s.x_row_stride, weightf.data(), biasf.data(), duf.data(), dxf.data(),
                              s.dx_row_stride, dweightf.data(), dbiasf.data(), s.batch, s.len, s.dim, s.kernel);

  // float rounds at 6e-8 per operation. u and dx are sums of at most 5 O(1) terms (error ~1e-6);
  // dweight and dbias sum batch*len = 34 such terms (error up to ~1e-5 at worst). 1e-4 absolute bounds both
  // and still fails for any formula difference between the two instantiations.
  for (size_t i = 0; i < ud.size(); ++i) CHECK(std::abs(uf[i] - ud[i]) <= 1e-4);
  for (size_t i = 0; i < dxd.size(); ++i) CHECK(std::abs(dxf[i] - dxd[i]) <= 1e-4);
  for (size_t i = 0; i < dweightd.size(); ++i) CHECK(std::abs(dweightf[i] - dweightd[i]) <= 1e-4);
  for (size_t i = 0; i < dbiasd.size(); ++i) CHECK(std::abs(dbiasf[i] - dbiasd[i]) <= 1e-4);
}

TEST_CASE("causal conv1d weight and bias gradients do not depend on the thread count") {
  std::mt19937_64 rng(25);
  // 130 channels make three channel blocks; batch*len*dim*kernel > 2^14 turns the OpenMP loop on.
  const Shape s{2, 20, 130, 4, 260, 130};
  const auto x = strided_input(s, rng);
  const std::vector<float> xf(x.begin(), x.end());
  const auto weight = random_values(s.dim * s.kernel, rng);
  const auto bias = random_values(s.dim, rng);
  const auto du = random_values(s.batch * s.len * s.dim, rng);
  const std::vector<float> weightf(weight.begin(), weight.end()), biasf(bias.begin(), bias.end()),
      duf(du.begin(), du.end());

  const int saved_threads = omp_get_max_threads();
  std::vector<std::vector<float>> results;
  for (const int threads : {1, 3}) {
    omp_set_num_threads(threads);
    std::vector<float> dx(s.batch * s.len * s.dx_row_stride), dweight(weight.size(), 0.0f), dbias(bias.size(), 0.0f);
    causal_conv1d_silu_backward(xf.data(), s.x_row_stride, weightf.data(), biasf.data(), duf.data(), dx.data(),
                                s.dx_row_stride, dweight.data(), dbias.data(), s.batch, s.len, s.dim, s.kernel);
    dweight.insert(dweight.end(), dbias.begin(), dbias.end());
    results.push_back(dweight);
  }
  omp_set_num_threads(saved_threads);
  CHECK(results[0] == results[1]);  // bit for bit
}
