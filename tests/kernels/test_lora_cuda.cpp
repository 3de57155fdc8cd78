// The CUDA LoRA path against cpu::lora_forward / lora_backward in double, without and with dropout: strided
// x, y, dy and dx (the gaps of inputs NaN so that reading one shows, those of outputs a sentinel that must
// survive), dA and dB accumulating onto non-zero values, dx accumulating, and a workspace of exactly
// lora_workspace_bytes followed by a guard that must stay untouched. The bf16 copies of A and B come from
// lora_adapters_to_bf16, itself checked bit for bit against the host's rounding.
#include <cuda_runtime.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "framework/dtype.h"
#include "kernels/common/counter_rng.h"
#include "kernels/cpu/lora.h"
#include "kernels/cuda/gemm.h"
#include "kernels/cuda/lora.h"
#include "tests/catch.h"
#include "tests/kernels/device_buffer.h"

using namespace ssmtune;
using testing::DeviceBuffer;
using testing::relative_error;

namespace {

constexpr size_t kGuardBytes = 4096;

struct LoraCase {
  cpu::LoraDims d;
  int64_t ldx, ldy, lddx;
  int64_t x_offset;  // x is a column slice of a wider row, as dt_proj reads x_proj's output
};

// Odd everything (strides, a pointer one element past an aligned address), then a production-like layout.
const LoraCase kCases[] = {
    {{5, 7, 6, 3}, 9, 8, 10, 1},
    {{37, 130, 67, 8}, 133, 70, 131, 1},
    {{300, 1000, 600, 16}, 1003, 605, 1002, 0},
    {{256, 512, 1024, 16}, 1024 + 512 + 48, 1024, 512, 1024},
};

std::vector<float> random_f32(size_t n, std::mt19937_64& rng, double low, double high) {
  std::uniform_real_distribution<double> uniform(low, high);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(uniform(rng));
  return v;
}

std::vector<double> widen(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// The elements of a strided matrix, in order.
std::vector<double> window(const testing::StridedBf16& layout, const std::vector<double>& values) {
  std::vector<double> out;
  for (size_t at = 0; at < values.size(); ++at)
    if (layout.inside(at)) out.push_back(values[at]);
  return out;
}

// Number of elements outside the matrix whose bits differ from `before`.
int64_t gaps_changed(const testing::StridedBf16& layout, const std::vector<uint16_t>& before, const std::vector<uint16_t>& after) {
  int64_t changed = 0;
  for (size_t at = 0; at < before.size(); ++at) changed += !layout.inside(at) && before[at] != after[at];
  return changed;
}

// Workspace of exactly lora_workspace_bytes (without the dropout region when p = 0), then a guard; poisoned (NaN) so that reading scratch before
// writing it shows.
struct Workspace {
  size_t bytes;
  DeviceBuffer<uint8_t> buffer;
  explicit Workspace(size_t n) : bytes(n), buffer(n + kGuardBytes) {}
  bool guard_intact() const {
    const auto host = buffer.download();
    for (size_t i = bytes; i < host.size(); ++i)
      if (host[i] != 0xFF) return false;
    return true;
  }
};

// A and B for the GEMMs as the backend makes them: the fp32 masters through lora_adapters_to_bf16, into a
// poisoned buffer.
void bf16_copy(const DeviceBuffer<float>& master, DeviceBuffer<uint16_t>& copy, cudaStream_t stream) {
  REQUIRE(copy.size() == master.size());
  cuda::lora_adapters_to_bf16(master.get(), static_cast<int64_t>(master.size()), copy.get(), stream);
}

struct Inputs {
  testing::StridedBf16 x;
  std::vector<float> A, B;
  float scale;
  cpu::LoraDropout dropout;
};

Inputs random_inputs(const LoraCase& c, double p, std::mt19937_64& rng) {
  const double bound = 1.0 / std::sqrt(static_cast<double>(c.d.in));  // kaiming_uniform(a=sqrt(5)) as PEFT
  // B non-zero (PEFT starts it at 0) so that every product matters; scaled so that B h is O(1) like y.
  const double b_bound = 1.0 / std::sqrt(static_cast<double>(c.d.rank));
  Inputs in{testing::strided_bf16(c.d.rows, c.d.in, c.ldx, c.x_offset, testing::kBf16NaN, rng),
            random_f32(c.d.rank * c.d.in, rng, -bound, bound), random_f32(c.d.out * c.d.rank, rng, -b_bound, b_bound),
            2.0f /* alpha / r = 32 / 16 */, {p, rng(), rng() % 1000}};
  return in;
}

void check_forward(cuda::Gemm& gemm, const LoraCase& c, double p, std::mt19937_64& rng) {
  const cpu::LoraDims& d = c.d;
  const Inputs in = random_inputs(c, p, rng);
  const uint16_t y_gap = float_to_bf16(3.0f);
  const testing::StridedBf16 y0 = testing::strided_bf16(d.rows, d.out, c.ldy, 0, y_gap, rng);

  std::vector<double> h_ref(d.rows * d.rank), y_ref = y0.values;
  cpu::lora_forward<double>(d, in.x.values.data() + c.x_offset, c.ldx, widen(in.A).data(), widen(in.B).data(),
                            in.scale, in.dropout, h_ref.data(), d.rank, y_ref.data(), c.ldy);

  DeviceBuffer<uint16_t> x(in.x.bits), h(d.rows * d.rank), y(y0.bits);
  DeviceBuffer<float> A(in.A), B(in.B);
  DeviceBuffer<uint16_t> A16(A.size()), B16(B.size());
  Workspace workspace(cuda::lora_workspace_bytes(d, p > 0));
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);  // uploads and poison done before the op's stream starts
  const auto stream = static_cast<cudaStream_t>(gemm.stream());
  bf16_copy(A, A16, stream);
  bf16_copy(B, B16, stream);
  cuda::lora_forward(gemm, d, x.get() + c.x_offset, c.ldx, A16.get(), B16.get(), in.scale, in.dropout, h.get(),
                     d.rank, y.get(), c.ldy, workspace.buffer.get());
  const auto h_out = testing::bf16_to_double(h.download());
  const auto y_bits = y.download();

  INFO("rows " << d.rows << " in " << d.in << " out " << d.out << " rank " << d.rank << " dropout " << p);
  // The device rounds A, B and dropout(x) to bf16 (up to 2^-8 relative each, ~1e-3 in norm) and h, y on output
  // (the same again); fp32 accumulation is negligible. Together ~3e-3: 1e-2. A wrong mask, index or transpose
  // gives O(1); an unwritten element or a read gap gives NaN.
  CHECK(relative_error(h_out, h_ref) <= 1e-2);
  CHECK(relative_error(window(y0, testing::bf16_to_double(y_bits)), window(y0, y_ref)) <= 1e-2);
  CHECK(gaps_changed(y0, y0.bits, y_bits) == 0);
  CHECK(workspace.guard_intact());
}

void check_backward(cuda::Gemm& gemm, const LoraCase& c, double p, std::mt19937_64& rng) {
  const cpu::LoraDims& d = c.d;
  const Inputs in = random_inputs(c, p, rng);
  const auto h = testing::random_bf16(d.rows * d.rank, rng);
  const testing::StridedBf16 dy = testing::strided_bf16(d.rows, d.out, c.ldy, 0, testing::kBf16NaN, rng);
  const testing::StridedBf16 dx0 = testing::strided_bf16(d.rows, d.in, c.lddx, 0, float_to_bf16(3.0f), rng);
  const std::vector<float> dA0 = random_f32(d.rank * d.in, rng, -1.0, 1.0);
  const std::vector<float> dB0 = random_f32(d.out * d.rank, rng, -1.0, 1.0);

  std::vector<double> dA_ref = widen(dA0), dB_ref = widen(dB0), dx_ref = dx0.values, dh(d.rows * d.rank);
  cpu::lora_backward<double>(d, in.x.values.data() + c.x_offset, c.ldx, widen(in.A).data(), widen(in.B).data(),
                             in.scale, in.dropout, h.values.data(), d.rank, dy.values.data(), c.ldy, dA_ref.data(),
                             dB_ref.data(), dx_ref.data(), c.lddx, dh.data());

  DeviceBuffer<uint16_t> x(in.x.bits), h_dev(h.bits), dy_dev(dy.bits), dx(dx0.bits);
  DeviceBuffer<float> A(in.A), B(in.B), dA(dA0), dB(dB0);
  DeviceBuffer<uint16_t> A16(A.size()), B16(B.size());
  Workspace workspace(cuda::lora_workspace_bytes(d, p > 0));
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  const auto stream = static_cast<cudaStream_t>(gemm.stream());
  bf16_copy(A, A16, stream);
  bf16_copy(B, B16, stream);
  cuda::lora_backward(gemm, d, x.get() + c.x_offset, c.ldx, A16.get(), B16.get(), in.scale, in.dropout, h_dev.get(),
                      d.rank, dy_dev.get(), c.ldy, dA.get(), dB.get(), dx.get(), c.lddx, workspace.buffer.get());
  const auto dA_out = dA.download(), dB_out = dB.download();
  const auto dx_bits = dx.download();

  // dA and dB accumulate onto values of their own size: compare what was added.
  const auto increment = [](const std::vector<float>& after, const std::vector<float>& before) {
    std::vector<double> v(after.size());
    for (size_t i = 0; i < v.size(); ++i) v[i] = double(after[i]) - double(before[i]);
    return v;
  };
  const auto increment_ref = [](const std::vector<double>& after, const std::vector<float>& before) {
    std::vector<double> v(after.size());
    for (size_t i = 0; i < v.size(); ++i) v[i] = after[i] - double(before[i]);
    return v;
  };

  INFO("rows " << d.rows << " in " << d.in << " out " << d.out << " rank " << d.rank << " dropout " << p);
  // dB = scale dyᵀ h takes its bf16 inputs as they are: exact products, fp32 sums over <= 300 rows (~1e-6,
  // at worst ~300 * 2^-24 = 2e-5 with the tensor cores' truncating adders): 1e-4, 20x below what a bf16
  // rounding on the way would give.
  CHECK(relative_error(increment(dB_out, dB0), increment_ref(dB_ref, dB0)) <= 1e-4);
  // dA goes through dh (B rounded to bf16, dh rounded to bf16) and dropout(x) in bf16: ~2e-3 in norm: 1e-2.
  CHECK(relative_error(increment(dA_out, dA0), increment_ref(dA_ref, dA0)) <= 1e-2);
  // dx: dh and A in bf16 and the bf16 output, on a dx0 of the increment's size: ~3e-3: 1e-2.
  CHECK(relative_error(window(dx0, testing::bf16_to_double(dx_bits)), window(dx0, dx_ref)) <= 1e-2);
  CHECK(gaps_changed(dx0, dx0.bits, dx_bits) == 0);
  CHECK(workspace.guard_intact());
  if (p > 0) {
    // Exactly the CPU's mask: a dropped element gets nothing, so its dx keeps its bits.
    int64_t dropped = 0, dropped_changed = 0;
    for (int64_t t = 0; t < d.rows; ++t)
      for (int64_t i = 0; i < d.in; ++i) {
        if (counter_random_uniform(in.dropout.seed, in.dropout.stream, static_cast<uint64_t>(t * d.in + i)) >= p)
          continue;
        ++dropped;
        dropped_changed += dx_bits[t * c.lddx + i] != dx0.bits[t * c.lddx + i];
      }
    CHECK(dropped > 0);
    CHECK(dropped_changed == 0);
  }
}

// Every case, without and with dropout, through one Gemm on a non-blocking stream: an op that launched on
// the legacy stream instead of the Gemm's would race with it, not serialise.
template <typename Check>
void for_each_case(Check check) {
  const testing::NonBlockingStream stream;
  cuda::Gemm gemm(stream.get());
  const auto seed = std::random_device{}();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (const LoraCase& c : kCases)
    for (const double p : {0.0, 0.3}) check(gemm, c, p, rng);
}

}  // namespace

TEST_CASE("CUDA LoRA forward equals the CPU reference, without and with dropout") { for_each_case(check_forward); }

TEST_CASE("CUDA LoRA backward equals the CPU reference, without and with dropout") { for_each_case(check_backward); }

TEST_CASE("CUDA LoRA adapters to bf16 round each value to nearest even, as the host does") {
  const testing::NonBlockingStream stream;
  const auto seed = std::random_device{}();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  // Random values over many binades, then the cases rounding decides: halfway between two bf16 values with
  // an even and an odd lower neighbour, just above halfway, the largest finite floats, subnormals, zeros,
  // infinities. An odd count, not a multiple of the launch's blocks.
  std::vector<float> values = random_f32(100003, rng, -1.0, 1.0);
  for (size_t i = 0; i < values.size(); i += 3) values[i] = std::ldexp(values[i], static_cast<int>(rng() % 60) - 30);
  const float special[] = {std::bit_cast<float>(0x3F808000u), std::bit_cast<float>(0x3F818000u),
                           std::bit_cast<float>(0x3F808001u), std::numeric_limits<float>::max(),
                           -std::numeric_limits<float>::max(), std::numeric_limits<float>::denorm_min(),
                           std::bit_cast<float>(0x00408000u), 0.0f, -0.0f,
                           std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity()};
  values.insert(values.end(), std::begin(special), std::end(special));
  const DeviceBuffer<float> master(values);
  DeviceBuffer<uint16_t> copy(values.size());
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);  // upload and poison done before the stream starts
  bf16_copy(master, copy, stream.get());
  const std::vector<uint16_t> bits = copy.download();
  int64_t differ = 0;
  for (size_t i = 0; i < values.size(); ++i) differ += bits[i] != float_to_bf16(values[i]);
  CHECK(differ == 0);
}
