// The CUDA selective scan against the CPU reference (kernels/cpu/selective_scan.h) run in double on the
// same bf16-rounded inputs: forward out and chunk states, backward du, ddelta, dB, dC, dz, with B, C (and
// dB, dC) strided inside an x_proj-like buffer and z (and dz) inside an in_proj-like buffer whose other
// columns must stay untouched; chunk lengths 1, 5, 64 and longer than the sequence, channel counts that
// are not multiples of a warp or a block; two runs must agree bit for bit.
#include <cmath>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "framework/dtype.h"
#include "kernels/cpu/selective_scan.h"
#include "kernels/cuda/selective_scan.h"
#include "tests/catch.h"
#include "tests/kernels/device_buffer.h"
#include "tests/kernels/finite_difference.h"

using namespace ssmtune;
using testing::DeviceBuffer;
using testing::random_bf16;
using testing::relative_error;

namespace {

constexpr int64_t kState = 16;
// dt_rank of the x_proj-like buffer: odd, so the B and C rows start at odd element offsets (the kernel may
// assume nothing beyond 2-byte alignment for them).
constexpr int64_t kDtRank = 3;

struct Case {
  int64_t batch, len, dim, chunk_len;
  double decay_min, decay_max;  // A = -exp(uniform(log decay_min, log decay_max))
};

// A in [-16, -0.5] (the spread of trained Mamba layers): states forget within a few tokens, the output
// comes mostly from inside each chunk. A in [-0.2, -0.02]: memory of tens to hundreds of tokens, so the
// carries across chunk boundaries (forward states, backward dh) dominate and any error there shows.
constexpr double kFastMin = 0.5, kFastMax = 16.0, kSlowMin = 0.02, kSlowMax = 0.2;

// A single token; dim not a multiple of 32 and of the 128-channel blocks (40, 200, 96); partial last chunks
// (37 = 7*5 + 2, 200 = 3*64 + 8, 1000 = 15*64 + 40); chunk_len 1 (every token its own chunk); chunk_len
// longer than the sequence (one chunk); a long sequence over several blocks of channels.
const std::vector<Case> kCases{
    {1, 1, 16, 1, kFastMin, kFastMax},      {2, 37, 40, 5, kFastMin, kFastMax},
    {2, 37, 40, 5, kSlowMin, kSlowMax},     {1, 50, 72, 1, kSlowMin, kSlowMax},
    {2, 200, 64, 64, kFastMin, kFastMax},   {2, 200, 64, 64, kSlowMin, kSlowMax},
    {3, 130, 200, 256, kSlowMin, kSlowMax}, {2, 71, 33, 7, kSlowMin, kSlowMax},
    {1, 1000, 96, 64, kSlowMin, kSlowMax},  {2, 2048, 256, 64, kFastMin, kFastMax},
    {2, 2048, 256, 64, kSlowMin, kSlowMax}};

// bf16 outputs: one rounding to bf16 is at most 2^-8 = 3.9e-3 relative per element (RMS ~1e-3), so at
// most that norm-wise; the kernels' fp32 arithmetic (sums of at most a few thousand terms of a contracting
// recurrence, MUFU exp2 within 2 ulp) adds ~1e-5. A lost carry, term or token moves the results by
// percents.
constexpr double kBf16Tolerance = 5e-3;
// chunk_states are fp32 and never rounded to bf16: only fp32 rounding along the recurrence (random in
// sign, ~1e-7 per step, over memories of at most a few hundred tokens) separates them from the double
// reference, ~1e-6; 1e-4 leaves a wide margin and still fails on any bf16 rounding of a state.
constexpr double kStateTolerance = 1e-4;

std::vector<uint16_t> uniform_bf16_bits(size_t n, std::mt19937_64& rng, double lo, double hi) {
  const std::vector<double> draw = test::random_values(n, rng, lo, hi);
  std::vector<uint16_t> bits(n);
  for (size_t i = 0; i < n; ++i) bits[i] = float_to_bf16(static_cast<float>(draw[i]));
  return bits;
}

// Columns [begin, begin + width) of each row of a [rows, stride] buffer, as doubles.
template <typename T>
std::vector<double> view(const std::vector<T>& buffer, int64_t rows, int64_t stride, int64_t begin, int64_t width) {
  std::vector<double> out(rows * width);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < width; ++j) {
      if constexpr (std::is_same_v<T, uint16_t>)
        out[r * width + j] = bf16_to_float(buffer[r * stride + begin + j]);
      else
        out[r * width + j] = buffer[r * stride + begin + j];
    }
  }
  return out;
}

// Elements outside columns [begin, end) of a poisoned [rows, stride] buffer that no longer hold the poison.
int64_t touched_gaps(const std::vector<uint16_t>& buffer, int64_t rows, int64_t stride, int64_t begin, int64_t end) {
  int64_t touched = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < stride; ++j) touched += (j < begin || j >= end) && buffer[r * stride + j] != 0xFFFF;
  }
  return touched;
}

int64_t non_finite(const std::vector<double>& v) {
  int64_t count = 0;
  for (double x : v) count += !std::isfinite(x);
  return count;
}

// Relative error of a device result, after checking every element was written (the poison is NaN).
void check_close(const char* name, const std::vector<double>& out, const std::vector<double>& ref, double tolerance) {
  INFO(name);
  REQUIRE(non_finite(out) == 0);
  const double error = relative_error(out, ref);
  INFO("relative error " << error << ", tolerance " << tolerance);
  CHECK(error <= tolerance);
}

void run_case(const Case& c, std::mt19937_64& rng) {
  const cpu::SelectiveScanShape s{c.batch, c.len, c.dim, kState, c.chunk_len};
  const int64_t rows = c.batch * c.len, D = c.dim, N = kState;
  const int64_t xdbl_stride = kDtRank + 2 * N, xz_stride = 2 * D;
  const int64_t states_size = c.batch * cpu::selective_scan_num_chunks(s) * D * N;

  // delta in [-1, 1] and delta_bias in [-0.25, 0.25]: softplus between 0.2 and 1.6, mid-range for SiLU-
  // and softplus-shaped derivatives alike. B, C, u, z, dout, Dskip ~ N(0, 1).
  const testing::Bf16Values u = random_bf16(rows * D, rng), xdbl = random_bf16(rows * xdbl_stride, rng);
  const testing::Bf16Values xz = random_bf16(rows * xz_stride, rng), dout = random_bf16(rows * D, rng);
  const std::vector<uint16_t> delta_bits = uniform_bf16_bits(rows * D, rng, -1.0, 1.0);
  const std::vector<double> delta = testing::bf16_to_double(delta_bits);
  std::vector<float> delta_bias(D), A(D * N), Dskip(D);
  {
    const std::vector<double> bias_draw = test::random_values(D, rng, -0.25, 0.25);
    const std::vector<double> log_decay = test::random_values(D * N, rng, std::log(c.decay_min), std::log(c.decay_max));
    std::normal_distribution<double> normal(0.0, 1.0);
    for (int64_t d = 0; d < D; ++d) {
      delta_bias[d] = static_cast<float>(bias_draw[d]);
      Dskip[d] = static_cast<float>(normal(rng));
    }
    for (int64_t i = 0; i < D * N; ++i) A[i] = static_cast<float>(-std::exp(log_decay[i]));
  }
  // The reference gets exactly the values the device gets.
  const std::vector<double> delta_bias_ref(delta_bias.begin(), delta_bias.end()), A_ref(A.begin(), A.end()),
      Dskip_ref(Dskip.begin(), Dskip.end());

  std::vector<double> out_ref(rows * D), states_ref(states_size);
  cpu::selective_scan_forward<double>(s, u.values.data(), delta.data(), delta_bias_ref.data(), A_ref.data(),
                                      xdbl.values.data() + kDtRank, xdbl.values.data() + kDtRank + N, xdbl_stride,
                                      Dskip_ref.data(), xz.values.data() + D, xz_stride, out_ref.data(),
                                      states_ref.data());
  std::vector<double> du_ref(rows * D), ddelta_ref(rows * D), dxdbl_ref(rows * xdbl_stride), dxz_ref(rows * xz_stride);
  std::vector<double> cpu_workspace(cpu::selective_scan_backward_workspace_size(s));
  cpu::selective_scan_backward<double>(
      s, u.values.data(), delta.data(), delta_bias_ref.data(), A_ref.data(), xdbl.values.data() + kDtRank,
      xdbl.values.data() + kDtRank + N, xdbl_stride, Dskip_ref.data(), xz.values.data() + D, xz_stride,
      states_ref.data(), dout.values.data(), du_ref.data(), ddelta_ref.data(), dxdbl_ref.data() + kDtRank,
      dxdbl_ref.data() + kDtRank + N, dxz_ref.data() + D, nullptr, nullptr, nullptr, cpu_workspace.data());

  const DeviceBuffer<uint16_t> u_d(u.bits), delta_d(delta_bits), xdbl_d(xdbl.bits), xz_d(xz.bits), dout_d(dout.bits);
  const DeviceBuffer<float> delta_bias_d(delta_bias), A_d(A), Dskip_d(Dskip);
  DeviceBuffer<uint16_t> out_d(rows * D), du_d(rows * D), ddelta_d(rows * D);
  DeviceBuffer<uint16_t> dxdbl_d(rows * xdbl_stride), dxz_d(rows * xz_stride);
  DeviceBuffer<float> states_d(states_size);
  // Each direction gets exactly the scratch it declares (the training step shares one of the larger size).
  DeviceBuffer<uint8_t> forward_workspace_d(cuda::selective_scan_forward_workspace_bytes(s));
  DeviceBuffer<uint8_t> workspace_d(cuda::selective_scan_backward_workspace_bytes(s));
  const uint16_t* B = xdbl_d.get() + kDtRank;
  const uint16_t* C = xdbl_d.get() + kDtRank + N;
  const uint16_t* z = xz_d.get() + D;

  struct Results {
    std::vector<uint16_t> out, du, ddelta, dxdbl, dxz;
    std::vector<float> states;
  };
  // Every output and the workspaces poisoned first: nothing may be left unwritten or read before written.
  auto run = [&] {
    for (DeviceBuffer<uint16_t>* buffer : {&out_d, &du_d, &ddelta_d, &dxdbl_d, &dxz_d}) buffer->poison();
    states_d.poison();
    forward_workspace_d.poison();
    workspace_d.poison();
    cuda::selective_scan_forward(s, u_d.get(), delta_d.get(), delta_bias_d.get(), A_d.get(), B, C, xdbl_stride,
                                 Dskip_d.get(), z, xz_stride, out_d.get(), states_d.get(), forward_workspace_d.get(),
                                 nullptr);
    cuda::selective_scan_backward(s, u_d.get(), delta_d.get(), delta_bias_d.get(), A_d.get(), B, C, xdbl_stride,
                                  Dskip_d.get(), z, xz_stride, states_d.get(), dout_d.get(), du_d.get(),
                                  ddelta_d.get(), dxdbl_d.get() + kDtRank, dxdbl_d.get() + kDtRank + N,
                                  dxz_d.get() + D, workspace_d.get(), nullptr);
    return Results{out_d.download(), du_d.download(), ddelta_d.download(), dxdbl_d.download(), dxz_d.download(),
                   states_d.download()};
  };
  const Results r = run();

  check_close("out", testing::bf16_to_double(r.out), out_ref, kBf16Tolerance);
  check_close("chunk_states", std::vector<double>(r.states.begin(), r.states.end()), states_ref, kStateTolerance);
  check_close("du", testing::bf16_to_double(r.du), du_ref, kBf16Tolerance);
  check_close("ddelta", testing::bf16_to_double(r.ddelta), ddelta_ref, kBf16Tolerance);
  check_close("dB", view(r.dxdbl, rows, xdbl_stride, kDtRank, N), view(dxdbl_ref, rows, xdbl_stride, kDtRank, N),
              kBf16Tolerance);
  check_close("dC", view(r.dxdbl, rows, xdbl_stride, kDtRank + N, N),
              view(dxdbl_ref, rows, xdbl_stride, kDtRank + N, N), kBf16Tolerance);
  check_close("dz", view(r.dxz, rows, xz_stride, D, D), view(dxz_ref, rows, xz_stride, D, D), kBf16Tolerance);
  // The dt_r columns of d_xdbl and the x half of d_xz belong to other ops' gradients.
  CHECK(touched_gaps(r.dxdbl, rows, xdbl_stride, kDtRank, kDtRank + 2 * N) == 0);
  CHECK(touched_gaps(r.dxz, rows, xz_stride, D, 2 * D) == 0);

  // Fixed-order reductions only: a second run gives the same bits everywhere.
  const Results again = run();
  CHECK(again.out == r.out);
  CHECK(again.states == r.states);
  CHECK(again.du == r.du);
  CHECK(again.ddelta == r.ddelta);
  CHECK(again.dxdbl == r.dxdbl);
  CHECK(again.dxz == r.dxz);
}

}  // namespace

TEST_CASE("CUDA selective scan forward and backward match the CPU reference in double") {
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  for (const Case& c : kCases) {
    INFO("seed " << seed << ", batch " << c.batch << ", len " << c.len << ", dim " << c.dim << ", chunk_len "
                 << c.chunk_len << ", A in -[" << c.decay_min << ", " << c.decay_max << "]");
    run_case(c, rng);
  }
}

TEST_CASE("CUDA selective scan refuses a state size other than 16") {
  const cpu::SelectiveScanShape s{1, 8, 32, 8, 4};
  CHECK_THROWS_AS(cuda::selective_scan_forward_workspace_bytes(s), std::invalid_argument);
  CHECK_THROWS_AS(cuda::selective_scan_backward_workspace_bytes(s), std::invalid_argument);
  CHECK_THROWS_AS(cuda::selective_scan_forward(s, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 16, nullptr,
                                               nullptr, 32, nullptr, nullptr, nullptr, nullptr),
                  std::invalid_argument);
  CHECK_THROWS_AS(cuda::selective_scan_backward(s, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 16, nullptr,
                                                nullptr, 32, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                                nullptr, nullptr, nullptr),
                  std::invalid_argument);
}
