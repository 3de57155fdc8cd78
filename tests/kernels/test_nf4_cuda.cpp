// The CUDA NF4 dequantization against the CPU reference on fresh random weights, output poisoned first.
#include <cuda_runtime.h>

#include <random>
#include <vector>

#include "framework/dtype.h"
#include "kernels/cpu/nf4.h"
#include "kernels/cuda/nf4_dequantize.h"
#include "tests/catch.h"

using namespace ssmtune;

namespace {

template <typename T>
T* to_device(const std::vector<T>& host) {
  T* device = nullptr;
  REQUIRE(cudaMalloc(&device, host.size() * sizeof(T) + 1) == cudaSuccess);
  REQUIRE(cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess);
  return device;
}

}  // namespace

TEST_CASE("CUDA NF4 dequantize equals the CPU reference rounded to bf16") {
  cuda::nf4_upload_tables();
  std::mt19937_64 rng(std::random_device{}());
  // Odd row counts, a partial last block and a partial last nested block, and a large weight.
  for (const auto& [rows, cols] : std::vector<std::pair<int64_t, int64_t>>{{3, 50}, {37, 96}, {769, 130}, {2048, 1536}}) {
    const int64_t n = rows * cols;
    std::normal_distribution<float> normal(0.0f, 0.05f);
    std::vector<float> w(n);
    for (float& x : w) x = normal(rng);
    const cpu::Nf4Sizes sizes = cpu::nf4_sizes(n);
    std::vector<uint8_t> packed(sizes.packed_bytes), codes(sizes.blocks);
    std::vector<float> nested(sizes.nested_blocks), reference(n);
    float offset = 0;
    cpu::nf4_quantize(w.data(), n, packed.data(), codes.data(), nested.data(), &offset);
    cpu::nf4_dequantize<float>(packed.data(), codes.data(), nested.data(), offset, n, reference.data());

    uint8_t* d_packed = to_device(packed);
    uint8_t* d_codes = to_device(codes);
    float* d_nested = to_device(nested);
    uint16_t* d_out = nullptr;
    REQUIRE(cudaMalloc(&d_out, n * sizeof(uint16_t)) == cudaSuccess);
    REQUIRE(cudaMemset(d_out, 0xFF, n * sizeof(uint16_t)) == cudaSuccess);  // NaN everywhere
    cuda::nf4_dequantize_bf16(d_packed, d_codes, d_nested, offset, n, d_out, nullptr);
    std::vector<uint16_t> out(n);
    REQUIRE(cudaMemcpy(out.data(), d_out, n * sizeof(uint16_t), cudaMemcpyDeviceToHost) == cudaSuccess);
    // Same fp32 arithmetic in the same order, then one rounding to bf16: equal bit for bit.
    int64_t mismatches = 0;
    for (int64_t i = 0; i < n; ++i) mismatches += out[i] != float_to_bf16(reference[i]);
    INFO(rows << " x " << cols);
    CHECK(mismatches == 0);
    for (void* p : {static_cast<void*>(d_packed), static_cast<void*>(d_codes), static_cast<void*>(d_nested),
                    static_cast<void*>(d_out)})
      cudaFree(p);
  }
}
