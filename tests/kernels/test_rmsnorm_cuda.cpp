// The CUDA RMSNorm (fused with the residual add) against the CPU reference run in double on the same
// inputs: fresh random inputs, outputs poisoned, with and without add (x_out apart from x and aliasing
// it), with and without a weight, and a backward whose bf16 copy goes nowhere, apart, or over dy. Then
// falcon-mamba's weightless norm of strided bf16 rows, forward and backward, the same way, with NaN in
// the input gaps (a read outside the view shows) and a sentinel in the output gaps (a write outside shows).
#include <cstdint>
#include <random>
#include <stdexcept>
#include <utility>
#include <vector>

#include "framework/dtype.h"
#include "kernels/cpu/rmsnorm.h"
#include "kernels/cuda/rmsnorm.h"
#include "tests/catch.h"
#include "tests/kernels/device_buffer.h"
#include "tests/kernels/finite_difference.h"

using namespace ssmtune;
using testing::DeviceBuffer;
using testing::random_bf16;
using testing::relative_error;

namespace {

// Odd dims and dim 1 (scalar path), multiples of 4 (vector path), model widths, the widest row supported,
// and enough rows to fill the device.
const std::vector<std::pair<int64_t, int64_t>> kShapes{{1, 1},    {3, 33},   {7, 100},   {64, 768},
                                                       {5, 2560}, {2, 4095}, {3, 16384}, {1000, 2048}};
constexpr float kEps = 1e-5f;

// Tolerances (||out - ref|| / ||ref||). fp32 outputs: a single fp32 add (x_out) is within 2^-24 = 6e-8 of
// the exact sum; rstd and dx come from fp32 sums of at most 16384 terms in a tree (error ~log2(n) * 6e-8)
// and a few roundings more, far below 1e-5. bf16 outputs: one rounding to bf16 is at most 2^-8 = 3.9e-3
// relative per element (so norm-wise too), plus the fp32 error: 5e-3.
constexpr double kSumTolerance = 1e-6;
constexpr double kFp32Tolerance = 1e-5;
constexpr double kBf16Tolerance = 5e-3;

std::vector<float> to_float(const std::vector<double>& v) { return {v.begin(), v.end()}; }
std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

enum class AddMode { kNone, kSeparate, kAliasX };
enum class ActMode { kNone, kSeparate, kAliasDy };

}  // namespace

TEST_CASE("CUDA rmsnorm forward equals the CPU reference, with and without the residual add") {
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  for (const auto& [rows, dim] : kShapes) {
    for (const bool weighted : {true, false}) {
      for (const AddMode mode : {AddMode::kNone, AddMode::kSeparate, AddMode::kAliasX}) {
        INFO("seed " << seed << ", rows " << rows << ", dim " << dim << ", weighted " << weighted << ", add mode "
                     << static_cast<int>(mode));
        const size_t n = static_cast<size_t>(rows * dim);
        const std::vector<float> x = to_float(test::random_values(n, rng, -2.0, 2.0));
        const testing::Bf16Values add = random_bf16(n, rng);
        const std::vector<float> weight = to_float(test::random_values(dim, rng, 0.5, 1.5));

        DeviceBuffer<float> d_x(x), d_x_out(n), d_weight(weight), d_rstd(rows);
        DeviceBuffer<uint16_t> d_add(add.bits), d_y(n);
        float* x_out = mode == AddMode::kSeparate ? d_x_out.get() : mode == AddMode::kAliasX ? d_x.get() : nullptr;
        cuda::rmsnorm_forward(d_x.get(), mode == AddMode::kNone ? nullptr : d_add.get(), x_out,
                              weighted ? d_weight.get() : nullptr, d_y.get(), dim, d_rstd.get(), rows, dim, kEps,
                              nullptr);

        std::vector<double> normed_input = to_double(x);
        if (mode != AddMode::kNone) {
          for (size_t i = 0; i < n; ++i) normed_input[i] += add.values[i];
        }
        const std::vector<double> weight_ref = to_double(weight);
        std::vector<double> y_ref(n), rstd_ref(rows);
        cpu::rmsnorm_forward<double>(normed_input.data(), weighted ? weight_ref.data() : nullptr, y_ref.data(),
                                     rstd_ref.data(), rows, dim, kEps);

        CHECK(relative_error(testing::bf16_to_double(d_y.download()), y_ref) < kBf16Tolerance);
        CHECK(relative_error(to_double(d_rstd.download()), rstd_ref) < kFp32Tolerance);
        switch (mode) {
          case AddMode::kNone:  // x is only read
            CHECK(d_x.download() == x);
            break;
          case AddMode::kSeparate:
            CHECK(relative_error(to_double(d_x_out.download()), normed_input) < kSumTolerance);
            CHECK(d_x.download() == x);
            break;
          case AddMode::kAliasX:
            CHECK(relative_error(to_double(d_x.download()), normed_input) < kSumTolerance);
            break;
        }
        CHECK(d_add.download() == add.bits);
      }
    }
  }
}

// The normed output of in_proj's input keeps the LoRA h in the columns after dim (framework/backend.h):
// y written with a row stride, the gap left as it was.
TEST_CASE("CUDA rmsnorm forward writes y with a row stride and leaves the columns past dim alone") {
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  for (const auto& [rows, dim] : {std::pair<int64_t, int64_t>{7, 100}, {64, 768}, {3, 33}}) {
    for (const int64_t gap : {int64_t{8}, int64_t{16}, int64_t{5}}) {
      INFO("seed " << seed << ", rows " << rows << ", dim " << dim << ", gap " << gap);
      const int64_t ldy = dim + gap;
      const size_t n = static_cast<size_t>(rows * dim);
      const std::vector<float> x = to_float(test::random_values(n, rng, -2.0, 2.0));
      const std::vector<float> weight = to_float(test::random_values(dim, rng, 0.5, 1.5));
      DeviceBuffer<float> d_x(x), d_weight(weight), d_rstd(rows);
      DeviceBuffer<uint16_t> d_y(static_cast<size_t>(rows * ldy));  // poisoned: 0xFFFF everywhere
      cuda::rmsnorm_forward(d_x.get(), nullptr, nullptr, d_weight.get(), d_y.get(), ldy, d_rstd.get(), rows, dim, kEps,
                            nullptr);
      std::vector<double> y_ref(n), rstd_ref(rows);
      const std::vector<double> x_ref = to_double(x), weight_ref = to_double(weight);
      cpu::rmsnorm_forward<double>(x_ref.data(), weight_ref.data(), y_ref.data(), rstd_ref.data(), rows, dim, kEps);
      const std::vector<uint16_t> y = d_y.download();
      std::vector<uint16_t> y_rows;
      bool gap_untouched = true;
      for (int64_t r = 0; r < rows; ++r) {
        y_rows.insert(y_rows.end(), y.begin() + r * ldy, y.begin() + r * ldy + dim);
        for (int64_t c = dim; c < ldy; ++c) gap_untouched = gap_untouched && y[r * ldy + c] == testing::kBf16NaN;
      }
      CHECK(gap_untouched);
      CHECK(relative_error(testing::bf16_to_double(y_rows), y_ref) < kBf16Tolerance);
    }
  }
}

TEST_CASE("CUDA rmsnorm backward equals the CPU reference, and its bf16 copy may overwrite dy") {
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  for (const auto& [rows, dim] : kShapes) {
    for (const bool weighted : {true, false}) {
      for (const ActMode mode : {ActMode::kNone, ActMode::kSeparate, ActMode::kAliasDy}) {
        INFO("seed " << seed << ", rows " << rows << ", dim " << dim << ", weighted " << weighted << ", act mode "
                     << static_cast<int>(mode));
        const size_t n = static_cast<size_t>(rows * dim);
        const std::vector<float> x = to_float(test::random_values(n, rng, -2.0, 2.0));
        const std::vector<float> weight = to_float(test::random_values(dim, rng, 0.5, 1.5));
        const testing::Bf16Values dy = random_bf16(n, rng);
        // dx is accumulated into: start it non-zero.
        const std::vector<float> dx_before = to_float(test::random_values(n, rng));
        // rstd as the forward saves it (fp32); the reference uses the same rounded values.
        const std::vector<double> x_ref = to_double(x), weight_ref = to_double(weight);
        std::vector<double> y_unused(n), rstd_exact(rows);
        cpu::rmsnorm_forward<double>(x_ref.data(), weighted ? weight_ref.data() : nullptr, y_unused.data(),
                                     rstd_exact.data(), rows, dim, kEps);
        const std::vector<float> rstd = to_float(rstd_exact);

        DeviceBuffer<float> d_x(x), d_weight(weight), d_rstd(rstd), d_dx(dx_before);
        DeviceBuffer<uint16_t> d_dy(dy.bits), d_dx_act(n);
        uint16_t* dx_act = mode == ActMode::kSeparate  ? d_dx_act.get()
                           : mode == ActMode::kAliasDy ? d_dy.get()
                                                       : nullptr;
        cuda::rmsnorm_backward(d_x.get(), weighted ? d_weight.get() : nullptr, d_rstd.get(), d_dy.get(), d_dx.get(),
                               dx_act, rows, dim, nullptr);

        std::vector<double> dx_ref = to_double(dx_before);
        const std::vector<double> rstd_ref = to_double(rstd);
        cpu::rmsnorm_backward<double>(x_ref.data(), weighted ? weight_ref.data() : nullptr, rstd_ref.data(),
                                      dy.values.data(), dx_ref.data(), nullptr, rows, dim);

        const std::vector<float> dx = d_dx.download();
        CHECK(relative_error(to_double(dx), dx_ref) < kFp32Tolerance);
        // The bf16 copy is the updated fp32 dx rounded to nearest even, bit for bit.
        std::vector<uint16_t> dx_rounded(n);
        for (size_t i = 0; i < n; ++i) dx_rounded[i] = float_to_bf16(dx[i]);
        switch (mode) {
          case ActMode::kNone:
            CHECK(d_dy.download() == dy.bits);
            break;
          case ActMode::kSeparate:
            CHECK(d_dx_act.download() == dx_rounded);
            CHECK(d_dy.download() == dy.bits);
            break;
          case ActMode::kAliasDy:
            CHECK(d_dy.download() == dx_rounded);
            break;
        }
        CHECK(d_x.download() == x);
      }
    }
  }
}

namespace {

// One strided view per operand: rows, dim, and each operand's row stride and first element.
struct WeightlessShape {
  int64_t rows, dim, ld_in, offset_in, ld_out, offset_out;
};
// dt_rank 3 (the gradient checks), B and C inside a 48-column x_proj output (d_model 256), falcon-mamba-7b's
// dt_r (256 of 288 columns) and C, wide rows (32 lanes walk them many times), dim 1, and row counts that
// leave the last block of 8 rows part-empty.
const std::vector<WeightlessShape> kWeightlessShapes{
    {1, 1, 1, 0, 1, 0},           {5, 3, 7, 0, 3, 0},          {333, 16, 48, 16, 48, 32},
    {4096, 256, 288, 0, 288, 0},  {4099, 16, 288, 272, 288, 272}, {2, 1000, 1003, 1, 1001, 2},
    {9, 33, 33, 0, 40, 5}};
constexpr uint16_t kGapSentinel = 0x4049;  // bf16 3.140625

// A view's elements in row order.
std::vector<double> view_of(const std::vector<double>& buffer, int64_t rows, int64_t dim, int64_t ld, int64_t offset) {
  std::vector<double> out;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < dim; ++i) out.push_back(buffer[offset + r * ld + i]);
  return out;
}

// An output buffer for a strided view: NaN inside the view (poisoned), the sentinel in the gaps.
testing::StridedBf16 output_view(int64_t rows, int64_t dim, int64_t ld, int64_t offset, std::mt19937_64& rng) {
  testing::StridedBf16 out = testing::strided_bf16(rows, dim, ld, offset, kGapSentinel, rng);
  for (size_t at = 0; at < out.bits.size(); ++at)
    if (out.inside(at)) out.bits[at] = testing::kBf16NaN;
  return out;
}

// Every gap element of an output still holds the sentinel.
bool gaps_intact(const testing::StridedBf16& layout, const std::vector<uint16_t>& bits) {
  for (size_t at = 0; at < bits.size(); ++at)
    if (!layout.inside(at) && bits[at] != kGapSentinel) return false;
  return true;
}

}  // namespace

TEST_CASE("CUDA weightless rmsnorm of strided bf16 rows equals the CPU reference, forward and backward") {
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  const testing::NonBlockingStream stream;
  constexpr float kMixerEps = 1e-6f;
  for (const WeightlessShape& s : kWeightlessShapes) {
    INFO("seed " << seed << ", rows " << s.rows << ", dim " << s.dim << ", ld " << s.ld_in << "/" << s.ld_out);
    // Forward: x -> y. NaN in x's gaps, so a read outside the view poisons a row.
    const testing::StridedBf16 x = testing::strided_bf16(s.rows, s.dim, s.ld_in, s.offset_in, testing::kBf16NaN, rng);
    const testing::StridedBf16 y0 = output_view(s.rows, s.dim, s.ld_out, s.offset_out, rng);
    DeviceBuffer<uint16_t> d_x(x.bits), d_y(y0.bits);
    DeviceBuffer<float> d_rstd(static_cast<size_t>(s.rows));
    cuda::weightless_rmsnorm_forward(d_x.get() + s.offset_in, s.ld_in, d_y.get() + s.offset_out, s.ld_out,
                                     d_rstd.get(), s.rows, s.dim, kMixerEps, stream.get());
    std::vector<double> y_ref(y0.values.size(), 0.0), rstd_ref(static_cast<size_t>(s.rows));
    cpu::rmsnorm_forward<double>(x.values.data() + s.offset_in, s.ld_in, nullptr, y_ref.data() + s.offset_out,
                                 s.ld_out, rstd_ref.data(), s.rows, s.dim, kMixerEps);
    const std::vector<uint16_t> y = d_y.download();
    CHECK(relative_error(view_of(testing::bf16_to_double(y), s.rows, s.dim, s.ld_out, s.offset_out),
                         view_of(y_ref, s.rows, s.dim, s.ld_out, s.offset_out)) < kBf16Tolerance);
    const std::vector<float> rstd = d_rstd.download();
    CHECK(relative_error(to_double(rstd), rstd_ref) < kFp32Tolerance);
    CHECK(gaps_intact(y0, y));
    CHECK(d_x.download() == x.bits);

    // Backward: dy -> dx from x and the rstd the forward saved; dy laid out like y, dx like x.
    const testing::StridedBf16 dy =
        testing::strided_bf16(s.rows, s.dim, s.ld_out, s.offset_out, testing::kBf16NaN, rng);
    const testing::StridedBf16 dx0 = output_view(s.rows, s.dim, s.ld_in, s.offset_in, rng);
    DeviceBuffer<uint16_t> d_dy(dy.bits), d_dx(dx0.bits);
    cuda::weightless_rmsnorm_backward(d_x.get() + s.offset_in, s.ld_in, d_rstd.get(), d_dy.get() + s.offset_out,
                                      s.ld_out, d_dx.get() + s.offset_in, s.ld_in, s.rows, s.dim, stream.get());
    std::vector<double> dx_ref(dx0.values.size(), 0.0);
    const std::vector<double> rstd_saved = to_double(rstd);
    cpu::rmsnorm_backward<double>(x.values.data() + s.offset_in, s.ld_in, nullptr, rstd_saved.data(),
                                  dy.values.data() + s.offset_out, s.ld_out, dx_ref.data() + s.offset_in, s.ld_in,
                                  false, nullptr, s.rows, s.dim);
    const std::vector<uint16_t> dx = d_dx.download();
    // dx = rstd * dy - x * c, two fp32 terms, then one rounding to bf16. The terms can nearly cancel (at
    // dim 1, dx = rstd * dy * eps / (x^2 + eps)), and fp32 then loses digits relative to the terms, not to
    // dx: the error is measured against the size of the terms, ||rstd * dy||, with kBf16Tolerance.
    std::vector<double> term(dx_ref.size(), 0.0);
    for (int64_t r = 0; r < s.rows; ++r)
      for (int64_t i = 0; i < s.dim; ++i)
        term[s.offset_in + r * s.ld_in + i] = rstd_saved[r] * dy.values[s.offset_out + r * s.ld_out + i];
    const std::vector<double> dx_out = view_of(testing::bf16_to_double(dx), s.rows, s.dim, s.ld_in, s.offset_in);
    const std::vector<double> dx_expected = view_of(dx_ref, s.rows, s.dim, s.ld_in, s.offset_in);
    const std::vector<double> terms = view_of(term, s.rows, s.dim, s.ld_in, s.offset_in);
    double error = 0, scale = 0;
    for (size_t i = 0; i < dx_out.size(); ++i) {
      error += std::isfinite(dx_out[i]) ? (dx_out[i] - dx_expected[i]) * (dx_out[i] - dx_expected[i]) : INFINITY;
      scale += terms[i] * terms[i];
    }
    CHECK(std::sqrt(error / scale) < kBf16Tolerance);
    CHECK(gaps_intact(dx0, dx));
    CHECK(d_dy.download() == dy.bits);
    CHECK(d_rstd.download() == rstd);
  }
}

TEST_CASE("CUDA weightless rmsnorm refuses a row stride below dim and does nothing for no rows") {
  CHECK_THROWS_AS(cuda::weightless_rmsnorm_forward(nullptr, 15, nullptr, 16, nullptr, 1, 16, kEps, nullptr),
                  std::invalid_argument);
  CHECK_THROWS_AS(cuda::weightless_rmsnorm_backward(nullptr, 16, nullptr, nullptr, 16, nullptr, 8, 1, 16, nullptr),
                  std::invalid_argument);
  cuda::weightless_rmsnorm_forward(nullptr, 16, nullptr, 16, nullptr, 0, 16, kEps, nullptr);
  cuda::weightless_rmsnorm_backward(nullptr, 16, nullptr, nullptr, 16, nullptr, 16, 0, 16, nullptr);
  CHECK(cudaDeviceSynchronize() == cudaSuccess);
}

TEST_CASE("CUDA rmsnorm refuses rows wider than it supports") {
  CHECK_THROWS_AS(cuda::rmsnorm_forward(nullptr, nullptr, nullptr, nullptr, nullptr, 16385, nullptr, 1, 16385, kEps,
                                        nullptr),
                  std::invalid_argument);
  CHECK_THROWS_AS(cuda::rmsnorm_backward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 1, 16385, nullptr),
                  std::invalid_argument);
}
