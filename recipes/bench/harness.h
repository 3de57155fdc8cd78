// The kernel benchmark's harness: device buffers filled with random values generated on the host,
// timing with CUDA events (warm-up first, the L2 cache flushed before every timed repetition, the
// median kept), and the list of results every entry appends to.
#pragma once
#include <cuda_runtime.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kernels/cuda/gemm.h"
#include "recipes/bench/report.h"

namespace ssmtune::bench {

// One cudaMalloc, zeroed, freed on destruction.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes);
  ~DeviceBuffer();
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Device buffers of n elements drawn uniformly from [lo, hi) by the counter RNG under `seed`: inputs
// are never left at zero, which can hide wrong indexing and run faster than real data.
DeviceBuffer random_bf16(int64_t n, float lo, float hi, uint64_t seed);
DeviceBuffer random_f32(int64_t n, float lo, float hi, uint64_t seed);
DeviceBuffer random_bytes(int64_t n, uint64_t seed);
DeviceBuffer random_int32(int64_t n, int32_t below, uint64_t seed);  // uniform over [0, below)
DeviceBuffer constant_bf16(int64_t n, float value);

DeviceInfo device_info();

class KernelBench {
 public:
  KernelBench(int warmup, int repetitions);
  ~KernelBench();
  KernelBench(const KernelBench&) = delete;
  KernelBench& operator=(const KernelBench&) = delete;

  void* stream() const { return stream_; }  // as the kernels' headers take it
  cuda::Gemm& gemm() { return *gemm_; }

  // Runs op `warmup` times, then `repetitions` times, each between two events on the stream with the
  // L2 cache flushed before it (so no input is served from a previous repetition's cache); returns
  // the seconds of every timed repetition.
  std::vector<double> time(const std::function<void()>& op);

  // Times op and appends its row, printing it. amount: the minimum bytes or the FLOPs (per bound);
  // peer_seconds: REFERENCE.md's figure for the same op and shape, where it has one.
  void record(const std::string& name, const std::string& shape, Bound bound, double amount,
              std::optional<double> peer_seconds, const std::function<void()>& op);

  // Records "<name> fwd" and "<name> fwd+bwd", bytes-bound: the peers time the pair, not the backward alone.
  void record_forward_backward(const std::string& name, const std::string& shape, double forward_bytes,
                               double backward_bytes, double peer_forward_seconds, double peer_forward_backward_seconds,
                               const std::function<void()>& forward, const std::function<void()>& backward);

  // Runs one entry's setup and timing. An exception becomes an error row for (name, shape), so that
  // one failing op does not hide the others.
  void attempt(const std::string& name, const std::string& shape, const std::function<void()>& body);

  const std::vector<KernelResult>& results() const { return results_; }

 private:
  int warmup_, repetitions_;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<cuda::Gemm> gemm_;
  DeviceBuffer l2_flush_;
  std::vector<KernelResult> results_;
};

double median(std::vector<double> values);
// Host wall time since `start`, in seconds (whole training steps, synchronised at both ends).
double seconds_since(std::chrono::steady_clock::time_point start);

// The two ceilings of this run: a 1 GiB device-to-device copy and a bf16 GEMM 8192^3 through cuda::Gemm.
Ceilings measure_ceilings(KernelBench& bench);

}  // namespace ssmtune::bench
