#include "recipes/bench/harness.h"

#include <fmt/format.h>

#include <algorithm>
#include <stdexcept>
#include <utility>

#include "framework/dtype.h"
#include "kernels/common/counter_rng.h"
#include "kernels/cuda/check.h"

namespace ssmtune::bench {
namespace {

// Generates n values on the host, a slice at a time so the host never holds a whole large tensor,
// and copies each slice to the device.
template <typename T, typename Make>
DeviceBuffer generated(int64_t n, Make make) {
  DeviceBuffer buffer(static_cast<size_t>(n) * sizeof(T));
  constexpr int64_t kSlice = int64_t{1} << 24;
  std::vector<T> host(static_cast<size_t>(std::min(n, kSlice)));
  for (int64_t begin = 0; begin < n; begin += kSlice) {
    const int64_t count = std::min(kSlice, n - begin);
#pragma omp parallel for
    for (int64_t i = 0; i < count; ++i) host[i] = make(begin + i);
    SSMTUNE_CUDA_CHECK(cudaMemcpy(buffer.as<T>() + begin, host.data(), count * sizeof(T), cudaMemcpyHostToDevice),
                       "bench fill");
  }
  return buffer;
}

}  // namespace

DeviceBuffer::DeviceBuffer(size_t bytes) : bytes_(bytes) {
  SSMTUNE_CUDA_CHECK(cudaMalloc(&ptr_, std::max<size_t>(bytes, 1)), "bench buffer");
  SSMTUNE_CUDA_CHECK(cudaMemset(ptr_, 0, std::max<size_t>(bytes, 1)), "bench buffer");
}

DeviceBuffer::~DeviceBuffer() {
  if (ptr_) cudaFree(ptr_);
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : ptr_(std::exchange(other.ptr_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  std::swap(ptr_, other.ptr_);
  std::swap(bytes_, other.bytes_);
  return *this;
}

DeviceBuffer random_bf16(int64_t n, float lo, float hi, uint64_t seed) {
  return generated<uint16_t>(n, [=](int64_t i) {
    return float_to_bf16(lo + (hi - lo) * counter_random_uniform(seed, 0, static_cast<uint64_t>(i)));
  });
}

DeviceBuffer random_f32(int64_t n, float lo, float hi, uint64_t seed) {
  return generated<float>(n, [=](int64_t i) {
    return lo + (hi - lo) * counter_random_uniform(seed, 0, static_cast<uint64_t>(i));
  });
}

DeviceBuffer random_bytes(int64_t n, uint64_t seed) {
  return generated<uint8_t>(
      n, [=](int64_t i) { return static_cast<uint8_t>(counter_random_u64(seed, 0, static_cast<uint64_t>(i))); });
}

DeviceBuffer random_int32(int64_t n, int32_t below, uint64_t seed) {
  return generated<int32_t>(n, [=](int64_t i) {
    return static_cast<int32_t>(counter_random_u64(seed, 0, static_cast<uint64_t>(i)) % static_cast<uint64_t>(below));
  });
}

DeviceBuffer constant_bf16(int64_t n, float value) {
  return generated<uint16_t>(n, [bits = float_to_bf16(value)](int64_t) { return bits; });
}

DeviceInfo device_info() {
  int device = 0;
  SSMTUNE_CUDA_CHECK(cudaGetDevice(&device), "bench device");
  cudaDeviceProp prop{};
  SSMTUNE_CUDA_CHECK(cudaGetDeviceProperties(&prop, device), "bench device");
  DeviceInfo info;
  info.name = prop.name;
  info.sm_count = prop.multiProcessorCount;
  info.l2_bytes = static_cast<size_t>(prop.l2CacheSize);
  info.memory_bytes = prop.totalGlobalMem;
  SSMTUNE_CUDA_CHECK(cudaRuntimeGetVersion(&info.runtime_version), "bench device");
  SSMTUNE_CUDA_CHECK(cudaDriverGetVersion(&info.driver_version), "bench device");
  return info;
}

double median(std::vector<double> values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const size_t mid = values.size() / 2;
  return values.size() % 2 ? values[mid] : 0.5 * (values[mid - 1] + values[mid]);
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Twice the L2 cache: writing it evicts whatever a previous repetition left there.
KernelBench::KernelBench(int warmup, int repetitions)
    : warmup_(warmup), repetitions_(repetitions), l2_flush_(2 * device_info().l2_bytes) {
  if (warmup < 0 || repetitions < 1)
    throw std::invalid_argument(fmt::format("bench: warm-up {} and repetitions {} must be >= 0 and >= 1", warmup, repetitions));
  SSMTUNE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "bench stream");
  gemm_ = std::make_unique<cuda::Gemm>(stream_);
}

KernelBench::~KernelBench() {
  gemm_.reset();
  cudaStreamDestroy(stream_);
}

std::vector<double> KernelBench::time(const std::function<void()>& op) {
  // Setup (buffer fills, table uploads) ran on the default stream, which this non-blocking stream does
  // not wait for.
  SSMTUNE_CUDA_CHECK(cudaDeviceSynchronize(), "bench setup");
  for (int i = 0; i < warmup_; ++i) op();
  SSMTUNE_CUDA_CHECK(cudaStreamSynchronize(stream_), "bench warm-up");
  std::vector<cudaEvent_t> events(2 * static_cast<size_t>(repetitions_));
  for (cudaEvent_t& e : events) SSMTUNE_CUDA_CHECK(cudaEventCreate(&e), "bench events");
  std::vector<double> seconds;
  try {
    for (int r = 0; r < repetitions_; ++r) {
      SSMTUNE_CUDA_CHECK(cudaMemsetAsync(l2_flush_.as<void>(), r & 0xFF, l2_flush_.bytes(), stream_), "bench L2 flush");
      SSMTUNE_CUDA_CHECK(cudaEventRecord(events[2 * r], stream_), "bench events");
      op();
      SSMTUNE_CUDA_CHECK(cudaEventRecord(events[2 * r + 1], stream_), "bench events");
    }
    SSMTUNE_CUDA_CHECK(cudaStreamSynchronize(stream_), "bench timed runs");
    for (int r = 0; r < repetitions_; ++r) {
      float ms = 0;
      SSMTUNE_CUDA_CHECK(cudaEventElapsedTime(&ms, events[2 * r], events[2 * r + 1]), "bench events");
      seconds.push_back(ms * 1e-3);
    }
  } catch (...) {
    for (cudaEvent_t e : events) cudaEventDestroy(e);
    throw;
  }
  for (cudaEvent_t e : events) SSMTUNE_CUDA_CHECK(cudaEventDestroy(e), "bench events");
  return seconds;
}

void KernelBench::record(const std::string& name, const std::string& shape, Bound bound, double amount,
                         std::optional<double> peer_seconds, const std::function<void()>& op) {
  KernelResult row;
  row.name = name;
  row.shape = shape;
  row.bound = bound;
  row.amount = amount;
  row.peer_seconds = peer_seconds;
  row.seconds = time(op);
  row.median_seconds = median(row.seconds);
  const bool bytes = row.bound == Bound::bytes;
  const auto [fastest, slowest] = std::minmax_element(row.seconds.begin(), row.seconds.end());
  fmt::print("  {:<26} {:<22} median {:>9.1f} us (min {:.1f}, max {:.1f})  {:.2f} {}\n", row.name, row.shape,
             row.median_seconds * 1e6, *fastest * 1e6, *slowest * 1e6, row.rate() * 1e-12, bytes ? "TB/s" : "TFLOP/s");
  std::fflush(stdout);
  results_.push_back(std::move(row));
}

void KernelBench::record_forward_backward(const std::string& name, const std::string& shape, double forward_bytes,
                                          double backward_bytes, double peer_forward_seconds,
                                          double peer_forward_backward_seconds, const std::function<void()>& forward,
                                          const std::function<void()>& backward) {
  record(name + " fwd", shape, Bound::bytes, forward_bytes, peer_forward_seconds, forward);
  record(name + " fwd+bwd", shape, Bound::bytes, forward_bytes + backward_bytes, peer_forward_backward_seconds, [&] {
    forward();
    backward();
  });
}

void KernelBench::attempt(const std::string& name, const std::string& shape, const std::function<void()>& body) {
  try {
    body();
  } catch (const std::exception& e) {
    // An allocation failure leaves its error for the next cudaGetLastError: clear it so the next entry's
    // launch checks do not report it. A sticky error (a fault inside a kernel) stays and fails the rest.
    cudaGetLastError();
    fmt::print("  {:<26} {:<22} FAILED: {}\n", name, shape, e.what());
    std::fflush(stdout);
    KernelResult row;
    row.name = name;
    row.shape = shape;
    row.error = e.what();
    results_.push_back(std::move(row));
  }
}

}  // namespace ssmtune::bench
