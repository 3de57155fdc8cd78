// Tests of the chunked selective scan (kernels/cpu/selective_scan.h): against a naive unchunked scan,
// against central finite differences, across chunk lengths, strided views, thread counts and precisions.
#include "kernels/cpu/selective_scan.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "tests/catch.h"

namespace {

using ssmtune::cpu::SelectiveScanShape;

// The inputs with B, C and z dense, plus the loss weights: loss = sum(out * w), so dout = w.
struct Problem {
  int64_t batch, len, dim, state;
  std::vector<double> u, delta, delta_bias, A, B, C, Dskip, z, w;
  int64_t rows() const { return batch * len; }
};

Problem random_problem(int64_t batch, int64_t len, int64_t dim, int64_t state, uint32_t seed) {
  std::mt19937 rng(seed);
  auto fill = [&](int64_t n, double lo, double hi) {
    std::uniform_real_distribution<double> dist(lo, hi);
    std::vector<double> v(n);
    for (double& x : v) x = dist(rng);
    return v;
  };
  Problem p{batch, len, dim, state, {}, {}, {}, {}, {}, {}, {}, {}, {}};
  const int64_t rows = p.rows();
  p.u = fill(rows * dim, -1, 1);
  // delta in about [0.2, 1.3] and A in [-1.5, -0.2]: decays exp(delta*A) between 0.15 and 0.96, so
  // the state carries information across many tokens and across chunk boundaries.
  p.delta = fill(rows * dim, -1, 1);
  p.delta_bias = fill(dim, -1, 0);
  p.A = fill(dim * state, -1.5, -0.2);
  p.B = fill(rows * state, -1, 1);
  p.C = fill(rows * state, -1, 1);
  p.Dskip = fill(dim, -1, 1);
  p.z = fill(rows * dim, -2, 2);
  p.w = fill(rows * dim, -1, 1);
  return p;
}

// Where B, C and z sit inside the x_proj / in_proj output rows.
struct Layout {
  int64_t bc_row_stride, b_offset, c_offset, z_row_stride, z_offset;
};

Layout dense_layout(const Problem& p) { return {2 * p.state, 0, p.state, p.dim, 0}; }

// Like x_proj's [dt_r (2 wide), B, C] plus 3 unused columns, and in_proj's [x, z] plus one column.
Layout strided_layout(const Problem& p) { return {2 + 2 * p.state + 3, 2, 2 + p.state, 2 * p.dim + 1, p.dim}; }

template <typename T>
std::vector<T> cast(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

// The problem in precision T, with B and C packed into one x_proj buffer and z into an in_proj buffer;
// the columns outside the views hold a sentinel that the backward must leave untouched.
template <typename T>
struct Packed {
  Layout layout;
  std::vector<T> u, delta, delta_bias, A, Dskip, x_proj, in_proj, w;
  const T* B() const { return x_proj.data() + layout.b_offset; }
  const T* C() const { return x_proj.data() + layout.c_offset; }
  const T* z() const { return in_proj.data() + layout.z_offset; }
};

constexpr double kSentinel = 12345.0;

template <typename T>
Packed<T> pack(const Problem& p, const Layout& l) {
  Packed<T> k{l, cast<T>(p.u), cast<T>(p.delta), cast<T>(p.delta_bias), cast<T>(p.A), cast<T>(p.Dskip),
              std::vector<T>(p.rows() * l.bc_row_stride, T(kSentinel)),
              std::vector<T>(p.rows() * l.z_row_stride, T(kSentinel)), cast<T>(p.w)};
  for (int64_t r = 0; r < p.rows(); ++r) {
    for (int64_t n = 0; n < p.state; ++n) {
      k.x_proj[r * l.bc_row_stride + l.b_offset + n] = T(p.B[r * p.state + n]);
      k.x_proj[r * l.bc_row_stride + l.c_offset + n] = T(p.C[r * p.state + n]);
    }
    for (int64_t d = 0; d < p.dim; ++d) k.in_proj[r * l.z_row_stride + l.z_offset + d] = T(p.z[r * p.dim + d]);
  }
  return k;
}

template <typename T>
struct ForwardResult {
  std::vector<T> out, chunk_states;
};

template <typename T>
ForwardResult<T> forward(const Problem& p, const Packed<T>& k, int64_t chunk_len) {
  const SelectiveScanShape s{p.batch, p.len, p.dim, p.state, chunk_len};
  ForwardResult<T> r{std::vector<T>(p.rows() * p.dim),
                     std::vector<T>(p.batch * ssmtune::cpu::selective_scan_num_chunks(s) * p.dim * p.state)};
  ssmtune::cpu::selective_scan_forward(s, k.u.data(), k.delta.data(), k.delta_bias.data(), k.A.data(), k.B(),
                                       k.C(), k.layout.bc_row_stride, k.Dskip.data(), k.z(),
                                       k.layout.z_row_stride, r.out.data(), r.chunk_states.data());
  return r;
}

// Gradients laid out like the inputs: d_x_proj / d_in_proj receive dB, dC and dz at the views' places.
template <typename T>
struct Gradients {
  std::vector<T> du, ddelta, ddelta_bias, dA, dDskip, d_x_proj, d_in_proj;
};

template <typename T>
Gradients<T> backward(const Problem& p, const Packed<T>& k, int64_t chunk_len) {
  const SelectiveScanShape s{p.batch, p.len, p.dim, p.state, chunk_len};
  const ForwardResult<T> f = forward(p, k, chunk_len);
  Gradients<T> g{std::vector<T>(p.rows() * p.dim),
                 std::vector<T>(p.rows() * p.dim),
                 std::vector<T>(p.dim, T(0)),
                 std::vector<T>(p.dim * p.state, T(0)),
                 std::vector<T>(p.dim, T(0)),
                 std::vector<T>(k.x_proj.size(), T(kSentinel)),
                 std::vector<T>(k.in_proj.size(), T(kSentinel))};
  std::vector<T> workspace(ssmtune::cpu::selective_scan_backward_workspace_size(s));
  const Layout& l = k.layout;
  ssmtune::cpu::selective_scan_backward(
      s, k.u.data(), k.delta.data(), k.delta_bias.data(), k.A.data(), k.B(), k.C(), l.bc_row_stride,
      k.Dskip.data(), k.z(), l.z_row_stride, f.chunk_states.data(), k.w.data(), g.du.data(), g.ddelta.data(),
      g.d_x_proj.data() + l.b_offset, g.d_x_proj.data() + l.c_offset, g.d_in_proj.data() + l.z_offset,
      g.dA.data(), g.dDskip.data(), g.ddelta_bias.data(), workspace.data());
  return g;
}

template <typename T>
bool identical(const Gradients<T>& a, const Gradients<T>& b) {
  return a.du == b.du && a.ddelta == b.ddelta && a.ddelta_bias == b.ddelta_bias && a.dA == b.dA &&
         a.dDskip == b.dDskip && a.d_x_proj == b.d_x_proj && a.d_in_proj == b.d_in_proj;
}

// The recurrence written out plainly over the whole sequence, no chunks; states[b, t, d, n] is h_t.
struct NaiveResult {
  std::vector<double> out, states;
};

NaiveResult naive_forward(const Problem& p) {
  const int64_t D = p.dim, N = p.state;
  NaiveResult r{std::vector<double>(p.rows() * D), std::vector<double>(p.rows() * D * N)};
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t d = 0; d < D; ++d) {
      std::vector<double> h(N, 0.0);
      for (int64_t t = 0; t < p.len; ++t) {
        const int64_t row = b * p.len + t;
        const double dt = std::log(1.0 + std::exp(p.delta[row * D + d] + p.delta_bias[d]));
        const double x = p.u[row * D + d];
        double y = p.Dskip[d] * x;
        for (int64_t n = 0; n < N; ++n) {
          h[n] = std::exp(dt * p.A[d * N + n]) * h[n] + dt * p.B[row * N + n] * x;
          y += p.C[row * N + n] * h[n];
          r.states[(row * D + d) * N + n] = h[n];
        }
        const double zv = p.z[row * D + d];
        r.out[row * D + d] = y * zv / (1.0 + std::exp(-zv));
      }
    }
  }
  return r;
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

}  // namespace

TEST_CASE("selective scan forward matches a naive unchunked scan and saves chunk end states") {
  const Problem p = random_problem(2, 13, 3, 4, 1);
  const NaiveResult naive = naive_forward(p);
  // Double precision and at most 13 steps of a contracting recurrence: the two orders of evaluation
  // differ by a few ulps (~1e-15); 1e-12 is far below any error in the formula.
  const double tol = 1e-12;
  for (const Layout& layout : {dense_layout(p), strided_layout(p)}) {
    for (int64_t chunk_len : {1, 4, 5, 13, 20}) {
      CAPTURE(chunk_len, layout.bc_row_stride);
      const ForwardResult<double> f = forward(p, pack<double>(p, layout), chunk_len);
      for (size_t i = 0; i < f.out.size(); ++i) REQUIRE(std::abs(f.out[i] - naive.out[i]) <= tol);
      const int64_t num_chunks = (p.len + chunk_len - 1) / chunk_len;
      for (int64_t b = 0; b < p.batch; ++b) {
        for (int64_t c = 0; c < num_chunks; ++c) {
          const int64_t last_t = std::min((c + 1) * chunk_len, p.len) - 1;
          for (int64_t i = 0; i < p.dim * p.state; ++i) {
            const double saved = f.chunk_states[(b * num_chunks + c) * p.dim * p.state + i];
            REQUIRE(std::abs(saved - naive.states[(b * p.len + last_t) * p.dim * p.state + i]) <= tol);
          }
        }
      }
    }
  }
}

TEST_CASE("selective scan gradients match central finite differences") {
  // Odd length with a partial last chunk, and strided views so that dB, dC and dz are checked at the
  // views' places inside the x_proj and in_proj buffers.
  const Problem p = random_problem(2, 13, 3, 4, 2);
  const int64_t chunk_len = 5;
  Packed<double> k = pack<double>(p, strided_layout(p));
  const Gradients<double> g = backward(p, k, chunk_len);
  auto loss = [&] {
    const ForwardResult<double> f = forward(p, k, chunk_len);
    double sum = 0;
    for (size_t i = 0; i < f.out.size(); ++i) sum += f.out[i] * k.w[i];
    return sum;
  };
  // Step 1e-5 on inputs of size ~1: the truncation error h^2/6 * |f'''| is ~1e-11, the rounding error
  // ~1e-16 * |loss| / h with |loss| ~ 10 is ~1e-10 (the worst seen is 4e-11); the tolerance
  // 1e-8 * (1 + |g|) is 100x above that and far below the O(0.01..1) errors of a wrong backward term.
  const double h = 1e-5;
  auto check = [&](const char* name, std::vector<double>& input, const std::vector<double>& grad,
                   int64_t row_stride, int64_t begin, int64_t end) {
    for (size_t i = 0; i < input.size(); ++i) {
      const int64_t column = int64_t(i) % row_stride;
      if (column < begin || column >= end) continue;
      const double saved = input[i];
      input[i] = saved + h;
      const double plus = loss();
      input[i] = saved - h;
      const double minus = loss();
      input[i] = saved;
      const double numeric = (plus - minus) / (2 * h);
      CAPTURE(name, i, numeric, grad[i]);
      REQUIRE(std::abs(numeric - grad[i]) <= 1e-8 * (1 + std::abs(grad[i])));
    }
  };
  const Layout& l = k.layout;
  check("u", k.u, g.du, 1, 0, 1);
  check("delta", k.delta, g.ddelta, 1, 0, 1);
  check("delta_bias", k.delta_bias, g.ddelta_bias, 1, 0, 1);
  check("A", k.A, g.dA, 1, 0, 1);
  check("B", k.x_proj, g.d_x_proj, l.bc_row_stride, l.b_offset, l.b_offset + p.state);
  check("C", k.x_proj, g.d_x_proj, l.bc_row_stride, l.c_offset, l.c_offset + p.state);
  check("Dskip", k.Dskip, g.dDskip, 1, 0, 1);
  check("z", k.in_proj, g.d_in_proj, l.z_row_stride, l.z_offset, l.z_offset + p.dim);
}

// Each state is computed by the same expression in the same order whatever the chunk length (a chunk
// boundary only stores the state and reloads it, without rounding), the reverse scan is the same
// sequence of operations, and every sum runs over t, d and n in the same order; so the results must be
// bit-identical, in float as well as in double.
template <typename T>
void check_chunk_length_invariance() {
  const Problem p = random_problem(2, 13, 3, 4, 3);
  const Packed<T> k = pack<T>(p, strided_layout(p));
  const std::vector<T> reference_out = forward(p, k, p.len).out;
  const Gradients<T> reference = backward(p, k, p.len);
  for (int64_t chunk_len : {1, 4, 5, 64}) {
    CAPTURE(chunk_len);
    REQUIRE(forward(p, k, chunk_len).out == reference_out);
    REQUIRE(identical(backward(p, k, chunk_len), reference));
  }
}

TEST_CASE("selective scan results do not depend on the chunk length") {
  SECTION("double") { check_chunk_length_invariance<double>(); }
  SECTION("float") { check_chunk_length_invariance<float>(); }
}

TEST_CASE("selective scan reads strided B, C, z views and writes only inside them") {
  const Problem p = random_problem(2, 13, 3, 4, 4);
  const Packed<double> dense = pack<double>(p, dense_layout(p));
  const Packed<double> strided = pack<double>(p, strided_layout(p));
  REQUIRE(forward(p, strided, 5).out == forward(p, dense, 5).out);
  const Gradients<double> gd = backward(p, dense, 5);
  const Gradients<double> gs = backward(p, strided, 5);
  REQUIRE(gs.du == gd.du);
  REQUIRE(gs.ddelta == gd.ddelta);
  REQUIRE(gs.dA == gd.dA);
  REQUIRE(gs.dDskip == gd.dDskip);
  REQUIRE(gs.ddelta_bias == gd.ddelta_bias);
  const Layout ls = strided.layout, ldense = dense.layout;
  for (int64_t r = 0; r < p.rows(); ++r) {
    for (int64_t col = 0; col < ls.bc_row_stride; ++col) {
      const double v = gs.d_x_proj[r * ls.bc_row_stride + col];
      if (col >= ls.b_offset && col < ls.b_offset + 2 * p.state) {  // B then C, adjacent
        REQUIRE(v == gd.d_x_proj[r * ldense.bc_row_stride + col - ls.b_offset]);
      } else {
        REQUIRE(v == kSentinel);
      }
    }
    for (int64_t col = 0; col < ls.z_row_stride; ++col) {
      const double v = gs.d_in_proj[r * ls.z_row_stride + col];
      if (col >= ls.z_offset && col < ls.z_offset + p.dim) {
        REQUIRE(v == gd.d_in_proj[r * p.dim + col - ls.z_offset]);
      } else {
        REQUIRE(v == kSentinel);
      }
    }
  }
}

TEST_CASE("selective scan parameter gradients are optional and accumulate") {
  const Problem p = random_problem(2, 13, 3, 4, 5);
  const Packed<double> k = pack<double>(p, dense_layout(p));
  const SelectiveScanShape s{p.batch, p.len, p.dim, p.state, 5};
  const ForwardResult<double> f = forward(p, k, 5);
  const Gradients<double> once = backward(p, k, 5);
  std::vector<double> workspace(ssmtune::cpu::selective_scan_backward_workspace_size(s));
  std::vector<double> du(p.rows() * p.dim), ddelta(p.rows() * p.dim), dB(p.rows() * 2 * p.state),
      dz(p.rows() * p.dim);
  std::vector<double> dA(p.dim * p.state, 0.0), dDskip(p.dim, 0.0), ddelta_bias(p.dim, 0.0);
  auto run = [&](double* dA_or_null, double* dDskip_or_null, double* ddelta_bias_or_null) {
    ssmtune::cpu::selective_scan_backward(s, k.u.data(), k.delta.data(), k.delta_bias.data(), k.A.data(),
                                          k.B(), k.C(), 2 * p.state, k.Dskip.data(), k.z(), p.dim,
                                          f.chunk_states.data(), k.w.data(), du.data(), ddelta.data(),
                                          dB.data(), dB.data() + p.state, dz.data(), dA_or_null,
                                          dDskip_or_null, ddelta_bias_or_null, workspace.data());
  };
  run(nullptr, nullptr, nullptr);
  REQUIRE(du == once.du);
  REQUIRE(ddelta == once.ddelta);
  REQUIRE(dB == once.d_x_proj);
  REQUIRE(dz == once.d_in_proj);
  run(dA.data(), dDskip.data(), ddelta_bias.data());
  run(dA.data(), dDskip.data(), ddelta_bias.data());
  // Two accumulations from zero: x + x = 2x exactly in floating point.
  for (size_t i = 0; i < dA.size(); ++i) REQUIRE(dA[i] == 2 * once.dA[i]);
  for (int64_t d = 0; d < p.dim; ++d) {
    REQUIRE(dDskip[d] == 2 * once.dDskip[d]);
    REQUIRE(ddelta_bias[d] == 2 * once.ddelta_bias[d]);
  }
}

TEST_CASE("selective scan results do not depend on the number of threads") {
  const Problem p = random_problem(5, 13, 6, 4, 6);
  const Packed<float> k = pack<float>(p, strided_layout(p));
  const int saved_threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const std::vector<float> out_one = forward(p, k, 4).out;
  const Gradients<float> one = backward(p, k, 4);
  for (int threads : {2, 3}) {
    CAPTURE(threads);
    omp_set_num_threads(threads);
    REQUIRE(forward(p, k, 4).out == out_one);
    REQUIRE(identical(backward(p, k, 4), one));
  }
  omp_set_num_threads(saved_threads);
}

TEST_CASE("selective scan in float agrees with double") {
  const Problem p = random_problem(2, 64, 8, 16, 7);
  // Dense views: no sentinel columns to distort the scale of the comparison below.
  const Packed<double> kd = pack<double>(p, dense_layout(p));
  const Packed<float> kf = pack<float>(p, dense_layout(p));
  // Each result is a sum of at most a few hundred rounded float terms (16 states, 64 tokens, 2 batches)
  // of a contracting recurrence; rounding errors of random sign grow like sqrt(count) * 6e-8 ~ 1e-6 of
  // the largest magnitude involved (the worst seen is 3e-7). 1e-5 of the array's largest element
  // leaves 30x margin and is far below the error of a wrong formula or a skipped term.
  auto agree = [](const std::vector<float>& f, const std::vector<double>& d) {
    const double scale = max_abs(d);
    for (size_t i = 0; i < d.size(); ++i) {
      CAPTURE(i, f[i], d[i], scale);
      REQUIRE(std::abs(double(f[i]) - d[i]) <= 1e-5 * scale);
    }
  };
  agree(forward(p, kf, 16).out, forward(p, kd, 16).out);
  const Gradients<float> gf = backward(p, kf, 16);
  const Gradients<double> gd = backward(p, kd, 16);
  agree(gf.du, gd.du);
  agree(gf.ddelta, gd.ddelta);
  agree(gf.ddelta_bias, gd.ddelta_bias);
  agree(gf.dA, gd.dA);
  agree(gf.dDskip, gd.dDskip);
  agree(gf.d_x_proj, gd.d_x_proj);
  agree(gf.d_in_proj, gd.d_in_proj);
}
