// Causal depthwise conv1d + bias + SiLU on strided token-major views: forward against the formula written
// out, every gradient against central finite differences in double, untouched gaps, float against double,
// and weight/bias sums that do not depend on the thread count. With document starts, history and d_tail:
// the same checks, a packed row against its documents run alone, and a row split into slices against
// the unsplit row.
#include <omp.h>

#include <cmath>
#include <algorithm>
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
using ssmtune::cpu::causal_conv1d_silu_history_grad;
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
                             s.kernel, nullptr, nullptr);
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
                                 s.kernel, nullptr, nullptr);
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
                                  s.dim, s.kernel, nullptr, nullptr, nullptr);

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
                              s.dx_row_stride, dweight.data(), dbias.data(), s.batch, s.len, s.dim, s.kernel, nullptr, nullptr, nullptr);
  causal_conv1d_silu_backward(x.data(), s.x_row_stride, weight.data(), bias.data(), du.data(), dx_only.data(),
                              s.dx_row_stride, static_cast<double*>(nullptr), static_cast<double*>(nullptr), s.batch,
                              s.len, s.dim, s.kernel, nullptr, nullptr, nullptr);
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
                             s.dim, s.kernel, nullptr, nullptr);
  causal_conv1d_silu_backward(xd.data(), s.x_row_stride, weightd.data(), biasd.data(), dud.data(), dxd.data(),
                              s.dx_row_stride, dweightd.data(), dbiasd.data(), s.batch, s.len, s.dim, s.kernel, nullptr, nullptr, nullptr);
  causal_conv1d_silu_forward(xf.data(), s.x_row_stride, weightf.data(), biasf.data(), uf.data(), s.batch, s.len,
                             s.dim, s.kernel, nullptr, nullptr);
  causal_conv1d_silu_backward(xf.data(), s.x_row_stride, weightf.data(), biasf.data(), duf.data(), dxf.data(),
                              s.dx_row_stride, dweightf.data(), dbiasf.data(), s.batch, s.len, s.dim, s.kernel, nullptr, nullptr, nullptr);

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
                                s.dx_row_stride, dweight.data(), dbias.data(), s.batch, s.len, s.dim, s.kernel, nullptr, nullptr, nullptr);
    dweight.insert(dweight.end(), dbias.begin(), dbias.end());
    results.push_back(dweight);
  }
  omp_set_num_threads(saved_threads);
  CHECK(results[0] == results[1]);  // bit for bit
}

// Document boundaries and slices (packed documents, context parallelism): doc_start masks the taps before
// each token's document, history stands in for the inputs before the slice, d_tail/d_history carry the
// gradient across a slice boundary.
namespace {

// A row's document starts: the position of each token's document start given the first token of every
// document (relative to the slice: `offset` is the slice's first position in the whole row).
std::vector<int32_t> doc_start_of(const std::vector<int64_t>& starts, int64_t offset, int64_t len) {
  std::vector<int32_t> out(len);
  for (int64_t t = 0; t < len; ++t) {
    int64_t start = 0;
    for (const int64_t s : starts) {
      if (s <= offset + t) start = s;
    }
    out[t] = static_cast<int32_t>(start - offset);
  }
  return out;
}

struct BoundaryCase {
  Shape shape;
  std::vector<std::vector<int64_t>> starts;  // per row: the first position of each document
  bool with_history;
};

// Documents of one token, documents shorter and longer than the kernel, a document that began before the
// slice (a negative start, also one closer than K-1 so that part of the history is another document's),
// and rows without boundaries.
const BoundaryCase kBoundaryCases[] = {
    {{2, 11, 5, 4, 9, 7}, {{0, 1, 3, 8}, {-2, 4, 5}}, true},
    {{3, 9, 3, 3, 4, 3}, {{-7, 2}, {0}, {-1, 6, 7, 8}}, true},
    {{1, 7, 6, 4, 6, 8}, {{0, 2, 5}}, false},
    {{2, 6, 2, 1, 3, 2}, {{0, 3}, {-1, 1, 2}}, true},
};

std::vector<int32_t> doc_starts(const BoundaryCase& c) {
  std::vector<int32_t> all;
  for (const auto& row : c.starts) {
    const auto r = doc_start_of(row, 0, c.shape.len);
    all.insert(all.end(), r.begin(), r.end());
  }
  return all;
}

// in[b, s, d] as the header defines it: x, history before the slice, zero before the token's document.
double naive_boundary_output(const Shape& s, const std::vector<double>& x, const std::vector<double>& history,
                             const std::vector<int32_t>& doc_start, const std::vector<double>& weight,
                             const std::vector<double>& bias, int64_t b, int64_t t, int64_t d) {
  double p = bias[d];
  for (int64_t k = 0; k < s.kernel; ++k) {
    const int64_t source = t - (s.kernel - 1) + k;
    if (source < doc_start[b * s.len + t]) continue;
    if (source >= 0) {
      p += weight[d * s.kernel + k] * x[(b * s.len + source) * s.x_row_stride + d];
    } else if (!history.empty()) {
      p += weight[d * s.kernel + k] * history[(b * (s.kernel - 1) + source + s.kernel - 1) * s.dim + d];
    }
  }
  return p / (1.0 + std::exp(-p));
}

}  // namespace

TEST_CASE("causal conv1d with document starts and history matches the formula") {
  std::mt19937_64 rng(26);
  for (const BoundaryCase& c : kBoundaryCases) {
    const Shape& s = c.shape;
    const auto x = strided_input(s, rng);
    const auto weight = random_values(s.dim * s.kernel, rng);
    const auto bias = random_values(s.dim, rng);
    const auto history = c.with_history ? random_values(s.batch * (s.kernel - 1) * s.dim, rng) : std::vector<double>{};
    const auto doc_start = doc_starts(c);
    std::vector<double> u(s.batch * s.len * s.dim);
    causal_conv1d_silu_forward(x.data(), s.x_row_stride, weight.data(), bias.data(), u.data(), s.batch, s.len, s.dim,
                               s.kernel, doc_start.data(), c.with_history ? history.data() : nullptr);
    for (int64_t b = 0; b < s.batch; ++b) {
      for (int64_t t = 0; t < s.len; ++t) {
        for (int64_t d = 0; d < s.dim; ++d) {
          INFO("kernel " << s.kernel << " b " << b << " t " << t << " d " << d);
          // The same sum in the same order: only exp/division rounding may differ.
          CHECK(u[(b * s.len + t) * s.dim + d] ==
                Approx(naive_boundary_output(s, x, history, doc_start, weight, bias, b, t, d))
                    .epsilon(1e-14)
                    .margin(1e-15));
        }
      }
    }
  }
}

TEST_CASE("causal conv1d gradients with document starts, history and d_tail match finite differences") {
  std::mt19937_64 rng(27);
  for (const BoundaryCase& c : kBoundaryCases) {
    const Shape& s = c.shape;
    const int64_t K1 = s.kernel - 1;
    auto x = strided_input(s, rng);
    auto weight = random_values(s.dim * s.kernel, rng);
    auto bias = random_values(s.dim, rng);
    // A zero history where the case has none: its gradient is still defined (null history reads zeros).
    auto history = c.with_history ? random_values(s.batch * K1 * s.dim, rng) : std::vector<double>(s.batch * K1 * s.dim);
    const auto du = random_values(s.batch * s.len * s.dim, rng);
    const auto d_tail = random_values(s.batch * K1 * s.dim, rng);
    const auto doc_start = doc_starts(c);
    const double* history_arg = c.with_history ? history.data() : nullptr;
    // L = sum(du * u) + sum(d_tail * last K-1 inputs of each row): d_tail is the gradient that reaches those
    // inputs from outside the slice, so dL/dx is what the backward writes with it.
    const auto loss = [&] {
      std::vector<double> u(s.batch * s.len * s.dim);
      causal_conv1d_silu_forward(x.data(), s.x_row_stride, weight.data(), bias.data(), u.data(), s.batch, s.len,
                                 s.dim, s.kernel, doc_start.data(), c.with_history ? history.data() : nullptr);
      double l = std::inner_product(u.begin(), u.end(), du.begin(), 0.0);
      for (int64_t b = 0; b < s.batch; ++b) {
        for (int64_t j = 0; j < K1; ++j) {
          for (int64_t d = 0; d < s.dim; ++d)
            l += d_tail[(b * K1 + j) * s.dim + d] * x[(b * s.len + s.len - K1 + j) * s.x_row_stride + d];
        }
      }
      return l;
    };

    std::vector<double> dx(s.batch * s.len * s.dx_row_stride, std::numeric_limits<double>::quiet_NaN());
    std::vector<double> dweight(weight.size(), 0.0), dbias(bias.size(), 0.0);
    causal_conv1d_silu_backward(x.data(), s.x_row_stride, weight.data(), bias.data(), du.data(), dx.data(),
                                s.dx_row_stride, dweight.data(), dbias.data(), s.batch, s.len, s.dim, s.kernel,
                                doc_start.data(), history_arg, d_tail.data());
    std::vector<double> d_history(history.size(), std::numeric_limits<double>::quiet_NaN());
    causal_conv1d_silu_history_grad(x.data(), s.x_row_stride, weight.data(), bias.data(), du.data(), s.batch, s.len,
                                    s.dim, s.kernel, doc_start.data(), history_arg, d_history.data());

    INFO("kernel " << s.kernel << " len " << s.len << " history " << c.with_history);
    for (int64_t row = 0; row < s.batch * s.len; ++row) {
      for (int64_t d = 0; d < s.dim; ++d) {
        INFO("dx row " << row << " channel " << d);
        CHECK(close_to_fd(dx[row * s.dx_row_stride + d], central_difference(x, row * s.x_row_stride + d, loss)));
      }
    }
    for (size_t i = 0; i < history.size(); ++i) {
      INFO("history index " << i);
      CHECK(close_to_fd(d_history[i], central_difference(history, i, loss)));
    }
    for (size_t i = 0; i < weight.size(); ++i) {
      INFO("weight index " << i);
      CHECK(close_to_fd(dweight[i], central_difference(weight, i, loss)));
    }
    for (size_t i = 0; i < bias.size(); ++i) {
      INFO("bias index " << i);
      CHECK(close_to_fd(dbias[i], central_difference(bias, i, loss)));
    }
  }
}

TEST_CASE("causal conv1d of a packed row equals its documents run separately") {
  std::mt19937_64 rng(28);
  // Two rows of three and two documents (one shorter than the kernel); x strided as in the step.
  const int64_t len = 12, dim = 7, kernel = 4, ldx = 16, lddx = 9;
  const std::vector<std::vector<int64_t>> starts{{0, 5, 7}, {0, 9}};
  const int64_t batch = static_cast<int64_t>(starts.size());
  const Shape packed{batch, len, dim, kernel, ldx, lddx};
  const auto x = strided_input(packed, rng);
  const auto weight = random_values(dim * kernel, rng);
  const auto bias = random_values(dim, rng);
  const auto du = random_values(batch * len * dim, rng);
  std::vector<int32_t> doc_start;
  for (const auto& row : starts) {
    const auto r = doc_start_of(row, 0, len);
    doc_start.insert(doc_start.end(), r.begin(), r.end());
  }
  std::vector<double> u(batch * len * dim), dx(batch * len * lddx, 0.0), dweight(weight.size(), 0.0),
      dbias(bias.size(), 0.0);
  causal_conv1d_silu_forward(x.data(), ldx, weight.data(), bias.data(), u.data(), batch, len, dim, kernel,
                             doc_start.data(), nullptr);
  causal_conv1d_silu_backward(x.data(), ldx, weight.data(), bias.data(), du.data(), dx.data(), lddx, dweight.data(),
                              dbias.data(), batch, len, dim, kernel, doc_start.data(), nullptr, nullptr);

  // Each document alone, a sequence of its own (views into the same buffers), in the packed order, so that
  // the weight and bias sums see the same terms in the same order.
  std::vector<double> u_sep(u.size()), dx_sep(dx.size(), 0.0), dweight_sep(weight.size(), 0.0),
      dbias_sep(bias.size(), 0.0);
  for (int64_t b = 0; b < batch; ++b) {
    for (size_t i = 0; i < starts[b].size(); ++i) {
      const int64_t begin = starts[b][i], end = i + 1 < starts[b].size() ? starts[b][i + 1] : len;
      const int64_t row = b * len + begin;
      causal_conv1d_silu_forward(x.data() + row * ldx, ldx, weight.data(), bias.data(), u_sep.data() + row * dim, 1,
                                 end - begin, dim, kernel, nullptr, nullptr);
      causal_conv1d_silu_backward(x.data() + row * ldx, ldx, weight.data(), bias.data(), du.data() + row * dim,
                                  dx_sep.data() + row * lddx, lddx, dweight_sep.data(), dbias_sep.data(), 1,
                                  end - begin, dim, kernel, nullptr, nullptr, nullptr);
    }
  }
  // The same arithmetic in the same order: bit for bit.
  CHECK(u == u_sep);
  CHECK(dx == dx_sep);
  CHECK(dweight == dweight_sep);
  CHECK(dbias == dbias_sep);
}

TEST_CASE("causal conv1d split into slices with history and d_tail equals the unsplit row") {
  std::mt19937_64 rng(29);
  const int64_t len = 23, dim = 6, kernel = 4, ldx = 13, lddx = 8, K1 = kernel - 1;
  // Row 0: documents crossing both cuts, one starting 2 tokens before a cut (part of that slice's
  // history belongs to the previous document). Row 1: one document.
  const std::vector<std::vector<int64_t>> starts{{0, 6, 9, 15}, {0}};
  const int64_t batch = static_cast<int64_t>(starts.size());
  for (const std::vector<int64_t>& cuts : {std::vector<int64_t>{0, 11, 23}, std::vector<int64_t>{0, 5, 17, 23}}) {
    INFO("slices " << cuts.size() - 1);
    const Shape whole{batch, len, dim, kernel, ldx, lddx};
    const auto x = strided_input(whole, rng);
    const auto weight = random_values(dim * kernel, rng);
    const auto bias = random_values(dim, rng);
    const auto du = random_values(batch * len * dim, rng);
    std::vector<int32_t> doc_start;
    for (const auto& row : starts) {
      const auto r = doc_start_of(row, 0, len);
      doc_start.insert(doc_start.end(), r.begin(), r.end());
    }
    std::vector<double> u(batch * len * dim), dx(batch * len * lddx, 0.0), dweight(weight.size(), 0.0);
    causal_conv1d_silu_forward(x.data(), ldx, weight.data(), bias.data(), u.data(), batch, len, dim, kernel,
                               doc_start.data(), nullptr);
    causal_conv1d_silu_backward(x.data(), ldx, weight.data(), bias.data(), du.data(), dx.data(), lddx,
                                dweight.data(), static_cast<double*>(nullptr), batch, len, dim, kernel,
                                doc_start.data(), nullptr, nullptr);

    // Each slice in buffers of its own, as a rank would hold it.
    const size_t slices = cuts.size() - 1;
    std::vector<double> u_split(u.size()), dx_split(dx.size(), 0.0), dweight_split(weight.size(), 0.0);
    std::vector<double> d_tail;  // from the slice after the current one; empty for the last
    for (size_t r = slices; r-- > 0;) {
      const int64_t begin = cuts[r], n = cuts[r + 1] - begin;
      std::vector<double> xs(batch * n * ldx), dus(batch * n * dim), history(batch * K1 * dim, 0.0);
      std::vector<int32_t> ds;
      for (int64_t b = 0; b < batch; ++b) {
        std::copy_n(x.begin() + (b * len + begin) * ldx, n * ldx, xs.begin() + b * n * ldx);
        std::copy_n(du.begin() + (b * len + begin) * dim, n * dim, dus.begin() + b * n * dim);
        for (int64_t j = 0; j < K1; ++j) {
          const int64_t source = begin - K1 + j;
          for (int64_t d = 0; d < dim && source >= 0; ++d)
            history[(b * K1 + j) * dim + d] = x[(b * len + source) * ldx + d];
        }
        const auto row = doc_start_of(starts[b], begin, n);
        ds.insert(ds.end(), row.begin(), row.end());
      }
      const double* history_arg = r > 0 ? history.data() : nullptr;
      std::vector<double> us(batch * n * dim), dxs(batch * n * lddx, 0.0), d_history(batch * K1 * dim);
      causal_conv1d_silu_forward(xs.data(), ldx, weight.data(), bias.data(), us.data(), batch, n, dim, kernel,
                                 ds.data(), history_arg);
      causal_conv1d_silu_backward(xs.data(), ldx, weight.data(), bias.data(), dus.data(), dxs.data(), lddx,
                                  dweight_split.data(), static_cast<double*>(nullptr), batch, n, dim, kernel,
                                  ds.data(), history_arg, d_tail.empty() ? nullptr : d_tail.data());
      causal_conv1d_silu_history_grad(xs.data(), ldx, weight.data(), bias.data(), dus.data(), batch, n, dim, kernel,
                                      ds.data(), history_arg, d_history.data());
      d_tail = d_history;
      for (int64_t b = 0; b < batch; ++b) {
        std::copy_n(us.begin() + b * n * dim, n * dim, u_split.begin() + (b * len + begin) * dim);
        std::copy_n(dxs.begin() + b * n * lddx, n * lddx, dx_split.begin() + (b * len + begin) * lddx);
      }
    }
    // The forward reads the same values in the same order (bit for bit); dx adds the d_tail terms in
    // another order, and dweight sums the slices separately: rounding of a few O(1) terms, 1e-13.
    CHECK(u_split == u);
    for (size_t i = 0; i < dx.size(); ++i) CHECK(dx_split[i] == Approx(dx[i]).epsilon(0).margin(1e-13));
    for (size_t i = 0; i < dweight.size(); ++i) CHECK(dweight_split[i] == Approx(dweight[i]).epsilon(0).margin(1e-13));
  }
}
