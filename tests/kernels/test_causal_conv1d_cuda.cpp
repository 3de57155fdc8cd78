// The CUDA causal conv1d + SiLU against the CPU reference run in double on the same bf16 inputs: x a
// strided view, dx written through its own row stride with the columns past dim left untouched, every
// kernel width up to the largest supported, chunk boundaries, sequences shorter than the kernel.
#include <cstdint>
#include <random>
#include <stdexcept>
#include <vector>

#include "framework/dtype.h"
#include "kernels/cpu/causal_conv1d.h"
#include "kernels/cuda/causal_conv1d.h"
#include "tests/catch.h"
#include "tests/kernels/device_buffer.h"
#include "tests/kernels/finite_difference.h"

using namespace ssmtune;
using testing::DeviceBuffer;
using testing::random_bf16;
using testing::relative_error;

namespace {

struct Shape {
  int64_t batch, len, dim, kernel, x_row_stride, dx_row_stride;
  bool with_bias;
};

// Vector path (dim and strides multiples of 4) and scalar path (odd dim, or a stride that breaks the row
// alignment); the model layout (strides 2 * dim); lengths around the 32-step chunk and its 4-step loads,
// shorter than the kernel, and long enough to fill the device.
const std::vector<Shape> kShapes{
    {2, 37, 64, 4, 128, 128, true},     {3, 50, 33, 4, 70, 67, true},   {1, 5, 16, 8, 40, 24, true},
    {2, 100, 24, 1, 24, 32, true},      {2, 33, 64, 4, 130, 128, true}, {4, 1, 8, 2, 16, 16, true},
    {2, 64, 40, 3, 80, 80, false},      {1, 71, 12, 5, 20, 28, true},   {2, 96, 8, 6, 16, 16, true},
    {1, 40, 7, 7, 7, 9, true},          {3, 31, 20, 2, 44, 20, true},   {1, 2048, 1536, 4, 3072, 3072, true},
    {2, 513, 2560, 4, 5120, 5120, true}};

// One bf16 rounding of the output is at most 2^-8 = 3.9e-3 relative per element, so norm-wise too; the
// fp32 arithmetic (K products, a sigmoid) adds ~1e-6: 5e-3.
constexpr double kBf16Tolerance = 5e-3;

// The first dim columns of each row of a [rows, stride] buffer.
template <typename T>
std::vector<T> columns(const std::vector<T>& buffer, int64_t rows, int64_t dim, int64_t stride) {
  std::vector<T> out(rows * dim);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t d = 0; d < dim; ++d) out[r * dim + d] = buffer[r * stride + d];
  }
  return out;
}

// The gap columns (dim .. stride-1 of each row) of two strided buffers are equal bit for bit.
bool gaps_equal(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b, int64_t rows, int64_t dim,
                int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t d = dim; d < stride; ++d) {
      if (a[r * stride + d] != b[r * stride + d]) return false;
    }
  }
  return true;
}

}  // namespace

TEST_CASE("CUDA causal conv1d + SiLU forward and backward equal the CPU reference") {
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  for (const Shape& s : kShapes) {
    INFO("seed " << seed << ", batch " << s.batch << ", len " << s.len << ", dim " << s.dim << ", kernel " << s.kernel
                 << ", x stride " << s.x_row_stride << ", dx stride " << s.dx_row_stride << ", bias " << s.with_bias);
    const int64_t rows = s.batch * s.len;
    // x lives in a wider buffer (the in_proj output); its other columns hold random values nothing reads.
    const testing::Bf16Values x_full = random_bf16(rows * s.x_row_stride, rng);
    const testing::Bf16Values du = random_bf16(rows * s.dim, rng);
    // Weights of a trained conv (|w| ~ 0.1 to 0.5) keep the pre-activations O(1), where SiLU bends.
    const std::vector<double> weight_draw = test::random_values(s.dim * s.kernel, rng, -0.5, 0.5);
    const std::vector<double> bias_draw = test::random_values(s.dim, rng, -0.5, 0.5);
    const std::vector<float> weight(weight_draw.begin(), weight_draw.end()), bias(bias_draw.begin(), bias_draw.end());
    // The reference gets the weights the device gets: rounded to float.
    const std::vector<double> weight_ref(weight.begin(), weight.end()), bias_ref(bias.begin(), bias.end());

    DeviceBuffer<uint16_t> d_x(x_full.bits), d_du(du.bits), d_u(rows * s.dim);
    DeviceBuffer<float> d_weight(weight), d_bias(bias);
    const float* bias_ptr = s.with_bias ? d_bias.get() : nullptr;
    const double* bias_ref_ptr = s.with_bias ? bias_ref.data() : nullptr;

    cuda::causal_conv1d_silu_forward(d_x.get(), s.x_row_stride, d_weight.get(), bias_ptr, d_u.get(), s.batch, s.len,
                                     s.dim, s.kernel, nullptr);
    std::vector<double> u_ref(rows * s.dim);
    cpu::causal_conv1d_silu_forward<double>(x_full.values.data(), s.x_row_stride, weight_ref.data(), bias_ref_ptr,
                                            u_ref.data(), s.batch, s.len, s.dim, s.kernel);
    CHECK(relative_error(testing::bf16_to_double(d_u.download()), u_ref) < kBf16Tolerance);

    // dx: its first dim columns poisoned (NaN), the others random values that must survive.
    std::vector<uint16_t> dx_initial = random_bf16(rows * s.dx_row_stride, rng).bits;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t d = 0; d < s.dim; ++d) dx_initial[r * s.dx_row_stride + d] = 0xFFFF;
    }
    DeviceBuffer<uint16_t> d_dx(dx_initial);
    cuda::causal_conv1d_silu_backward(d_x.get(), s.x_row_stride, d_weight.get(), bias_ptr, d_du.get(), d_dx.get(),
                                      s.dx_row_stride, s.batch, s.len, s.dim, s.kernel, nullptr);
    std::vector<double> dx_ref(rows * s.dx_row_stride, 0.0);
    cpu::causal_conv1d_silu_backward<double>(x_full.values.data(), s.x_row_stride, weight_ref.data(), bias_ref_ptr,
                                             du.values.data(), dx_ref.data(), s.dx_row_stride, nullptr, nullptr,
                                             s.batch, s.len, s.dim, s.kernel);
    const std::vector<uint16_t> dx = d_dx.download();
    CHECK(relative_error(testing::bf16_to_double(columns(dx, rows, s.dim, s.dx_row_stride)),
                         columns(dx_ref, rows, s.dim, s.dx_row_stride)) < kBf16Tolerance);
    CHECK(gaps_equal(dx, dx_initial, rows, s.dim, s.dx_row_stride));
    // The inputs are only read.
    CHECK(d_x.download() == x_full.bits);
    CHECK(d_du.download() == du.bits);
  }
}

TEST_CASE("CUDA causal conv1d refuses kernel widths past 8") {
  CHECK_THROWS_AS(cuda::causal_conv1d_silu_forward(nullptr, 16, nullptr, nullptr, nullptr, 1, 4, 16, 9, nullptr),
                  std::invalid_argument);
  CHECK_THROWS_AS(
      cuda::causal_conv1d_silu_backward(nullptr, 16, nullptr, nullptr, nullptr, nullptr, 16, 1, 4, 16, 9, nullptr),
      std::invalid_argument);
  CHECK_THROWS_AS(cuda::causal_conv1d_silu_forward(nullptr, 16, nullptr, nullptr, nullptr, 1, 4, 16, 0, nullptr),
                  std::invalid_argument);
}
