// Tests of the chunked selective scan (kernels/cpu/selective_scan.h): against a naive unchunked scan,
// against central finite differences, across chunk lengths, strided views, thread counts and precisions.
// With document starts, an initial state and an incoming d_final_state: the same checks, a packed row
// against its documents run alone, and rows split into 2 or 3 slices recombined with final_state/decay
// and initial_state_grad against the unsplit rows.
#include "kernels/cpu/selective_scan.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <stdexcept>
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

// Tokens [t0, t1) of every row (or of row only_row) of a [batch * len, width] array.
template <typename T>
std::vector<T> token_rows(const std::vector<T>& v, int64_t batch, int64_t len, int64_t width, int64_t t0, int64_t t1,
                          int64_t only_row = -1) {
  std::vector<T> out;
  for (int64_t b = 0; b < batch; ++b)
    if (only_row < 0 || b == only_row)
      out.insert(out.end(), v.begin() + (b * len + t0) * width, v.begin() + (b * len + t1) * width);
  return out;
}

// Tokens [t0, t1) of every row (or of row only_row) of p: the slice one rank of context parallelism holds,
// or one packed document.
Problem slice(const Problem& p, int64_t t0, int64_t t1, int64_t only_row = -1) {
  auto take = [&](const std::vector<double>& v, int64_t width) {
    return token_rows(v, p.batch, p.len, width, t0, t1, only_row);
  };
  return {only_row < 0 ? p.batch : 1, t1 - t0,    p.dim,           p.state,    take(p.u, p.dim),
          take(p.delta, p.dim),       p.delta_bias, p.A,           take(p.B, p.state), take(p.C, p.state),
          p.Dskip,                    take(p.z, p.dim), take(p.w, p.dim)};
}

// doc_start [batch*len] of rows whose documents begin at the given positions; a row whose first listed
// start is after 0 continues, before it, a document that began `continued` tokens before the row.
std::vector<int32_t> doc_starts(int64_t len, const std::vector<std::vector<int32_t>>& starts_per_row,
                                int32_t continued = 3) {
  std::vector<int32_t> doc_start;
  for (const std::vector<int32_t>& starts : starts_per_row) {
    int32_t current = -continued;
    for (int64_t t = 0; t < len; ++t) {
      if (std::find(starts.begin(), starts.end(), t) != starts.end()) current = int32_t(t);
      doc_start.push_back(current);
    }
  }
  return doc_start;
}

// The doc_start of tokens [t0, t1) of each row, relative to the slice: negative where a document began
// before t0.
std::vector<int32_t> slice_doc_start(const std::vector<int32_t>& doc_start, int64_t batch, int64_t len, int64_t t0,
                                     int64_t t1) {
  std::vector<int32_t> out;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = t0; t < t1; ++t) out.push_back(doc_start[b * len + t] - int32_t(t0));
  return out;
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

// The sequence-boundary inputs of a call; an empty vector stands for a null pointer. The states are
// [batch, dim, state].
template <typename T>
struct Boundary {
  std::vector<int32_t> doc_start;
  std::vector<T> initial_state, d_final_state;
};

template <typename T>
const T* or_null(const std::vector<T>& v) {
  return v.empty() ? nullptr : v.data();
}

template <typename T>
struct ForwardResult {
  std::vector<T> out, chunk_states;
  std::vector<T> last_state;  // h_{len-1} [batch, dim, state]: the last chunk's saved state
};

template <typename T>
ForwardResult<T> forward(const Problem& p, const Packed<T>& k, int64_t chunk_len, const Boundary<T>& bd = {}) {
  const SelectiveScanShape s{p.batch, p.len, p.dim, p.state, chunk_len};
  const int64_t num_chunks = ssmtune::cpu::selective_scan_num_chunks(s), state_size = p.dim * p.state;
  ForwardResult<T> r{std::vector<T>(p.rows() * p.dim), std::vector<T>(p.batch * num_chunks * state_size), {}};
  ssmtune::cpu::selective_scan_forward<T>(s, k.u.data(), k.delta.data(), k.delta_bias.data(), k.A.data(), k.B(),
                                          k.C(), k.layout.bc_row_stride, k.Dskip.data(), k.z(),
                                          k.layout.z_row_stride, r.out.data(), p.dim, r.chunk_states.data(),
                                          or_null(bd.doc_start), or_null(bd.initial_state));
  for (int64_t b = 0; b < p.batch; ++b) {
    const auto last = r.chunk_states.begin() + (b * num_chunks + num_chunks - 1) * state_size;
    r.last_state.insert(r.last_state.end(), last, last + state_size);
  }
  return r;
}

// Gradients laid out like the inputs: d_x_proj / d_in_proj receive dB, dC and dz at the views' places.
template <typename T>
struct Gradients {
  std::vector<T> du, ddelta, ddelta_bias, dA, dDskip, d_x_proj, d_in_proj, d_initial_state;
};

template <typename T>
Gradients<T> backward(const Problem& p, const Packed<T>& k, int64_t chunk_len, const Boundary<T>& bd = {}) {
  const SelectiveScanShape s{p.batch, p.len, p.dim, p.state, chunk_len};
  const ForwardResult<T> f = forward(p, k, chunk_len, bd);
  Gradients<T> g{std::vector<T>(p.rows() * p.dim),
                 std::vector<T>(p.rows() * p.dim),
                 std::vector<T>(p.dim, T(0)),
                 std::vector<T>(p.dim * p.state, T(0)),
                 std::vector<T>(p.dim, T(0)),
                 std::vector<T>(k.x_proj.size(), T(kSentinel)),
                 std::vector<T>(k.in_proj.size(), T(kSentinel)),
                 std::vector<T>(p.batch * p.dim * p.state, T(kSentinel))};
  std::vector<T> workspace(ssmtune::cpu::selective_scan_backward_workspace_size(s));
  const Layout& l = k.layout;
  ssmtune::cpu::selective_scan_backward<T>(
      s, k.u.data(), k.delta.data(), k.delta_bias.data(), k.A.data(), k.B(), k.C(), l.bc_row_stride,
      k.Dskip.data(), k.z(), l.z_row_stride, f.chunk_states.data(), k.w.data(), g.du.data(), g.ddelta.data(),
      g.d_x_proj.data() + l.b_offset, g.d_x_proj.data() + l.c_offset, g.d_in_proj.data() + l.z_offset,
      g.dA.data(), g.dDskip.data(), g.ddelta_bias.data(), workspace.data(), or_null(bd.doc_start),
      or_null(bd.initial_state), or_null(bd.d_final_state), g.d_initial_state.data());
  return g;
}

template <typename T>
bool identical(const Gradients<T>& a, const Gradients<T>& b) {
  return a.du == b.du && a.ddelta == b.ddelta && a.ddelta_bias == b.ddelta_bias && a.dA == b.dA &&
         a.dDskip == b.dDskip && a.d_x_proj == b.d_x_proj && a.d_in_proj == b.d_in_proj &&
         a.d_initial_state == b.d_initial_state;
}

// final_state and decay of selective_scan_final_state, [batch, dim, state] each.
template <typename T>
std::pair<std::vector<T>, std::vector<T>> final_state(const Problem& p, const Packed<T>& k,
                                                      const std::vector<int32_t>& doc_start) {
  const SelectiveScanShape s{p.batch, p.len, p.dim, p.state, p.len};
  std::vector<T> h(p.batch * p.dim * p.state, T(kSentinel)), decay(h.size(), T(kSentinel));
  ssmtune::cpu::selective_scan_final_state<T>(s, k.u.data(), k.delta.data(), k.delta_bias.data(), k.A.data(), k.B(),
                                              k.layout.bc_row_stride, or_null(doc_start), h.data(), decay.data());
  return {h, decay};
}

// selective_scan_initial_state_grad with dout = w.
template <typename T>
std::vector<T> initial_state_grad(const Problem& p, const Packed<T>& k, const std::vector<int32_t>& doc_start) {
  const SelectiveScanShape s{p.batch, p.len, p.dim, p.state, p.len};
  std::vector<T> d_initial_state(p.batch * p.dim * p.state, T(kSentinel));
  ssmtune::cpu::selective_scan_initial_state_grad<T>(s, k.delta.data(), k.delta_bias.data(), k.A.data(), k.C(),
                                                     k.layout.bc_row_stride, k.z(), k.layout.z_row_stride,
                                                     k.w.data(), or_null(doc_start), d_initial_state.data());
  return d_initial_state;
}

std::vector<double> random_states(const Problem& p, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> dist(-1, 1);
  std::vector<double> v(p.batch * p.dim * p.state);
  for (double& x : v) x = dist(rng);
  return v;
}

// The recurrence written out plainly over the whole sequence, no chunks; states[b, t, d, n] is h_t.
// A document's first token starts from h = 0; an empty initial_state means zeros.
struct NaiveResult {
  std::vector<double> out, states;
};

NaiveResult naive_forward(const Problem& p, const std::vector<int32_t>& doc_start = {},
                          const std::vector<double>& initial_state = {}) {
  const int64_t D = p.dim, N = p.state;
  NaiveResult r{std::vector<double>(p.rows() * D), std::vector<double>(p.rows() * D * N)};
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t d = 0; d < D; ++d) {
      std::vector<double> h(N, 0.0);
      if (!initial_state.empty()) h.assign(initial_state.begin() + (b * D + d) * N, initial_state.begin() + (b * D + d + 1) * N);
      for (int64_t t = 0; t < p.len; ++t) {
        const int64_t row = b * p.len + t;
        if (!doc_start.empty() && doc_start[row] == t) h.assign(N, 0.0);
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

// Results of different but equally exact evaluation orders in double: every element within 1e-12 of the
// array's largest magnitude (rounding differences are ~1e-15 of it; a missing term or a wrong carry is
// of the order of the values themselves).
void require_close(const char* name, const std::vector<double>& got, const std::vector<double>& want) {
  REQUIRE(got.size() == want.size());
  const double scale = std::max(1.0, max_abs(want));
  for (size_t i = 0; i < got.size(); ++i) {
    CAPTURE(name, i, got[i], want[i]);
    REQUIRE(std::abs(got[i] - want[i]) <= 1e-12 * scale);
  }
}

// Packed rows used below (len 13, chunk_len 5: chunks [0,5) [5,10) [10,13)). Row 0: documents of lengths 4,
// 1, 7 and 1 (a one-token document at the last position; the start at 5 is a chunk's first token). Row 1
// continues a document begun before the row (initial_state flows in) until a start at 7, mid-chunk.
const std::vector<std::vector<int32_t>> kPackedStarts{{0, 4, 5, 12}, {7}};

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

namespace {

// Every gradient of loss = sum(out * w) + sum(h_{len-1} * d_final_state) against central differences, the
// initial state's included (the second term makes d_final_state the gradient arriving at h_{len-1}). Odd
// length with a partial last chunk, and strided views so that dB, dC and dz are checked at the views'
// places inside the x_proj and in_proj buffers.
Gradients<double> check_gradients(const Problem& p, Boundary<double> bd) {
  const int64_t chunk_len = 5;
  Packed<double> k = pack<double>(p, strided_layout(p));
  // Without an initial state the loss still depends on h_{-1} (at zero): d_initial_state is that gradient.
  const bool zero_initial_state = bd.initial_state.empty();
  const Gradients<double> g = backward(p, k, chunk_len, bd);
  if (zero_initial_state) bd.initial_state.assign(p.batch * p.dim * p.state, 0.0);
  auto loss = [&] {
    const ForwardResult<double> f = forward(p, k, chunk_len, bd);
    double sum = 0;
    for (size_t i = 0; i < f.out.size(); ++i) sum += f.out[i] * k.w[i];
    for (size_t i = 0; i < bd.d_final_state.size(); ++i) sum += f.last_state[i] * bd.d_final_state[i];
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
  check("initial_state", bd.initial_state, g.d_initial_state, 1, 0, 1);
  return g;
}

}  // namespace

TEST_CASE("selective scan gradients match central finite differences") {
  check_gradients(random_problem(2, 13, 3, 4, 2), {});
}

TEST_CASE("selective scan gradients with document starts, an initial state and d_final_state match central "
          "finite differences") {
  const Problem p = random_problem(2, 13, 3, 4, 12);
  const Gradients<double> g =
      check_gradients(p, {doc_starts(p.len, kPackedStarts), random_states(p, 13), random_states(p, 14)});
  // Row 0 starts a document at its first token: its initial state is ignored, its gradient exactly 0; row 1
  // continues a document from the initial state, whose gradient is not 0.
  const int64_t row_states = p.dim * p.state;
  for (int64_t i = 0; i < row_states; ++i) REQUIRE(g.d_initial_state[i] == 0.0);
  REQUIRE(max_abs(std::vector<double>(g.d_initial_state.begin() + row_states, g.d_initial_state.end())) > 1e-3);
}

// Each state is computed by the same expression in the same order whatever the chunk length (a chunk
// boundary only stores the state and reloads it, without rounding), the reverse scan is the same
// sequence of operations, and every sum runs over t, d and n in the same order; so the results must be
// bit-identical, in float as well as in double; with document starts, an initial state and d_final_state too.
template <typename T>
void check_chunk_length_invariance(const Boundary<T>& bd) {
  const Problem p = random_problem(2, 13, 3, 4, 3);
  const Packed<T> k = pack<T>(p, strided_layout(p));
  const std::vector<T> reference_out = forward(p, k, p.len, bd).out;
  const Gradients<T> reference = backward(p, k, p.len, bd);
  for (int64_t chunk_len : {1, 4, 5, 64}) {
    CAPTURE(chunk_len);
    REQUIRE(forward(p, k, chunk_len, bd).out == reference_out);
    REQUIRE(identical(backward(p, k, chunk_len, bd), reference));
  }
}

template <typename T>
Boundary<T> packed_boundary(const Problem& p) {
  return {doc_starts(p.len, kPackedStarts), cast<T>(random_states(p, 8)), cast<T>(random_states(p, 9))};
}

TEST_CASE("selective scan results do not depend on the chunk length") {
  SECTION("double") { check_chunk_length_invariance<double>({}); }
  SECTION("float") { check_chunk_length_invariance<float>({}); }
  const Problem p = random_problem(2, 13, 3, 4, 3);
  SECTION("double, packed, with states") { check_chunk_length_invariance<double>(packed_boundary<double>(p)); }
  SECTION("float, packed, with states") { check_chunk_length_invariance<float>(packed_boundary<float>(p)); }
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
    ssmtune::cpu::selective_scan_backward<double>(s, k.u.data(), k.delta.data(), k.delta_bias.data(), k.A.data(),
                                          k.B(), k.C(), 2 * p.state, k.Dskip.data(), k.z(), p.dim,
                                          f.chunk_states.data(), k.w.data(), du.data(), ddelta.data(),
                                          dB.data(), dB.data() + p.state, dz.data(), dA_or_null,
                                          dDskip_or_null, ddelta_bias_or_null, workspace.data(), nullptr, nullptr,
                                          nullptr, nullptr);
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
  // Rows 0, 1 as kPackedStarts; row 2 with a start at 0 and one in its second chunk; row 3 continuing one
  // document throughout; row 4 with a start in its first chunk.
  const Boundary<float> bd{doc_starts(p.len, {{0, 4, 5, 12}, {7}, {0, 6}, {}, {3}}), cast<float>(random_states(p, 10)),
                           cast<float>(random_states(p, 11))};
  const int saved_threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const std::vector<float> out_one = forward(p, k, 4, bd).out;
  const Gradients<float> one = backward(p, k, 4, bd);
  for (int threads : {2, 3}) {
    CAPTURE(threads);
    omp_set_num_threads(threads);
    REQUIRE(forward(p, k, 4, bd).out == out_one);
    REQUIRE(identical(backward(p, k, 4, bd), one));
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

TEST_CASE("selective scan with document starts and an initial state matches a naive scan") {
  const Problem p = random_problem(2, 13, 3, 4, 15);
  const std::vector<int32_t> doc_start = doc_starts(p.len, kPackedStarts);
  const std::vector<double> initial_state = random_states(p, 16);
  const NaiveResult naive = naive_forward(p, doc_start, initial_state);
  const Packed<double> k = pack<double>(p, strided_layout(p));
  for (int64_t chunk_len : {1, 5, 13}) {
    CAPTURE(chunk_len);
    const ForwardResult<double> f = forward(p, k, chunk_len, {doc_start, initial_state, {}});
    require_close("out", f.out, naive.out);
    const int64_t num_chunks = (p.len + chunk_len - 1) / chunk_len, states = p.dim * p.state;
    for (int64_t b = 0; b < p.batch; ++b) {
      for (int64_t c = 0; c < num_chunks; ++c) {
        const int64_t last_t = std::min((c + 1) * chunk_len, p.len) - 1;
        const auto saved = f.chunk_states.begin() + (b * num_chunks + c) * states;
        const auto expected = naive.states.begin() + (b * p.len + last_t) * states;
        require_close("chunk_states", std::vector<double>(saved, saved + states),
                      std::vector<double>(expected, expected + states));
      }
    }
  }
}

TEST_CASE("selective scan writes out with a row stride and leaves the other columns untouched") {
  const Problem p = random_problem(2, 13, 3, 4, 17);
  const Packed<double> k = pack<double>(p, strided_layout(p));
  const Boundary<double> bd = packed_boundary<double>(p);
  const std::vector<double> dense = forward(p, k, 5, bd).out;
  const SelectiveScanShape s{p.batch, p.len, p.dim, p.state, 5};
  const int64_t out_stride = p.dim + 2;
  std::vector<double> out(p.rows() * out_stride, kSentinel), chunk_states(p.batch * 3 * p.dim * p.state);
  ssmtune::cpu::selective_scan_forward<double>(s, k.u.data(), k.delta.data(), k.delta_bias.data(), k.A.data(), k.B(),
                                               k.C(), k.layout.bc_row_stride, k.Dskip.data(), k.z(),
                                               k.layout.z_row_stride, out.data(), out_stride, chunk_states.data(),
                                               bd.doc_start.data(), bd.initial_state.data());
  for (int64_t r = 0; r < p.rows(); ++r)
    for (int64_t col = 0; col < out_stride; ++col)
      REQUIRE(out[r * out_stride + col] == (col < p.dim ? dense[r * p.dim + col] : kSentinel));
  REQUIRE_THROWS_AS(ssmtune::cpu::selective_scan_forward<double>(
                        s, k.u.data(), k.delta.data(), k.delta_bias.data(), k.A.data(), k.B(), k.C(),
                        k.layout.bc_row_stride, k.Dskip.data(), k.z(), k.layout.z_row_stride, out.data(), p.dim - 1,
                        chunk_states.data(), nullptr, nullptr),
                    std::invalid_argument);
}

TEST_CASE("selective scan final state and decay give the last state for any initial state") {
  const Problem p = random_problem(2, 13, 3, 4, 18);
  Packed<double> k = pack<double>(p, strided_layout(p));
  const std::vector<double> h0 = random_states(p, 19);
  for (const std::vector<int32_t>& doc_start : {std::vector<int32_t>{}, doc_starts(p.len, kPackedStarts)}) {
    CAPTURE(doc_start.size());
    const auto [final_h, decay] = final_state(p, k, doc_start);
    // From a zero start the same expressions as the forward's: its last state, bit for bit.
    REQUIRE(final_h == forward(p, k, 5, {doc_start, {}, {}}).last_state);
    // h_{len-1} is affine in h_{-1}, elementwise: final_state + decay * h0.
    const std::vector<double> last = forward(p, k, 5, {doc_start, h0, {}}).last_state;
    std::vector<double> combined(last.size());
    for (size_t i = 0; i < last.size(); ++i) combined[i] = final_h[i] + decay[i] * h0[i];
    require_close("final_state + decay * h0", combined, last);
    // decay is d h_{len-1} / d h_{-1}: central differences of the forward's last state (affine, so only
    // rounding, ~1e-16 / step, remains; a wrong factor errs by its whole size).
    std::vector<double> h = h0;
    for (size_t i = 0; i < h.size(); ++i) {
      const double saved = h[i];
      h[i] = saved + 1e-3;
      const double plus = forward(p, k, 5, {doc_start, h, {}}).last_state[i];
      h[i] = saved - 1e-3;
      const double minus = forward(p, k, 5, {doc_start, h, {}}).last_state[i];
      h[i] = saved;
      CAPTURE(i, decay[i]);
      REQUIRE(std::abs((plus - minus) / 2e-3 - decay[i]) <= 1e-10);
    }
    // Every row of kPackedStarts has a document start, so none remembers its initial state; unpacked rows do.
    for (double e : decay) REQUIRE((doc_start.empty() ? e > 0.0 : e == 0.0));
  }
}

TEST_CASE("selective scan initial state gradient combines with d_final_state") {
  const Problem p = random_problem(2, 13, 3, 4, 20);
  const Packed<double> k = pack<double>(p, strided_layout(p));
  const std::vector<double> h0 = random_states(p, 21), g = random_states(p, 22);
  for (const std::vector<int32_t>& doc_start : {std::vector<int32_t>{}, doc_starts(p.len, kPackedStarts)}) {
    CAPTURE(doc_start.size());
    const std::vector<double> d_initial = initial_state_grad(p, k, doc_start);
    // The backward's reverse recurrence alone, by the same expressions: its d_initial_state bit for bit.
    REQUIRE(d_initial == backward(p, k, 5, {doc_start, h0, {}}).d_initial_state);
    // Linear in the incoming gradient g with the forward's decay: d_initial(g) = d_initial(0) + decay * g.
    const std::vector<double> decay = final_state(p, k, doc_start).second;
    std::vector<double> combined(g.size());
    for (size_t i = 0; i < g.size(); ++i) combined[i] = d_initial[i] + decay[i] * g[i];
    require_close("d_initial_state", backward(p, k, 5, {doc_start, h0, g}).d_initial_state, combined);
  }
}

TEST_CASE("a packed row gives each document the outputs and gradients it has alone") {
  // Row 0: documents [0,4) [4,5) [5,12) [12,13); row 1: [0,1) [1,2) [2,9) [9,13) (one-token documents at the
  // first positions). chunk_len 5.
  const std::vector<std::vector<int32_t>> starts{{0, 4, 5, 12}, {0, 1, 2, 9}};
  const Problem p = random_problem(2, 13, 3, 4, 23);
  const Packed<double> k = pack<double>(p, strided_layout(p));
  const Layout& l = k.layout;
  const std::vector<int32_t> doc_start = doc_starts(p.len, starts);
  const ForwardResult<double> f = forward(p, k, 5, {doc_start, {}, {}});
  const Gradients<double> g = backward(p, k, 5, {doc_start, {}, {}});
  std::vector<double> dA(g.dA.size(), 0.0), dDskip(p.dim, 0.0), ddelta_bias(p.dim, 0.0);
  for (int64_t b = 0; b < p.batch; ++b) {
    const Problem row = slice(p, 0, p.len, b);
    for (size_t j = 0; j < starts[b].size(); ++j) {
      const int64_t t0 = starts[b][j], t1 = j + 1 < starts[b].size() ? starts[b][j + 1] : p.len;
      CAPTURE(b, t0, t1);
      const Problem doc = slice(row, t0, t1);
      const Packed<double> kd = pack<double>(doc, strided_layout(doc));
      const Gradients<double> gd = backward(doc, kd, 5);
      // Per token the same expressions on the same values (the reset multiplies the carried state by 0,
      // where the document alone starts from 0): bit for bit.
      auto tokens = [&](const std::vector<double>& v, int64_t width) {
        return token_rows(v, p.batch, p.len, width, t0, t1, b);
      };
      REQUIRE(forward(doc, kd, 5).out == tokens(f.out, p.dim));
      REQUIRE(gd.du == tokens(g.du, p.dim));
      REQUIRE(gd.ddelta == tokens(g.ddelta, p.dim));
      REQUIRE(gd.d_x_proj == tokens(g.d_x_proj, l.bc_row_stride));
      REQUIRE(gd.d_in_proj == tokens(g.d_in_proj, l.z_row_stride));
      for (size_t i = 0; i < dA.size(); ++i) dA[i] += gd.dA[i];
      for (int64_t d = 0; d < p.dim; ++d) {
        dDskip[d] += gd.dDskip[d];
        ddelta_bias[d] += gd.ddelta_bias[d];
      }
    }
  }
  // The parameter gradients sum over the documents, in another order.
  require_close("dA", g.dA, dA);
  require_close("dDskip", g.dDskip, dDskip);
  require_close("ddelta_bias", g.ddelta_bias, ddelta_bias);
}

namespace {

// Splits p's rows at `cuts` into slices and runs them as context parallelism does: forward initial states
// h0_0 = the rows' initial state, h0_{r+1} = final_r + decay_r * h0_r; backward incoming gradients
// g_{R-1} = 0, g_r = dinit_{r+1} + decay_{r+1} * g_{r+1}. Every output and gradient must equal the
// unsplit rows' (within rounding: the combination reassociates the recurrence).
void check_split(const Problem& p, const std::vector<int32_t>& doc_start, const std::vector<double>& initial_state,
                 const std::vector<int64_t>& cuts) {
  constexpr int64_t kChunk = 4;
  const Packed<double> k = pack<double>(p, strided_layout(p));
  const Layout& l = k.layout;
  const ForwardResult<double> full = forward(p, k, kChunk, {doc_start, initial_state, {}});
  const Gradients<double> full_g = backward(p, k, kChunk, {doc_start, initial_state, {}});
  std::vector<int64_t> bounds{0};
  bounds.insert(bounds.end(), cuts.begin(), cuts.end());
  bounds.push_back(p.len);
  const size_t R = bounds.size() - 1;
  const size_t states = p.batch * p.dim * p.state;
  std::vector<Problem> q;
  std::vector<Packed<double>> kq;
  std::vector<std::vector<int32_t>> ds(R);
  std::vector<std::vector<double>> h0(R), decay(R), g(R);
  for (size_t r = 0; r < R; ++r) {
    q.push_back(slice(p, bounds[r], bounds[r + 1]));
    kq.push_back(pack<double>(q[r], strided_layout(q[r])));
    if (!doc_start.empty()) ds[r] = slice_doc_start(doc_start, p.batch, p.len, bounds[r], bounds[r + 1]);
  }
  h0[0] = initial_state.empty() ? std::vector<double>(states, 0.0) : initial_state;
  for (size_t r = 0; r < R; ++r) {
    const auto [final_h, slice_decay] = final_state(q[r], kq[r], ds[r]);
    decay[r] = slice_decay;
    if (r + 1 < R) {
      h0[r + 1].resize(states);
      for (size_t i = 0; i < states; ++i) h0[r + 1][i] = final_h[i] + decay[r][i] * h0[r][i];
    }
  }
  g[R - 1].assign(states, 0.0);
  for (size_t r = R - 1; r-- > 0;) {
    const std::vector<double> d_initial = initial_state_grad(q[r + 1], kq[r + 1], ds[r + 1]);
    g[r].resize(states);
    for (size_t i = 0; i < states; ++i) g[r][i] = d_initial[i] + decay[r + 1][i] * g[r + 1][i];
  }
  std::vector<double> dA(full_g.dA.size(), 0.0), dDskip(p.dim, 0.0), ddelta_bias(p.dim, 0.0);
  for (size_t r = 0; r < R; ++r) {
    const int64_t t0 = bounds[r], t1 = bounds[r + 1];
    CAPTURE(r, t0, t1);
    auto tokens = [&](const std::vector<double>& v, int64_t width) {
      return token_rows(v, p.batch, p.len, width, t0, t1);
    };
    const Boundary<double> bd{ds[r], h0[r], r + 1 < R ? g[r] : std::vector<double>{}};
    const Gradients<double> gr = backward(q[r], kq[r], kChunk, bd);
    require_close("out", forward(q[r], kq[r], kChunk, bd).out, tokens(full.out, p.dim));
    require_close("du", gr.du, tokens(full_g.du, p.dim));
    require_close("ddelta", gr.ddelta, tokens(full_g.ddelta, p.dim));
    require_close("dB, dC", gr.d_x_proj, tokens(full_g.d_x_proj, l.bc_row_stride));
    require_close("dz", gr.d_in_proj, tokens(full_g.d_in_proj, l.z_row_stride));
    // What this slice sends back: the full rows' d h_{-1} for the first slice, else the previous slice's g.
    require_close("d_initial_state", gr.d_initial_state, r == 0 ? full_g.d_initial_state : g[r - 1]);
    for (size_t i = 0; i < dA.size(); ++i) dA[i] += gr.dA[i];
    for (int64_t d = 0; d < p.dim; ++d) {
      dDskip[d] += gr.dDskip[d];
      ddelta_bias[d] += gr.ddelta_bias[d];
    }
  }
  require_close("dA", dA, full_g.dA);
  require_close("dDskip", dDskip, full_g.dDskip);
  require_close("ddelta_bias", ddelta_bias, full_g.ddelta_bias);
}

}  // namespace

TEST_CASE("selective scan rows split into 2 or 3 slices and recombined equal the unsplit rows") {
  const Problem p = random_problem(2, 13, 3, 4, 24);
  SECTION("unpacked rows from a zero state") {
    check_split(p, {}, {}, {6});
    check_split(p, {}, {}, {4, 9});
  }
  SECTION("packed rows with an initial state") {
    // kPackedStarts: row 0 starts documents at 0, 4, 5, 12; row 1 continues one from the initial state
    // until a start at 7.
    const std::vector<int32_t> doc_start = doc_starts(p.len, kPackedStarts);
    const std::vector<double> initial_state = random_states(p, 25);
    check_split(p, doc_start, initial_state, {6});      // documents spanning the cut in both rows
    check_split(p, doc_start, initial_state, {4, 9});   // row 0: a document starts at a slice's first token
    check_split(p, doc_start, initial_state, {5, 7});   // starts at both slices' first tokens (row 0, row 1)
    check_split(p, doc_start, initial_state, {1, 12});  // one-token slices, the last a one-token document
  }
}

TEST_CASE("selective scan refuses a doc_start that breaks the rules") {
  const Problem p = random_problem(1, 6, 2, 4, 26);
  const Packed<double> k = pack<double>(p, dense_layout(p));
  const std::vector<std::vector<int32_t>> bad{
      {0, 2, 2, 2, 2, 2},     // a start after its token
      {0, 0, 1, 1, 1, 1},     // neither the token nor the previous token's value
      {3, 3, 3, 3, 3, 3},     // the first token's document starting later
      {-2, -2, -1, -1, 4, 4}, // a continued document's start changing
  };
  const SelectiveScanShape s{p.batch, p.len, p.dim, p.state, 4};
  const std::vector<double> chunk_states = forward(p, k, 4).chunk_states;
  std::vector<double> workspace(ssmtune::cpu::selective_scan_backward_workspace_size(s));
  std::vector<double> du(p.rows() * p.dim), ddelta(p.rows() * p.dim), dBC(p.rows() * 2 * p.state), dz(p.rows() * p.dim);
  for (const std::vector<int32_t>& doc_start : bad) {
    CAPTURE(doc_start);
    REQUIRE_THROWS_AS(forward(p, k, 4, {doc_start, {}, {}}), std::invalid_argument);
    REQUIRE_THROWS_AS(ssmtune::cpu::selective_scan_backward<double>(
                          s, k.u.data(), k.delta.data(), k.delta_bias.data(), k.A.data(), k.B(), k.C(), 2 * p.state,
                          k.Dskip.data(), k.z(), p.dim, chunk_states.data(), k.w.data(), du.data(), ddelta.data(),
                          dBC.data(), dBC.data() + p.state, dz.data(), nullptr, nullptr, nullptr, workspace.data(),
                          doc_start.data(), nullptr, nullptr, nullptr),
                      std::invalid_argument);
    REQUIRE_THROWS_AS(final_state(p, k, doc_start), std::invalid_argument);
    REQUIRE_THROWS_AS(initial_state_grad(p, k, doc_start), std::invalid_argument);
  }
  REQUIRE_NOTHROW(forward(p, k, 4, {{-2, -2, 2, 2, 2, 5}, {}, {}}));
}
