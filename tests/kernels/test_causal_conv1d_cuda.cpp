// The CUDA causal conv1d + SiLU against the CPU reference run in double on the same bf16 inputs: x a
// strided view, dx written through its own row stride with the columns past dim left untouched, every
// kernel width up to the largest supported, chunk boundaries, sequences shorter than the kernel; and with
// document starts, history and d_tail (packed documents, slices of a split sequence), including
// history_grad.
#include <cstdint>
#include <cstdlib>
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
                                     s.dim, s.kernel, nullptr, nullptr, nullptr);
    std::vector<double> u_ref(rows * s.dim);
    cpu::causal_conv1d_silu_forward<double>(x_full.values.data(), s.x_row_stride, weight_ref.data(), bias_ref_ptr,
                                            u_ref.data(), s.batch, s.len, s.dim, s.kernel, nullptr, nullptr);
    CHECK(relative_error(testing::bf16_to_double(d_u.download()), u_ref) < kBf16Tolerance);

    // dx: its first dim columns poisoned (NaN), the others random values that must survive.
    std::vector<uint16_t> dx_initial = random_bf16(rows * s.dx_row_stride, rng).bits;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t d = 0; d < s.dim; ++d) dx_initial[r * s.dx_row_stride + d] = 0xFFFF;
    }
    DeviceBuffer<uint16_t> d_dx(dx_initial);
    cuda::causal_conv1d_silu_backward(d_x.get(), s.x_row_stride, d_weight.get(), bias_ptr, d_du.get(), d_dx.get(),
                                      s.dx_row_stride, s.batch, s.len, s.dim, s.kernel, nullptr, nullptr, nullptr,
                                      nullptr);
    std::vector<double> dx_ref(rows * s.dx_row_stride, 0.0);
    cpu::causal_conv1d_silu_backward<double>(x_full.values.data(), s.x_row_stride, weight_ref.data(), bias_ref_ptr,
                                             du.values.data(), dx_ref.data(), s.dx_row_stride, nullptr, nullptr,
                                             s.batch, s.len, s.dim, s.kernel, nullptr, nullptr, nullptr);
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
  CHECK_THROWS_AS(cuda::causal_conv1d_silu_forward(nullptr, 16, nullptr, nullptr, nullptr, 1, 4, 16, 9, nullptr,
                                                   nullptr, nullptr),
                  std::invalid_argument);
  CHECK_THROWS_AS(cuda::causal_conv1d_silu_backward(nullptr, 16, nullptr, nullptr, nullptr, nullptr, 16, 1, 4, 16, 9,
                                                    nullptr, nullptr, nullptr, nullptr),
                  std::invalid_argument);
  CHECK_THROWS_AS(cuda::causal_conv1d_silu_forward(nullptr, 16, nullptr, nullptr, nullptr, 1, 4, 16, 0, nullptr,
                                                   nullptr, nullptr),
                  std::invalid_argument);
  CHECK_THROWS_AS(cuda::causal_conv1d_silu_history_grad(nullptr, 16, nullptr, nullptr, nullptr, 1, 4, 16, 9, nullptr,
                                                        nullptr, nullptr, nullptr),
                  std::invalid_argument);
  // d_tail belongs to the last kernel-1 rows: a shorter slice cannot take it.
  const uint16_t tail = 0;
  CHECK_THROWS_AS(cuda::causal_conv1d_silu_backward(nullptr, 16, nullptr, nullptr, nullptr, nullptr, 16, 1, 2, 16, 4,
                                                    nullptr, nullptr, &tail, nullptr),
                  std::invalid_argument);
}

namespace {

// doc_start of rows of random documents of 1..max_doc tokens; a row's first document may have begun up to
// kernel positions before the slice (negative starts) or exactly at its first token.
std::vector<int32_t> random_doc_starts(int64_t batch, int64_t len, int64_t kernel, int64_t max_doc,
                                       std::mt19937_64& rng) {
  std::uniform_int_distribution<int64_t> doc_length(1, max_doc), before(0, kernel);
  std::vector<int32_t> out(batch * len);
  for (int64_t b = 0; b < batch; ++b) {
    int64_t start = -before(rng), next = start + doc_length(rng);
    for (int64_t t = 0; t < len; ++t) {
      if (t >= next) {
        start = t;
        next = t + doc_length(rng);
      }
      out[b * len + t] = static_cast<int32_t>(start);
    }
  }
  return out;
}

}  // namespace

TEST_CASE("CUDA causal conv1d with document starts, history and d_tail equals the CPU reference") {
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  struct BoundaryShape {
    Shape shape;
    int64_t max_doc;  // documents of 1..max_doc tokens
  };
  // Both access paths, every kernel width, documents shorter than the kernel, longer than a chunk, and
  // the model layout at length.
  const std::vector<BoundaryShape> shapes{
      {{2, 37, 64, 4, 128, 128, true}, 9},    {{3, 50, 33, 4, 70, 67, true}, 5},
      {{1, 9, 16, 8, 40, 24, true}, 3},       {{2, 100, 24, 1, 24, 32, true}, 7},
      {{4, 3, 8, 2, 16, 16, true}, 2},        {{2, 64, 40, 3, 80, 80, false}, 40},
      {{1, 71, 12, 5, 20, 28, true}, 11},     {{2, 96, 8, 6, 16, 16, true}, 13},
      {{1, 40, 7, 7, 7, 9, true}, 6},         {{1, 2048, 1536, 4, 3072, 3072, true}, 700},
      {{2, 513, 2560, 4, 5120, 5120, true}, 90}};
  for (const auto& [s, max_doc] : shapes) {
    for (const bool with_history : {true, false}) {
      INFO("seed " << seed << ", batch " << s.batch << ", len " << s.len << ", dim " << s.dim << ", kernel "
                   << s.kernel << ", x stride " << s.x_row_stride << ", dx stride " << s.dx_row_stride
                   << ", documents up to " << max_doc << ", history " << with_history);
      const int64_t rows = s.batch * s.len, K1 = s.kernel - 1;
      const testing::Bf16Values x_full = random_bf16(rows * s.x_row_stride, rng);
      const testing::Bf16Values du = random_bf16(rows * s.dim, rng);
      const testing::Bf16Values history = random_bf16(s.batch * K1 * s.dim, rng);
      const testing::Bf16Values d_tail = random_bf16(s.batch * K1 * s.dim, rng);
      const std::vector<double> weight_draw = test::random_values(s.dim * s.kernel, rng, -0.5, 0.5);
      const std::vector<double> bias_draw = test::random_values(s.dim, rng, -0.5, 0.5);
      const std::vector<float> weight(weight_draw.begin(), weight_draw.end()),
          bias(bias_draw.begin(), bias_draw.end());
      const std::vector<double> weight_ref(weight.begin(), weight.end()), bias_ref(bias.begin(), bias.end());
      const std::vector<int32_t> doc_start = random_doc_starts(s.batch, s.len, s.kernel, max_doc, rng);

      DeviceBuffer<uint16_t> d_x(x_full.bits), d_du(du.bits), d_u(rows * s.dim), d_history(history.bits),
          d_d_tail(d_tail.bits), d_d_history(s.batch * K1 * s.dim);
      DeviceBuffer<float> d_weight(weight), d_bias(bias);
      DeviceBuffer<int32_t> d_doc_start(doc_start);
      const uint16_t* history_ptr = with_history ? d_history.get() : nullptr;
      const double* history_ref = with_history ? history.values.data() : nullptr;

      cuda::causal_conv1d_silu_forward(d_x.get(), s.x_row_stride, d_weight.get(), d_bias.get(), d_u.get(), s.batch,
                                       s.len, s.dim, s.kernel, d_doc_start.get(), history_ptr, nullptr);
      std::vector<double> u_ref(rows * s.dim);
      cpu::causal_conv1d_silu_forward<double>(x_full.values.data(), s.x_row_stride, weight_ref.data(),
                                              bias_ref.data(), u_ref.data(), s.batch, s.len, s.dim, s.kernel,
                                              doc_start.data(), history_ref);
      CHECK(relative_error(testing::bf16_to_double(d_u.download()), u_ref) < kBf16Tolerance);

      std::vector<uint16_t> dx_initial = random_bf16(rows * s.dx_row_stride, rng).bits;
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t d = 0; d < s.dim; ++d) dx_initial[r * s.dx_row_stride + d] = testing::kBf16NaN;
      }
      DeviceBuffer<uint16_t> d_dx(dx_initial);
      // d_tail only where the slice is long enough to take it.
      const bool with_tail = s.len >= K1;
      cuda::causal_conv1d_silu_backward(d_x.get(), s.x_row_stride, d_weight.get(), d_bias.get(), d_du.get(),
                                        d_dx.get(), s.dx_row_stride, s.batch, s.len, s.dim, s.kernel,
                                        d_doc_start.get(), history_ptr, with_tail ? d_d_tail.get() : nullptr,
                                        nullptr);
      std::vector<double> dx_ref(rows * s.dx_row_stride, 0.0);
      cpu::causal_conv1d_silu_backward<double>(x_full.values.data(), s.x_row_stride, weight_ref.data(),
                                               bias_ref.data(), du.values.data(), dx_ref.data(), s.dx_row_stride,
                                               nullptr, nullptr, s.batch, s.len, s.dim, s.kernel, doc_start.data(),
                                               history_ref, with_tail ? d_tail.values.data() : nullptr);
      const std::vector<uint16_t> dx = d_dx.download();
      CHECK(relative_error(testing::bf16_to_double(columns(dx, rows, s.dim, s.dx_row_stride)),
                           columns(dx_ref, rows, s.dim, s.dx_row_stride)) < kBf16Tolerance);
      CHECK(gaps_equal(dx, dx_initial, rows, s.dim, s.dx_row_stride));

      // d_history: a sum of at most K-1 products, rounded to bf16 once: the same tolerance.
      cuda::causal_conv1d_silu_history_grad(d_x.get(), s.x_row_stride, d_weight.get(), d_bias.get(), d_du.get(),
                                            s.batch, s.len, s.dim, s.kernel, d_doc_start.get(), history_ptr,
                                            d_d_history.get(), nullptr);
      std::vector<double> d_history_ref(s.batch * K1 * s.dim);
      cpu::causal_conv1d_silu_history_grad<double>(x_full.values.data(), s.x_row_stride, weight_ref.data(),
                                                   bias_ref.data(), du.values.data(), s.batch, s.len, s.dim, s.kernel,
                                                   doc_start.data(), history_ref, d_history_ref.data());
      CHECK(relative_error(testing::bf16_to_double(d_d_history.download()), d_history_ref) < kBf16Tolerance);
      // The inputs are only read.
      CHECK(d_x.download() == x_full.bits);
      CHECK(d_du.download() == du.bits);
      CHECK(d_history.download() == history.bits);
      CHECK(d_d_tail.download() == d_tail.bits);
      CHECK(d_doc_start.download() == doc_start);
    }
  }
}

TEST_CASE("CUDA causal conv1d: one document from the first token ignores the history") {
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  INFO("seed " << seed);
  // doc_start == 0 everywhere runs the bounded kernels over the same numbers as the plain ones: only taps
  // that would read zeros (or the history) are masked, and w*0 adds nothing, so the outputs are identical.
  for (const Shape& s : {Shape{2, 77, 64, 4, 128, 128, true}, Shape{1, 45, 13, 3, 30, 15, true}}) {
    const int64_t rows = s.batch * s.len, K1 = s.kernel - 1;
    const testing::Bf16Values x = random_bf16(rows * s.x_row_stride, rng), du = random_bf16(rows * s.dim, rng),
                              history = random_bf16(s.batch * K1 * s.dim, rng);
    const std::vector<double> weight_draw = test::random_values(s.dim * s.kernel, rng, -0.5, 0.5);
    const std::vector<float> weight(weight_draw.begin(), weight_draw.end()), bias(s.dim, 0.25f);
    DeviceBuffer<uint16_t> d_x(x.bits), d_du(du.bits), d_history(history.bits), u_plain(rows * s.dim),
        u_bounded(rows * s.dim), dx_plain(rows * s.dx_row_stride), dx_bounded(rows * s.dx_row_stride),
        d_history_out(s.batch * K1 * s.dim);
    DeviceBuffer<float> d_weight(weight), d_bias(bias);
    DeviceBuffer<int32_t> zeros(std::vector<int32_t>(rows, 0));
    cuda::causal_conv1d_silu_forward(d_x.get(), s.x_row_stride, d_weight.get(), d_bias.get(), u_plain.get(), s.batch,
                                     s.len, s.dim, s.kernel, nullptr, nullptr, nullptr);
    cuda::causal_conv1d_silu_forward(d_x.get(), s.x_row_stride, d_weight.get(), d_bias.get(), u_bounded.get(),
                                     s.batch, s.len, s.dim, s.kernel, zeros.get(), d_history.get(), nullptr);
    CHECK(u_plain.download() == u_bounded.download());
    cuda::causal_conv1d_silu_backward(d_x.get(), s.x_row_stride, d_weight.get(), d_bias.get(), d_du.get(),
                                      dx_plain.get(), s.dx_row_stride, s.batch, s.len, s.dim, s.kernel, nullptr,
                                      nullptr, nullptr, nullptr);
    cuda::causal_conv1d_silu_backward(d_x.get(), s.x_row_stride, d_weight.get(), d_bias.get(), d_du.get(),
                                      dx_bounded.get(), s.dx_row_stride, s.batch, s.len, s.dim, s.kernel, zeros.get(),
                                      d_history.get(), nullptr, nullptr);
    // dx: the bounded backward sums the same terms, but nvcc may contract its fp32 multiply-adds
    // differently (measured on an H200: 1 of 9,856 elements one bf16 step apart), so each element must lie
    // within one bf16 step of the plain kernel's; a leaked history term moves elements by far more.
    const std::vector<uint16_t> plain = columns(dx_plain.download(), rows, s.dim, s.dx_row_stride),
                                bounded = columns(dx_bounded.download(), rows, s.dim, s.dx_row_stride);
    int64_t apart = 0;
    for (size_t i = 0; i < plain.size(); ++i)
      apart += std::abs(static_cast<int32_t>(plain[i] & 0x7FFF) - static_cast<int32_t>(bounded[i] & 0x7FFF)) > 1 ||
               ((plain[i] ^ bounded[i]) & 0x8000 && ((plain[i] | bounded[i]) & 0x7FFF) != 0);
    CHECK(apart == 0);
    // No token's taps reach the history: its gradient is exactly zero.
    cuda::causal_conv1d_silu_history_grad(d_x.get(), s.x_row_stride, d_weight.get(), d_bias.get(), d_du.get(),
                                          s.batch, s.len, s.dim, s.kernel, zeros.get(), d_history.get(),
                                          d_history_out.get(), nullptr);
    CHECK(d_history_out.download() == std::vector<uint16_t>(s.batch * K1 * s.dim, 0));
  }
}
