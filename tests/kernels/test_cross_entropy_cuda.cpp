// The CUDA LM head + cross-entropy against cpu::cross_entropy_forward_backward in double on the same bf16
// inputs: vocabularies that are not multiples of 8 (and ones that are), slice sizes that do not divide the
// rows (and one larger than them), rows of weight 0 whose h row is NaN and whose target is out of range,
// the loss alone and with dh, repeatability, and a workspace of exactly cross_entropy_workspace_bytes
// followed by a guard that must stay untouched.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <vector>

#include "framework/dtype.h"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cuda/cross_entropy.h"
#include "kernels/cuda/gemm.h"
#include "tests/catch.h"
#include "tests/kernels/device_buffer.h"

using namespace ssmtune;
using testing::DeviceBuffer;
using testing::relative_error;

namespace {

constexpr int32_t kIgnoredTarget = -100;  // what HF puts on padding
constexpr size_t kGuardBytes = 4096;

struct CrossEntropyCase {
  int64_t rows, dim, vocab, slice_rows;
};

const CrossEntropyCase kCases[] = {
    {13, 64, 1001, 5},    // last slice partial; an excluded row in it
    {10, 37, 50277, 3},   // odd dim; the last slice holds only an excluded row
    {6, 128, 50280, 4},   // Mamba's padded vocabulary (a multiple of 8)
    {1, 8, 3, 7},         // vocab smaller than a float4, slice larger than the rows
    {48, 256, 8192, 16},  // everything aligned, slices dividing the rows
};

struct Problem {
  testing::Bf16Values h, W;
  std::vector<uint16_t> weight_bits;
  std::vector<double> weights;
  std::vector<int32_t> targets;
  float grad_scale = 0;
  std::vector<bool> excluded;
};

// h ~ N(0, 1), W ~ N(0, 4/dim): logits of standard deviation 2, a softmax neither flat nor one-hot. Rows 2
// and rows-1 (when there are more than 2) are excluded: weight 0, h NaN, target out of range.
Problem random_problem(const CrossEntropyCase& c, std::mt19937_64& rng) {
  Problem p;
  p.h = testing::random_bf16(c.rows * c.dim, rng);
  p.W = testing::random_bf16(c.vocab * c.dim, rng, 0.0, 2.0 / std::sqrt(static_cast<double>(c.dim)));
  std::uniform_real_distribution<float> weight(0.5f, 1.5f);
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(c.vocab - 1));
  p.excluded.assign(c.rows, false);
  if (c.rows > 2) p.excluded[2] = p.excluded[c.rows - 1] = true;
  double weight_sum = 0;
  for (int64_t t = 0; t < c.rows; ++t) {
    const uint16_t w = p.excluded[t] ? float_to_bf16(0.0f) : float_to_bf16(weight(rng));
    p.weight_bits.push_back(w);
    p.weights.push_back(bf16_to_float(w));
    p.targets.push_back(p.excluded[t] ? kIgnoredTarget : token(rng));
    weight_sum += p.weights.back();
    if (p.excluded[t])
      for (int64_t i = 0; i < c.dim; ++i) {
        p.h.bits[t * c.dim + i] = testing::kBf16NaN;
        p.h.values[t * c.dim + i] = bf16_to_float(testing::kBf16NaN);
      }
  }
  p.grad_scale = static_cast<float>(1.0 / weight_sum);  // a trainer averaging over tokens
  return p;
}

}  // namespace

TEST_CASE("CUDA cross entropy loss and dh equal the CPU reference") {
  const testing::NonBlockingStream stream;
  {
    cuda::Gemm gemm(stream.get());
    const auto seed = std::random_device{}();
    INFO("seed " << seed);
    std::mt19937_64 rng(seed);
    for (const CrossEntropyCase& c : kCases) {
      INFO("rows " << c.rows << " dim " << c.dim << " vocab " << c.vocab << " slice_rows " << c.slice_rows);
      const Problem p = random_problem(c, rng);
      std::vector<double> dh_ref(c.rows * c.dim), logits_ref(c.slice_rows * c.vocab);
      const double loss_ref = cpu::cross_entropy_forward_backward<double>(
          p.h.values.data(), p.W.values.data(), c.rows, c.dim, c.vocab, p.targets.data(), p.weights.data(),
          p.grad_scale, dh_ref.data(), logits_ref.data(), c.slice_rows);

      DeviceBuffer<uint16_t> h(p.h.bits), W(p.W.bits), weights(p.weight_bits), dh(c.rows * c.dim);
      DeviceBuffer<int32_t> targets(p.targets);
      const size_t workspace_bytes = cuda::cross_entropy_workspace_bytes(c.rows, c.slice_rows, c.vocab);
      DeviceBuffer<uint8_t> workspace(workspace_bytes + kGuardBytes);  // poisoned: scratch read before written shows
      REQUIRE(cudaDeviceSynchronize() == cudaSuccess);                // uploads and poison done first
      const auto run = [&](uint16_t* dh_out) {
        return cuda::cross_entropy_forward_backward(gemm, h.get(), W.get(), c.rows, c.dim, c.vocab, targets.get(),
                                                    weights.get(), p.grad_scale, dh_out, workspace.get(),
                                                    c.slice_rows);
      };
      const double loss = run(dh.get());
      const auto dh_bits = dh.download();
      const auto dh_out = testing::bf16_to_double(dh_bits);

      // Logits in fp32 from exact bf16 products: ~1e-6 absolute, at worst dim * 2^-24 * |partial sums| ~ 3e-5
      // with the tensor cores' truncating adders; the softmax denominator summed in fp32 over <= 50280 terms
      // in a fixed tree: <= ~7e-6 relative, as much absolute on its log. Row losses are ln(vocab) +- a few
      // and all positive, so the total errs by < 4e-6 relative at worst. 1e-5; a wrong target, row or weight
      // moves it by more than 1e-3.
      CHECK(std::abs(loss - loss_ref) <= 1e-5 * std::abs(loss_ref));
      // dlogits rounded to bf16 (2^-8 relative each, ~1e-3 in norm), fp32 sums, dh rounded to bf16: ~2e-3.
      // 1e-2; an unwritten element or a NaN leaking from an excluded row gives an infinite error.
      CHECK(relative_error(dh_out, dh_ref) <= 1e-2);
      int64_t excluded_nonzero = 0;
      for (int64_t t = 0; t < c.rows; ++t)
        if (p.excluded[t])
          for (int64_t i = 0; i < c.dim; ++i) excluded_nonzero += dh_out[t * c.dim + i] != 0.0;
      CHECK(excluded_nonzero == 0);
      const auto workspace_after = workspace.download();
      int64_t guard_changed = 0;
      for (size_t i = workspace_bytes; i < workspace_after.size(); ++i) guard_changed += workspace_after[i] != 0xFF;
      CHECK(guard_changed == 0);

      // The loss alone is the same computation without the gradient: the same bits. A second full run too.
      CHECK(run(nullptr) == loss);
      dh.poison();
      REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
      CHECK(run(dh.get()) == loss);
      CHECK(dh.download() == dh_bits);
    }
  }
}

TEST_CASE("CUDA cross entropy refuses bad sizes") {
  cuda::Gemm gemm(nullptr);
  CHECK_THROWS_AS(cuda::cross_entropy_forward_backward(gemm, nullptr, nullptr, 4, 8, 16, nullptr, nullptr, 1.0f,
                                                       nullptr, nullptr, 0),
                  std::invalid_argument);
  CHECK_THROWS_AS(cuda::cross_entropy_forward_backward(gemm, nullptr, nullptr, 4, 0, 16, nullptr, nullptr, 1.0f,
                                                       nullptr, nullptr, 2),
                  std::invalid_argument);
}
