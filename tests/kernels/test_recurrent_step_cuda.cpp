// The CUDA recurrent step ops against the CPU reference run in double on the same bf16 inputs, over
// several steps so that the carried conv window and scan state matter: fresh random inputs each step,
// outputs poisoned (NaN) before every launch, strided views as in the model, on a non-blocking stream.
#include <cuda_runtime.h>

#include <cstdint>
#include <random>
#include <vector>

#include "framework/dtype.h"
#include "kernels/cpu/recurrent_step.h"
#include "kernels/cuda/recurrent_step.h"
#include "tests/catch.h"
#include "tests/kernels/device_buffer.h"
#include "tests/kernels/finite_difference.h"

using namespace ssmtune;
using testing::DeviceBuffer;
using testing::random_bf16;
using testing::relative_error;

namespace {

// Outputs: one bf16 rounding (2^-8 = 3.9e-3 relative per element, so norm-wise too) over fp32
// arithmetic (~1e-6 from K or N products and an exp): 5e-3.
constexpr double kBf16Tolerance = 5e-3;
// The fp32 scan state against the double one after kSteps steps: each step adds a few fp32 roundings
// (2^-24 = 6e-8 relative) to a state that decays, so the drift stays far below 1e-5; a wrong term is O(1).
constexpr double kStateTolerance = 1e-5;
constexpr int kSteps = 6;

std::vector<float> to_float(const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); }
std::vector<double> to_double(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

}  // namespace

TEST_CASE("CUDA conv1d + SiLU step equals the CPU step") {
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  struct Shape {
    int64_t rows, dim, kernel, ldx;
    bool with_bias;
  };
  for (const Shape& s : {Shape{3, 37, 4, 80, true}, Shape{1, 2560, 4, 5120, true}, Shape{2, 16, 1, 16, true},
                         Shape{4, 24, 6, 48, false}}) {
    INFO("seed " << seed << ", rows " << s.rows << ", dim " << s.dim << ", kernel " << s.kernel);
    const std::vector<float> weight = to_float(test::random_values(s.dim * s.kernel, rng, -0.5, 0.5));
    const std::vector<float> bias = to_float(test::random_values(s.dim, rng, -0.5, 0.5));
    const std::vector<double> weight_ref = to_double(weight), bias_ref = to_double(bias);
    DeviceBuffer<float> d_weight(weight), d_bias(bias);
    DeviceBuffer<float> d_window(std::vector<float>(s.rows * s.dim * (s.kernel - 1), 0.0f));
    std::vector<double> window_ref(s.rows * s.dim * (s.kernel - 1), 0.0);
    DeviceBuffer<uint16_t> d_u(s.rows * s.dim);
    testing::NonBlockingStream stream;
    for (int step = 0; step < kSteps; ++step) {
      INFO("step " << step);
      const testing::Bf16Values x = random_bf16(s.rows * s.ldx, rng);
      DeviceBuffer<uint16_t> d_x(x.bits);
      d_u.poison();
      REQUIRE(cudaDeviceSynchronize() == cudaSuccess);  // uploads and poison done before the op's stream starts
      cuda::causal_conv1d_silu_step(d_x.get(), s.ldx, d_weight.get(), s.with_bias ? d_bias.get() : nullptr,
                                    d_window.get(), d_u.get(), s.rows, s.dim, s.kernel, stream.get());
      std::vector<double> u_ref(s.rows * s.dim);
      cpu::causal_conv1d_silu_step<double>(x.values.data(), s.ldx, weight_ref.data(),
                                           s.with_bias ? bias_ref.data() : nullptr, window_ref.data(), u_ref.data(),
                                           s.rows, s.dim, s.kernel);
      CHECK(relative_error(testing::bf16_to_double(d_u.download()), u_ref) < kBf16Tolerance);
      // The window holds bf16 inputs widened to fp32: exact on both sides.
      CHECK(to_double(d_window.download()) == window_ref);
      CHECK(d_x.download() == x.bits);
    }
  }
}

TEST_CASE("CUDA selective scan step equals the CPU step") {
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  struct Shape {
    int64_t rows, dim, state;
  };
  for (const Shape& s : {Shape{3, 37, 16}, Shape{1, 2560, 16}, Shape{2, 20, 5}}) {
    INFO("seed " << seed << ", rows " << s.rows << ", dim " << s.dim << ", state " << s.state);
    const int64_t dt_rank = 3, bc_stride = dt_rank + 2 * s.state, z_stride = 2 * s.dim;
    const std::vector<float> delta_bias = to_float(test::random_values(s.dim, rng, -1, 0));
    const std::vector<float> A = to_float(test::random_values(s.dim * s.state, rng, -1.5, -0.2));
    const std::vector<float> Dskip = to_float(test::random_values(s.dim, rng));
    const std::vector<double> delta_bias_ref = to_double(delta_bias), A_ref = to_double(A),
                              Dskip_ref = to_double(Dskip);
    DeviceBuffer<float> d_delta_bias(delta_bias), d_A(A), d_Dskip(Dskip);
    DeviceBuffer<float> d_h(std::vector<float>(s.rows * s.dim * s.state, 0.0f));
    std::vector<double> h_ref(s.rows * s.dim * s.state, 0.0);
    DeviceBuffer<uint16_t> d_out(s.rows * s.dim);
    testing::NonBlockingStream stream;
    for (int step = 0; step < kSteps; ++step) {
      INFO("step " << step);
      const testing::Bf16Values u = random_bf16(s.rows * s.dim, rng), delta = random_bf16(s.rows * s.dim, rng);
      const testing::Bf16Values xdbl = random_bf16(s.rows * bc_stride, rng);
      const testing::Bf16Values xz = random_bf16(s.rows * z_stride, rng);
      DeviceBuffer<uint16_t> d_u(u.bits), d_delta(delta.bits), d_xdbl(xdbl.bits), d_xz(xz.bits);
      d_out.poison();
      REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
      cuda::selective_scan_step(d_u.get(), d_delta.get(), d_delta_bias.get(), d_A.get(), d_xdbl.get() + dt_rank,
                                d_xdbl.get() + dt_rank + s.state, bc_stride, d_Dskip.get(), d_xz.get() + s.dim,
                                z_stride, d_h.get(), d_out.get(), s.rows, s.dim, s.state, stream.get());
      std::vector<double> out_ref(s.rows * s.dim);
      cpu::selective_scan_step<double>(u.values.data(), delta.values.data(), delta_bias_ref.data(), A_ref.data(),
                                       xdbl.values.data() + dt_rank, xdbl.values.data() + dt_rank + s.state, bc_stride,
                                       Dskip_ref.data(), xz.values.data() + s.dim, z_stride, h_ref.data(),
                                       out_ref.data(), s.rows, s.dim, s.state);
      CHECK(relative_error(testing::bf16_to_double(d_out.download()), out_ref) < kBf16Tolerance);
      CHECK(relative_error(to_double(d_h.download()), h_ref) < kStateTolerance);
      CHECK(d_xdbl.download() == xdbl.bits);
    }
  }
}
