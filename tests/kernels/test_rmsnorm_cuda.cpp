// The CUDA RMSNorm (fused with the residual add) against the CPU reference run in double on the same
// inputs: fresh random inputs, outputs poisoned, with and without add (x_out apart from x and aliasing
// it), with and without a weight, and a backward whose bf16 copy goes nowhere, apart, or over dy.
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
                              weighted ? d_weight.get() : nullptr, d_y.get(), d_rstd.get(), rows, dim, kEps, nullptr);

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

TEST_CASE("CUDA rmsnorm backward equals the CPU reference; its bf16 copy may overwrite dy") {
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

TEST_CASE("CUDA rmsnorm refuses rows wider than it supports") {
  CHECK_THROWS_AS(cuda::rmsnorm_forward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 1, 16385, kEps, nullptr),
                  std::invalid_argument);
  CHECK_THROWS_AS(cuda::rmsnorm_backward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 1, 16385, nullptr),
                  std::invalid_argument);
}
