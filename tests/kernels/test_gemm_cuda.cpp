// The cuBLASLt GEMM against cpu::gemm in double on the same bf16 inputs: every transpose combination,
// odd shapes, leading dimensions wider than the rows (their gaps NaN, so reading one shows), pointers
// aligned to one element only, beta 0 (C poisoned: it must not be read) and 1, bf16 and fp32 outputs.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <vector>

#include "framework/dtype.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cuda/gemm.h"
#include "tests/catch.h"
#include "tests/kernels/device_buffer.h"

using namespace ssmtune;
using testing::DeviceBuffer;
using testing::relative_error;

namespace {


double to_double(uint16_t bf16) { return bf16_to_float(bf16); }
double to_double(float f32) { return f32; }
template <typename T>
T from_float(float value) {
  if constexpr (sizeof(T) == 2) return float_to_bf16(value);
  else return value;
}
template <typename T>
T nan_bits() {
  T value;
  std::memset(&value, 0xFF, sizeof(T));
  return value;
}

struct Shape {
  int64_t m, n, k;
};

// How operands sit in memory: the production case (rows 16-byte multiples, 256-byte aligned pointers) and
// the awkward one (odd strides, pointers one element past an aligned address).
struct Layout {
  const char* name;
  int64_t offset;
  int64_t (*stride)(int64_t width, int64_t extra);
};
const Layout kLayouts[] = {
    {"aligned", 0, [](int64_t width, int64_t) { return (width + 7) / 8 * 8 + 8; }},
    {"odd", 1, [](int64_t width, int64_t extra) { return width + extra; }},
};

template <typename T>
void check_gemm(cuda::Gemm& gemm, bool trans_a, bool trans_b, const Shape& s, const Layout& layout, float beta,
                std::mt19937_64& rng) {
  constexpr cuda::GemmOut kOut = sizeof(T) == 2 ? cuda::GemmOut::bf16 : cuda::GemmOut::f32;
  const float alpha = 0.75f;
  const testing::StridedBf16 A = testing::strided_bf16(trans_a ? s.k : s.m, trans_a ? s.m : s.k,
                                       layout.stride(trans_a ? s.m : s.k, 3), layout.offset, testing::kBf16NaN, rng);
  const testing::StridedBf16 B = testing::strided_bf16(trans_b ? s.n : s.k, trans_b ? s.k : s.n,
                                       layout.stride(trans_b ? s.k : s.n, 5), layout.offset, testing::kBf16NaN, rng);
  // C: its gaps hold a sentinel that must survive; inside, random values to accumulate onto (beta 1) or NaN,
  // which must not be read (beta 0).
  const int64_t ldc = layout.stride(s.n, 2);
  const size_t c_size = layout.offset + (s.m - 1) * ldc + s.n + 1;
  const T sentinel = from_float<T>(3.0f);
  std::vector<T> c_init(c_size, sentinel);
  std::vector<double> c_ref(c_size, 3.0);
  const auto c_random = testing::random_bf16(s.m * s.n, rng);
  for (int64_t i = 0; i < s.m; ++i)
    for (int64_t j = 0; j < s.n; ++j) {
      const size_t at = layout.offset + i * ldc + j;
      c_init[at] = beta == 0.0f ? nan_bits<T>() : from_float<T>(static_cast<float>(c_random.values[i * s.n + j]));
      c_ref[at] = to_double(c_init[at]);
    }
  cpu::gemm<double>(trans_a, trans_b, s.m, s.n, s.k, alpha, A.values.data() + A.offset, A.ld,
                    B.values.data() + B.offset, B.ld, beta, c_ref.data() + layout.offset, ldc);

  DeviceBuffer<uint16_t> dA(A.bits), dB(B.bits);
  DeviceBuffer<T> dC(c_init);
  const auto run = [&] {
    dC.upload(c_init);
    gemm.run(trans_a, trans_b, s.m, s.n, s.k, alpha, dA.get() + A.offset, A.ld, dB.get() + B.offset, B.ld, beta,
             dC.get() + layout.offset, kOut, ldc);
    return dC.download();
  };
  const std::vector<T> c_out = run();

  std::vector<double> out, ref;
  int64_t gaps_changed = 0;
  for (size_t at = 0; at < c_size; ++at) {
    const int64_t from_start = static_cast<int64_t>(at) - layout.offset;
    if (from_start >= 0 && from_start / ldc < s.m && from_start % ldc < s.n) {
      out.push_back(to_double(c_out[at]));
      ref.push_back(c_ref[at]);
    } else {
      gaps_changed += std::memcmp(&c_out[at], &sentinel, sizeof(T)) != 0;
    }
  }
  INFO("trans_a " << trans_a << " trans_b " << trans_b << " m " << s.m << " n " << s.n << " k " << s.k << " "
                  << layout.name << " beta " << beta << " out " << (sizeof(T) == 2 ? "bf16" : "f32"));
  // Products of bf16 values are exact in fp32. Their fp32 sums err by ~sqrt(k) * 2^-24 relative with
  // round-to-nearest (< 3e-6 for k = 1000); the tensor cores' adders truncate, which can let the error grow
  // with the number of accumulation steps instead, up to ~k * 2^-24 (6e-5). 1e-4 for fp32 outputs: still 20x
  // below the ~2e-3 of a bf16 rounding anywhere on the way. A bf16 output adds its own rounding, up to 2^-8
  // relative per element (~1.5e-3 in norm): 1e-2. A wrong index or transpose gives O(1); a read gap or an
  // unwritten element gives NaN (infinite error).
  CHECK(relative_error(out, ref) <= (sizeof(T) == 2 ? 1e-2 : 1e-4));
  CHECK(gaps_changed == 0);
  // The plan is cached and cuBLASLt's reductions are ordered: a second run gives the same bits.
  CHECK(run() == c_out);
}

}  // namespace

TEST_CASE("CUDA GEMM equals the double product for every transpose, stride, alignment, beta and output type") {
  cudaStream_t stream = nullptr;
  REQUIRE(cudaStreamCreate(&stream) == cudaSuccess);
  {
    cuda::Gemm gemm(stream);
    CHECK(gemm.stream() == stream);
    const auto seed = std::random_device{}();
    INFO("seed " << seed);
    std::mt19937_64 rng(seed);
    const Shape shapes[] = {{37, 5, 130}, {1, 1, 1}, {64, 96, 48}, {129, 67, 257}, {8, 200, 1000}, {256, 512, 384}};
    for (const bool trans_a : {false, true})
      for (const bool trans_b : {false, true})
        for (const Shape& s : shapes)
          for (const Layout& layout : kLayouts)
            for (const float beta : {0.0f, 1.0f}) {
              check_gemm<uint16_t>(gemm, trans_a, trans_b, s, layout, beta, rng);
              check_gemm<float>(gemm, trans_a, trans_b, s, layout, beta, rng);
            }
  }
  REQUIRE(cudaStreamDestroy(stream) == cudaSuccess);
}

TEST_CASE("CUDA GEMM refuses leading dimensions narrower than the rows") {
  cuda::Gemm gemm(nullptr);
  DeviceBuffer<uint16_t> a(64), b(64), c(64);
  // A [4, 8] needs lda >= 8; Bᵀ stored [3, 8] needs ldb >= 8; C [4, 3] needs ldc >= 3.
  CHECK_THROWS_AS(gemm.run(false, true, 4, 3, 8, 1.0f, a.get(), 7, b.get(), 8, 0.0f, c.get(), cuda::GemmOut::bf16, 3),
                  std::invalid_argument);
  CHECK_THROWS_AS(gemm.run(false, true, 4, 3, 8, 1.0f, a.get(), 8, b.get(), 7, 0.0f, c.get(), cuda::GemmOut::bf16, 3),
                  std::invalid_argument);
  CHECK_THROWS_AS(gemm.run(false, true, 4, 3, 8, 1.0f, a.get(), 8, b.get(), 8, 0.0f, c.get(), cuda::GemmOut::bf16, 2),
                  std::invalid_argument);
}
