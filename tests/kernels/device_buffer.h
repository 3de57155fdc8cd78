// Helpers of the gpu-labelled tests: device buffers filled from host vectors, poisoned before a kernel
// runs (every byte 0xFF: NaN in fp32 and bf16, so an element the kernel fails to write shows up), and
// the relative error against a CPU reference.
#pragma once
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "framework/dtype.h"
#include "tests/catch.h"

namespace ssmtune::testing {

template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t n) : n_(n) {
    REQUIRE(cudaMalloc(&ptr_, (n ? n : 1) * sizeof(T)) == cudaSuccess);
    poison();
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { upload(host); }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* get() const { return ptr_; }
  size_t size() const { return n_; }
  void upload(const std::vector<T>& host) {
    REQUIRE(host.size() == n_);
    REQUIRE(cudaMemcpy(ptr_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess);
  }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    REQUIRE(cudaMemcpy(host.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost) == cudaSuccess);
    return host;
  }
  void poison() { REQUIRE(cudaMemset(ptr_, 0xFF, (n_ ? n_ : 1) * sizeof(T)) == cudaSuccess); }

 private:
  T* ptr_ = nullptr;
  size_t n_ = 0;
};

// Values drawn from N(mean, stddev) and rounded to bf16, kept both as bf16 bits (for the device) and
// as the exactly representable doubles (for the reference).
struct Bf16Values {
  std::vector<uint16_t> bits;
  std::vector<double> values;
};
inline Bf16Values random_bf16(size_t n, std::mt19937_64& rng, double mean = 0.0, double stddev = 1.0) {
  std::normal_distribution<double> normal(mean, stddev);
  Bf16Values v;
  v.bits.resize(n);
  v.values.resize(n);
  for (size_t i = 0; i < n; ++i) {
    v.bits[i] = float_to_bf16(static_cast<float>(normal(rng)));
    v.values[i] = bf16_to_float(v.bits[i]);
  }
  return v;
}

inline std::vector<double> bf16_to_double(const std::vector<uint16_t>& bits) {
  std::vector<double> out(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) out[i] = bf16_to_float(bits[i]);
  return out;
}

constexpr uint16_t kBf16NaN = 0xFFFF;

// A bf16 matrix [rows, cols] with row stride ld, `offset` elements into its buffer; every other element of
// the buffer holds `gap` (NaN, so that reading it shows, or a sentinel that a write must not change).
struct StridedBf16 {
  int64_t rows, cols, ld, offset;
  std::vector<uint16_t> bits;
  std::vector<double> values;
  bool inside(size_t at) const {
    const int64_t from_start = static_cast<int64_t>(at) - offset;
    return from_start >= 0 && from_start / ld < rows && from_start % ld < cols;
  }
};
inline StridedBf16 strided_bf16(int64_t rows, int64_t cols, int64_t ld, int64_t offset, uint16_t gap,
                                std::mt19937_64& rng) {
  StridedBf16 s{rows, cols, ld, offset, {}, {}};
  const size_t size = offset + (rows - 1) * ld + cols + 1;
  s.bits.assign(size, gap);
  s.values.assign(size, bf16_to_float(gap));
  const Bf16Values random = random_bf16(rows * cols, rng);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      s.bits[offset + r * ld + c] = random.bits[r * cols + c];
      s.values[offset + r * ld + c] = random.values[r * cols + c];
    }
  return s;
}

// A stream that does not synchronise with the legacy default stream: a kernel launched on the default
// stream instead of the op's would race with the op's other work, not serialise, and the test would see it.
class NonBlockingStream {
 public:
  NonBlockingStream() { REQUIRE(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking) == cudaSuccess); }
  ~NonBlockingStream() { cudaStreamDestroy(stream_); }
  NonBlockingStream(const NonBlockingStream&) = delete;
  NonBlockingStream& operator=(const NonBlockingStream&) = delete;
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

// ||out - ref|| / ||ref|| over all elements; infinity if any output is not finite.
inline double relative_error(const std::vector<double>& out, const std::vector<double>& ref) {
  REQUIRE(out.size() == ref.size());
  double diff = 0, norm = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    if (!std::isfinite(out[i])) return std::numeric_limits<double>::infinity();
    diff += (out[i] - ref[i]) * (out[i] - ref[i]);
    norm += ref[i] * ref[i];
  }
  return std::sqrt(diff / (norm > 0 ? norm : 1.0));
}

}  // namespace ssmtune::testing
