// The CUDA selective scan against the CPU reference (kernels/cpu/selective_scan.h) run in double on the
// same bf16-rounded inputs: forward out and chunk states, backward du, ddelta, dB, dC, dz, with B, C (and
// dB, dC) strided inside an x_proj-like buffer and z (and dz) inside an in_proj-like buffer whose other
// columns must stay untouched; chunk lengths 1, 5, 64 and longer than the sequence, channel counts that
// are not multiples of a warp or a block; two runs must agree bit for bit. With sequence boundaries:
// document starts (at position 0, at chunk boundaries, one-token documents, at the last position, rows
// continuing a document from the initial state), initial_state, d_final_state, d_initial_state, out with
// spare columns; the forward by its single pass and by its chunked passes, and every op also in its two
// halves (selective_scan_forward_begin / _end, backward_begin / _end).
#include <algorithm>
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

// What a case runs with besides the plain scan: document starts, an initial state and an incoming
// d_final_state (then d_initial_state, and the halves' final_state, decay and initial_state_grad, are
// checked against nonzero references), and out
// with spare columns.
struct Boundaries {
  bool on;
  int64_t out_spare;  // columns of out past dim, which must stay untouched
};
constexpr Boundaries kPlain{false, 0}, kWithBoundaries{true, 3};

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
// reference, ~1e-6; 1e-4 leaves a wide margin and still fails on any bf16 rounding of a state. The same
// holds for final_state and d_initial_state (the dh recurrence, as long and as contracting).
constexpr double kStateTolerance = 1e-4;
// decay = exp(A * sum of delta over the row) spans hundreds of orders of magnitude, so it is compared element
// by element. Its relative error is about |A * sum| (< 70 above 1e-30) times the fp32 errors of A * log2(e)
// and of the delta sums (a few 1e-7), plus ~2e-7 per chunk factor (MUFU ex2): below 3e-5; a missing chunk
// factor or reset errs by 20% or more. Below 1e-30 the device may flush to 0 (ex2.approx.ftz, fp32 under
// 2^-126): an absolute 1e-30 covers that.
constexpr double kDecayTolerance = 1e-3, kDecayFloor = 1e-30;

// doc_start of rows that begin documents at the given positions; before a row's first start (or throughout
// a row without one) the row continues a document begun 3 tokens before it, whose state is initial_state.
std::vector<int32_t> doc_starts(int64_t len, const std::vector<std::vector<int64_t>>& starts_per_row) {
  std::vector<int32_t> doc_start;
  for (const std::vector<int64_t>& starts : starts_per_row) {
    int32_t current = -3;
    for (int64_t t = 0; t < len; ++t) {
      if (std::find(starts.begin(), starts.end(), t) != starts.end()) current = static_cast<int32_t>(t);
      doc_start.push_back(current);
    }
  }
  return doc_start;
}

// Row 0: a document at position 0, at the second chunk's first token, a one-token document right after it, a
// random start and a one-token document at the last position. Row 1: continues from the initial state until a
// random start (mid-chunk, as often as not). Further rows: continue one document throughout, or start one at
// a random position.
std::vector<int32_t> case_doc_start(const Case& c, std::mt19937_64& rng) {
  std::uniform_int_distribution<int64_t> position(0, c.len - 1);
  std::vector<std::vector<int64_t>> starts(c.batch);
  starts[0] = {0, c.chunk_len, c.chunk_len + 1, position(rng), c.len - 1};
  for (int64_t b = 1; b < c.batch; ++b)
    if (b % 2 == 1) starts[b] = {std::max<int64_t>(1, position(rng))};
  return doc_starts(c.len, starts);
}

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

// decay against the reference, element by element (kDecayTolerance); exact zeros (rows in which a document
// starts) must be exact on the device too.
void check_decay(const std::vector<float>& out, const std::vector<double>& ref) {
  REQUIRE(out.size() == ref.size());
  int64_t wrong = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    const double error = std::abs(double(out[i]) - ref[i]);
    wrong += !(error <= kDecayTolerance * std::abs(ref[i]) + kDecayFloor) || (ref[i] == 0.0 && out[i] != 0.0f);
  }
  CHECK(wrong == 0);
}

// Relative error of a device result, after checking every element was written (the poison is NaN).
void check_close(const char* name, const std::vector<double>& out, const std::vector<double>& ref, double tolerance) {
  INFO(name);
  REQUIRE(non_finite(out) == 0);
  const double error = relative_error(out, ref);
  INFO("relative error " << error << ", tolerance " << tolerance);
  CHECK(error <= tolerance);
}

void run_case(const Case& c, const Boundaries& boundaries, std::mt19937_64& rng) {
  const cpu::SelectiveScanShape s{c.batch, c.len, c.dim, kState, c.chunk_len};
  const int64_t rows = c.batch * c.len, D = c.dim, N = kState;
  const int64_t xdbl_stride = kDtRank + 2 * N, xz_stride = 2 * D, out_stride = D + boundaries.out_spare;
  const int64_t states_size = c.batch * cpu::selective_scan_num_chunks(s) * D * N, row_states = c.batch * D * N;

  // delta in [-1, 1] and delta_bias in [-0.25, 0.25]: softplus between 0.2 and 1.6, mid-range for SiLU-
  // and softplus-shaped derivatives alike. B, C, u, z, dout, Dskip, initial_state, d_final_state ~ N(0, 1).
  const testing::Bf16Values u = random_bf16(rows * D, rng), xdbl = random_bf16(rows * xdbl_stride, rng);
  const testing::Bf16Values xz = random_bf16(rows * xz_stride, rng), dout = random_bf16(rows * D, rng);
  const std::vector<uint16_t> delta_bits = uniform_bf16_bits(rows * D, rng, -1.0, 1.0);
  const std::vector<double> delta = testing::bf16_to_double(delta_bits);
  std::vector<float> delta_bias(D), A(D * N), Dskip(D), initial_state, d_final_state;
  std::vector<int32_t> doc_start;
  {
    const std::vector<double> bias_draw = test::random_values(D, rng, -0.25, 0.25);
    const std::vector<double> log_decay = test::random_values(D * N, rng, std::log(c.decay_min), std::log(c.decay_max));
    std::normal_distribution<double> normal(0.0, 1.0);
    for (int64_t d = 0; d < D; ++d) {
      delta_bias[d] = static_cast<float>(bias_draw[d]);
      Dskip[d] = static_cast<float>(normal(rng));
    }
    for (int64_t i = 0; i < D * N; ++i) A[i] = static_cast<float>(-std::exp(log_decay[i]));
    if (boundaries.on) {
      doc_start = case_doc_start(c, rng);
      for (std::vector<float>* v : {&initial_state, &d_final_state}) {
        v->resize(row_states);
        for (float& x : *v) x = static_cast<float>(normal(rng));
      }
    }
  }
  // The reference gets exactly the values the device gets.
  auto widen = [](const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); };
  const std::vector<double> delta_bias_ref = widen(delta_bias), A_ref = widen(A), Dskip_ref = widen(Dskip);
  const std::vector<double> initial_state_ref = widen(initial_state), d_final_state_ref = widen(d_final_state);
  auto or_null = [](const auto& v) { return v.empty() ? nullptr : v.data(); };
  const int32_t* doc_start_ref = or_null(doc_start);
  const double* B_ref = xdbl.values.data() + kDtRank;
  const double* C_ref = xdbl.values.data() + kDtRank + N;
  const double* z_ref = xz.values.data() + D;

  std::vector<double> out_ref(rows * D), states_ref(states_size);
  cpu::selective_scan_forward<double>(s, u.values.data(), delta.data(), delta_bias_ref.data(), A_ref.data(), B_ref,
                                      C_ref, xdbl_stride, Dskip_ref.data(), z_ref, xz_stride, out_ref.data(), D,
                                      states_ref.data(), doc_start_ref, or_null(initial_state_ref));
  std::vector<double> du_ref(rows * D), ddelta_ref(rows * D), dxdbl_ref(rows * xdbl_stride), dxz_ref(rows * xz_stride);
  std::vector<double> d_initial_ref(row_states), final_ref(row_states), decay_ref(row_states),
      initial_grad_ref(row_states);
  std::vector<double> cpu_workspace(cpu::selective_scan_backward_workspace_size(s));
  cpu::selective_scan_backward<double>(
      s, u.values.data(), delta.data(), delta_bias_ref.data(), A_ref.data(), B_ref, C_ref, xdbl_stride,
      Dskip_ref.data(), z_ref, xz_stride, states_ref.data(), dout.values.data(), du_ref.data(), ddelta_ref.data(),
      dxdbl_ref.data() + kDtRank, dxdbl_ref.data() + kDtRank + N, dxz_ref.data() + D, nullptr, nullptr, nullptr,
      cpu_workspace.data(), doc_start_ref, or_null(initial_state_ref), or_null(d_final_state_ref),
      d_initial_ref.data());
  cpu::selective_scan_final_state<double>(s, u.values.data(), delta.data(), delta_bias_ref.data(), A_ref.data(), B_ref,
                                          xdbl_stride, doc_start_ref, final_ref.data(), decay_ref.data());
  cpu::selective_scan_initial_state_grad<double>(s, delta.data(), delta_bias_ref.data(), A_ref.data(), C_ref,
                                                 xdbl_stride, z_ref, xz_stride, dout.values.data(), doc_start_ref,
                                                 initial_grad_ref.data());

  const DeviceBuffer<uint16_t> u_d(u.bits), delta_d(delta_bits), xdbl_d(xdbl.bits), xz_d(xz.bits), dout_d(dout.bits);
  const DeviceBuffer<float> delta_bias_d(delta_bias), A_d(A), Dskip_d(Dskip);
  // Null where a case runs without boundaries: size-1 buffers that are never passed.
  const DeviceBuffer<int32_t> doc_start_d(boundaries.on ? doc_start : std::vector<int32_t>{0});
  const DeviceBuffer<float> initial_state_d(boundaries.on ? initial_state : std::vector<float>{0});
  const DeviceBuffer<float> d_final_state_d(boundaries.on ? d_final_state : std::vector<float>{0});
  const int32_t* doc_start_arg = boundaries.on ? doc_start_d.get() : nullptr;
  const float* initial_state_arg = boundaries.on ? initial_state_d.get() : nullptr;
  const float* d_final_state_arg = boundaries.on ? d_final_state_d.get() : nullptr;
  DeviceBuffer<uint16_t> out_d(rows * out_stride), du_d(rows * D), ddelta_d(rows * D);
  DeviceBuffer<uint16_t> dxdbl_d(rows * xdbl_stride), dxz_d(rows * xz_stride);
  DeviceBuffer<float> states_d(states_size), d_initial_d(row_states), final_d(row_states), decay_d(row_states);
  // Each op gets exactly the scratch it declares (the training step shares one of the largest size).
  DeviceBuffer<uint8_t> forward_workspace_d(cuda::selective_scan_forward_workspace_bytes(s));
  DeviceBuffer<uint8_t> workspace_d(cuda::selective_scan_backward_workspace_bytes(s));
  const uint16_t* B = xdbl_d.get() + kDtRank;
  const uint16_t* C = xdbl_d.get() + kDtRank + N;
  const uint16_t* z = xz_d.get() + D;

  struct Results {
    std::vector<uint16_t> out, du, ddelta, dxdbl, dxz;
    std::vector<float> states, d_initial, final_state, decay;
  };
  // Every output and the workspaces poisoned first: nothing may be left unwritten or read before written.
  // One call per op (the forward's single pass or its chunked passes), or each op in its two halves
  // (split): then d_initial is the begin's (no gradient arriving), final_state and decay are written, and
  // the end gets initial_state and d_final_state.
  enum class Mode { single_pass, chunked, split };
  auto run = [&](Mode mode) {
    const bool split = mode == Mode::split;
    for (DeviceBuffer<uint16_t>* buffer : {&out_d, &du_d, &ddelta_d, &dxdbl_d, &dxz_d}) buffer->poison();
    for (DeviceBuffer<float>* buffer : {&states_d, &d_initial_d, &final_d, &decay_d}) buffer->poison();
    for (DeviceBuffer<uint8_t>* buffer : {&forward_workspace_d, &workspace_d}) buffer->poison();
    if (split) {
      cuda::selective_scan_forward_begin(s, u_d.get(), delta_d.get(), delta_bias_d.get(), A_d.get(), B, xdbl_stride,
                                         states_d.get(), forward_workspace_d.get(), doc_start_arg, final_d.get(),
                                         decay_d.get(), nullptr);
      cuda::selective_scan_forward_end(s, u_d.get(), delta_d.get(), delta_bias_d.get(), A_d.get(), B, C, xdbl_stride,
                                       Dskip_d.get(), z, xz_stride, out_d.get(), out_stride, states_d.get(),
                                       forward_workspace_d.get(), doc_start_arg, initial_state_arg, nullptr);
      cuda::selective_scan_backward_begin(s, u_d.get(), delta_d.get(), delta_bias_d.get(), A_d.get(), B, C,
                                          xdbl_stride, z, xz_stride, states_d.get(), dout_d.get(), workspace_d.get(),
                                          doc_start_arg, initial_state_arg, d_initial_d.get(), nullptr);
      cuda::selective_scan_backward_end(s, u_d.get(), delta_d.get(), delta_bias_d.get(), A_d.get(), B, C, xdbl_stride,
                                        Dskip_d.get(), z, xz_stride, states_d.get(), dout_d.get(), du_d.get(),
                                        ddelta_d.get(), dxdbl_d.get() + kDtRank, dxdbl_d.get() + kDtRank + N,
                                        dxz_d.get() + D, workspace_d.get(), doc_start_arg, initial_state_arg,
                                        d_final_state_arg, nullptr);
    } else {
      cuda::selective_scan_forward(s, u_d.get(), delta_d.get(), delta_bias_d.get(), A_d.get(), B, C, xdbl_stride,
                                   Dskip_d.get(), z, xz_stride, out_d.get(), out_stride, states_d.get(),
                                   forward_workspace_d.get(), doc_start_arg, initial_state_arg, nullptr,
                                   mode == Mode::chunked ? cuda::ScanForwardPath::chunked
                                                         : cuda::ScanForwardPath::single_pass);
      cuda::selective_scan_backward(s, u_d.get(), delta_d.get(), delta_bias_d.get(), A_d.get(), B, C, xdbl_stride,
                                    Dskip_d.get(), z, xz_stride, states_d.get(), dout_d.get(), du_d.get(),
                                    ddelta_d.get(), dxdbl_d.get() + kDtRank, dxdbl_d.get() + kDtRank + N,
                                    dxz_d.get() + D, workspace_d.get(), doc_start_arg, initial_state_arg,
                                    d_final_state_arg, d_initial_d.get(), nullptr);
    }
    return Results{out_d.download(), du_d.download(),     ddelta_d.download(),    dxdbl_d.download(),
                   dxz_d.download(), states_d.download(), d_initial_d.download(), final_d.download(),
                   decay_d.download()};
  };
  auto as_double = [](const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); };

  for (const Mode mode : {Mode::single_pass, Mode::chunked, Mode::split}) {
    const bool split = mode == Mode::split;
    INFO((split                   ? "each op in two halves"
          : mode == Mode::chunked ? "one call, chunked forward"
                                  : "one call, single-pass forward"));
    const Results r = run(mode);
    check_close("out", view(r.out, rows, out_stride, 0, D), out_ref, kBf16Tolerance);
    check_close("chunk_states", as_double(r.states), states_ref, kStateTolerance);
    check_close("du", testing::bf16_to_double(r.du), du_ref, kBf16Tolerance);
    check_close("ddelta", testing::bf16_to_double(r.ddelta), ddelta_ref, kBf16Tolerance);
    check_close("dB", view(r.dxdbl, rows, xdbl_stride, kDtRank, N), view(dxdbl_ref, rows, xdbl_stride, kDtRank, N),
                kBf16Tolerance);
    check_close("dC", view(r.dxdbl, rows, xdbl_stride, kDtRank + N, N),
                view(dxdbl_ref, rows, xdbl_stride, kDtRank + N, N), kBf16Tolerance);
    check_close("dz", view(r.dxz, rows, xz_stride, D, D), view(dxz_ref, rows, xz_stride, D, D), kBf16Tolerance);
    if (split) {
      check_close("final_state", as_double(r.final_state), final_ref, kStateTolerance);
      check_decay(r.decay, decay_ref);
      check_close("initial_state_grad", as_double(r.d_initial), initial_grad_ref, kStateTolerance);
    } else {
      check_close("d_initial_state", as_double(r.d_initial), d_initial_ref, kStateTolerance);
    }
    // The dt_r columns of d_xdbl, the x half of d_xz and out's spare columns belong to other ops.
    CHECK(touched_gaps(r.dxdbl, rows, xdbl_stride, kDtRank, kDtRank + 2 * N) == 0);
    CHECK(touched_gaps(r.dxz, rows, xz_stride, D, 2 * D) == 0);
    CHECK(touched_gaps(r.out, rows, out_stride, 0, D) == 0);

    // Fixed-order reductions only: a second run gives the same bits everywhere.
    const Results again = run(mode);
    CHECK(again.out == r.out);
    CHECK(again.states == r.states);
    CHECK(again.du == r.du);
    CHECK(again.ddelta == r.ddelta);
    CHECK(again.dxdbl == r.dxdbl);
    CHECK(again.dxz == r.dxz);
    CHECK(again.d_initial == r.d_initial);
    if (split) {
      CHECK(again.final_state == r.final_state);
      CHECK(again.decay == r.decay);
    }
  }
}

}  // namespace

TEST_CASE("CUDA selective scan forward and backward match the CPU reference in double") {
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  for (const Case& c : kCases) {
    INFO("seed " << seed << ", batch " << c.batch << ", len " << c.len << ", dim " << c.dim << ", chunk_len "
                 << c.chunk_len << ", A in -[" << c.decay_min << ", " << c.decay_max << "]");
    run_case(c, kPlain, rng);
  }
}

TEST_CASE("CUDA selective scan with document starts, initial state and d_final_state matches the CPU reference") {
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  // A single token (a one-token document at position 0 = the last position in row 0); lengths across one and
  // several chunk boundaries, odd, with partial last chunks; chunk_len 1; a chunk longer than the sequence
  // (the carry runs for the initial state alone); dim not a multiple of 32 or 128; batch 3 with a row that
  // continues one document throughout; the benchmark-like chunk of 64 over a long row.
  const std::vector<Case> cases{
      {2, 1, 16, 1, kSlowMin, kSlowMax},      {2, 37, 40, 5, kFastMin, kFastMax},
      {3, 37, 40, 5, kSlowMin, kSlowMax},     {2, 50, 72, 1, kSlowMin, kSlowMax},
      {2, 130, 200, 256, kSlowMin, kSlowMax}, {3, 71, 33, 7, kSlowMin, kSlowMax},
      {3, 1000, 96, 64, kSlowMin, kSlowMax},  {2, 2048, 256, 64, kFastMin, kFastMax}};
  for (const Case& c : cases) {
    INFO("seed " << seed << ", batch " << c.batch << ", len " << c.len << ", dim " << c.dim << ", chunk_len "
                 << c.chunk_len << ", A in -[" << c.decay_min << ", " << c.decay_max << "]");
    run_case(c, kWithBoundaries, rng);
  }
}

TEST_CASE("CUDA selective scan refuses a state size other than 16") {
  const cpu::SelectiveScanShape s{1, 8, 32, 8, 4};
  CHECK_THROWS_AS(cuda::selective_scan_forward_workspace_bytes(s), std::invalid_argument);
  CHECK_THROWS_AS(cuda::selective_scan_backward_workspace_bytes(s), std::invalid_argument);
  CHECK_THROWS_AS(cuda::selective_scan_forward(s, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 16, nullptr,
                                               nullptr, 32, nullptr, 32, nullptr, nullptr, nullptr, nullptr, nullptr),
                  std::invalid_argument);
  CHECK_THROWS_AS(cuda::selective_scan_backward(s, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 16, nullptr,
                                                nullptr, 32, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                                nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr),
                  std::invalid_argument);
}
