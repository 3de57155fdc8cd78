// The LoRA path (kernels/cpu/lora.h) against finite differences, with and without dropout.
#include <random>

#include "kernels/cpu/lora.h"
#include "tests/catch.h"
#include "tests/kernels/finite_difference.h"

using namespace ssmtune;
using test::central_difference;
using test::close_to_fd;

namespace {

struct LoraCase {
  cpu::LoraDims d{5, 7, 6, 3};
  int64_t ldx = 9, ldy = 8;  // strided rows, as the x_proj output is read by dt_proj
  cpu::LoraDropout dropout;
  double scale = 1.7;
  std::vector<double> x, A, B, y0, wy;

  explicit LoraCase(double p) {
    std::mt19937_64 rng(42);
    dropout = {p, 11, 5};
    x = test::random_values(d.rows * ldx, rng);
    A = test::random_values(d.rank * d.in, rng);
    B = test::random_values(d.out * d.rank, rng);
    y0 = test::random_values(d.rows * ldy, rng);
    wy = test::random_values(d.rows * ldy, rng);
  }
  // L = sum(wy * y) with y = y0 + lora(x)
  double loss() {
    std::vector<double> y = y0, h(d.rows * d.rank);
    cpu::lora_forward<double>(d, x.data(), ldx, A.data(), B.data(), scale, dropout, h.data(), d.rank, y.data(), ldy);
    double L = 0;
    for (int64_t t = 0; t < d.rows; ++t)
      for (int64_t o = 0; o < d.out; ++o) L += wy[t * ldy + o] * y[t * ldy + o];
    return L;
  }
};

void check_gradients(double p) {
  LoraCase c(p);
  std::vector<double> y = c.y0, h(c.d.rows * c.d.rank), dA(c.A.size(), 0.0), dB(c.B.size(), 0.0),
                      dx(c.d.rows * c.ldx, 0.0), dh(c.d.rows * c.d.rank);
  cpu::lora_forward<double>(c.d, c.x.data(), c.ldx, c.A.data(), c.B.data(), c.scale, c.dropout, h.data(), c.d.rank,
                            y.data(), c.ldy);
  cpu::lora_backward<double>(c.d, c.x.data(), c.ldx, c.A.data(), c.B.data(), c.scale, c.dropout, h.data(), c.d.rank,
                             c.wy.data(), c.ldy, dA.data(), dB.data(), dx.data(), c.ldx, dh.data());
  for (size_t i = 0; i < c.A.size(); ++i) CHECK(close_to_fd(dA[i], central_difference(c.A, i, [&] { return c.loss(); })));
  for (size_t i = 0; i < c.B.size(); ++i) CHECK(close_to_fd(dB[i], central_difference(c.B, i, [&] { return c.loss(); })));
  for (int64_t t = 0; t < c.d.rows; ++t)
    for (int64_t i = 0; i < c.d.in; ++i) {
      const size_t k = t * c.ldx + i;
      CHECK(close_to_fd(dx[k], central_difference(c.x, k, [&] { return c.loss(); })));
    }
  // Columns past `in` are outside the view: untouched.
  for (int64_t t = 0; t < c.d.rows; ++t)
    for (int64_t i = c.d.in; i < c.ldx; ++i) CHECK(dx[t * c.ldx + i] == 0.0);
}

}  // namespace

TEST_CASE("lora backward matches finite differences without dropout") { check_gradients(0.0); }

TEST_CASE("lora backward matches finite differences with dropout (mask regenerated, not stored)") {
  check_gradients(0.4);
}

TEST_CASE("lora dropout drops about p of the inputs and scales the rest by 1/(1-p)") {
  // With A = identity-like rows and B = 0, h holds dropout(x) for the first `rank` columns.
  cpu::LoraDims d{2000, 4, 1, 4};
  std::vector<double> x(d.rows * d.in, 1.0), A(d.rank * d.in, 0.0), B(d.out * d.rank, 0.0), h(d.rows * d.rank),
      y(d.rows, 0.0);
  for (int64_t j = 0; j < d.rank; ++j) A[j * d.in + j] = 1.0;
  cpu::lora_forward<double>(d, x.data(), d.in, A.data(), B.data(), 1.0, {0.25, 3, 9}, h.data(), d.rank, y.data(), 1);
  int64_t dropped = 0;
  for (double v : h) {
    REQUIRE((v == 0.0 || v == Approx(1.0 / 0.75)));
    dropped += v == 0.0;
  }
  // 8000 Bernoulli(0.25) draws: mean 2000, sd 39; 5 sd either way.
  CHECK(dropped > 2000 - 195);
  CHECK(dropped < 2000 + 195);
}
