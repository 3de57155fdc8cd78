#include "distributed/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <exception>
#include <thread>
#include <vector>

#include "framework/error.h"

namespace ssmtune {
namespace {

ncclDataType_t nccl_type(Element element) {
  switch (element) {
    case Element::f32: return ncclFloat32;
    case Element::f64: return ncclFloat64;
    case Element::i64: return ncclInt64;
    case Element::u64: return ncclUint64;
    case Element::byte: return ncclUint8;
  }
  return ncclUint8;
}

void check_cuda(cudaError_t status, std::string_view what) {
  if (status != cudaSuccess) fail("{}: CUDA error: {}", what, cudaGetErrorString(status));
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(const ProcessGroup& group, Watchdog& watchdog, Communicator& host, void* compute_stream)
      : Communicator(group.rank(), group.size()),
        watchdog_(watchdog),
        compute_(static_cast<cudaStream_t>(compute_stream)) {
    int least = 0, greatest = 0;
    check_cuda(cudaDeviceGetStreamPriorityRange(&least, &greatest), "NCCL communicator");
    check_cuda(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, greatest), "NCCL communicator stream");
    check_cuda(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming), "NCCL communicator event");
    for (cudaEvent_t& event : done_)
      check_cuda(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "NCCL communicator event");
    check_cuda(cudaMalloc(&barrier_value_, sizeof(float)), "NCCL communicator");
    check_cuda(cudaMemset(barrier_value_, 0, sizeof(float)), "NCCL communicator");
    ncclUniqueId id{};
    if (rank() == 0) check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    host.broadcast(&id, sizeof id, Element::byte, 0);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    const ncclResult_t started = ncclCommInitRankConfig(&comm_, size(), id, rank(), &config);
    if (started != ncclSuccess && started != ncclInProgress)
      fail("ncclCommInitRankConfig (rank {} of {}): {}", rank(), size(), ncclGetErrorString(started));
    settle("NCCL initialisation");
  }

  ~NcclCommunicator() override {
    // Leaving on an error of this rank alone, the others are not finalizing with it: abort at once
    // rather than wait for them.
    if (std::uncaught_exceptions() > 0) abort();
    if (comm_ && !aborted_) {
      // Finalizing flushes what is still queued; bounded, so that a broken peer cannot hang the exit.
      ncclResult_t state = ncclCommFinalize(comm_);
      const auto deadline =
          std::chrono::steady_clock::now() + std::chrono::duration<double>(watchdog_.timeout_seconds());
      while (state == ncclSuccess || state == ncclInProgress) {
        ncclCommGetAsyncError(comm_, &state);
        if (state != ncclInProgress || std::chrono::steady_clock::now() > deadline) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      if (state == ncclSuccess) ncclCommDestroy(comm_);
      else ncclCommAbort(comm_);
    }
    cudaFree(barrier_value_);
    cudaEventDestroy(ready_);
    for (cudaEvent_t event : done_) cudaEventDestroy(event);
    cudaStreamDestroy(stream_);
  }

  std::string name() const override { return "NCCL"; }
  uint64_t collectives_issued() const override { return issued_; }

  void order_compute_after(uint64_t collective) override {
    if (collective == 0) return;
    if (collective > issued_) fail("internal: ordering after NCCL collective {} of {} issued", collective, issued_);
    // Its event has been recorded again for a later collective since: wait on the host instead (correct,
    // only without the overlap).
    if (issued_ - collective >= done_.size()) return wait();
    check_cuda(cudaStreamWaitEvent(compute_, done(collective), 0), last_);
  }

  void all_reduce_sum(void* buffer, size_t count, Element element) override {
    if (size() == 1 || count == 0) return;
    if (element == Element::byte) fail("internal: NCCL all_reduce_sum over bytes");
    run("NCCL all_reduce", [&] {
      check(ncclAllReduce(buffer, buffer, count, nccl_type(element), ncclSum, comm_, stream_), "ncclAllReduce");
    });
  }

  void reduce_scatter_sum(void* buffer, std::span<const size_t> counts, Element element) override {
    if (size() == 1) return;
    if (element == Element::byte) fail("internal: NCCL reduce_scatter_sum over bytes");
    const std::vector<size_t> offsets = piece_offsets(counts);
    const ncclDataType_t type = nccl_type(element);
    run("NCCL reduce_scatter", [&] {
      if (equal(counts)) {
        check(ncclReduceScatter(buffer, at(buffer, offsets[rank()], element), counts[0], type, ncclSum, comm_, stream_),
              "ncclReduceScatter");
        return;
      }
      for (int r = 0; r < size(); ++r)
        if (counts[r] > 0)
          check(ncclReduce(at(buffer, offsets[r], element), at(buffer, offsets[r], element), counts[r], type, ncclSum,
                           r, comm_, stream_),
                "ncclReduce");
    });
  }

  void all_gather(void* buffer, std::span<const size_t> counts, Element element) override {
    if (size() == 1) return;
    const std::vector<size_t> offsets = piece_offsets(counts);
    const ncclDataType_t type = nccl_type(element);
    run("NCCL all_gather", [&] {
      if (equal(counts)) {
        check(ncclAllGather(at(buffer, offsets[rank()], element), buffer, counts[0], type, comm_, stream_),
              "ncclAllGather");
        return;
      }
      for (int r = 0; r < size(); ++r)
        if (counts[r] > 0)
          check(ncclBroadcast(at(buffer, offsets[r], element), at(buffer, offsets[r], element), counts[r], type, r,
                              comm_, stream_),
                "ncclBroadcast");
    });
  }

  void broadcast(void* buffer, size_t count, Element element, int root) override {
    if (size() == 1 || count == 0) return;
    run("NCCL broadcast", [&] {
      check(ncclBroadcast(buffer, buffer, count, nccl_type(element), root, comm_, stream_), "ncclBroadcast");
    });
  }

  void barrier() override {
    all_reduce_sum(barrier_value_, 1, Element::f32);
    wait();
  }

  void wait() override {
    watchdog_.wait(
        last_,
        [this] {
          check_async(last_);
          const cudaError_t status = cudaEventQuery(done(issued_));
          if (status == cudaErrorNotReady) return false;
          check_cuda(status, last_);
          return true;
        },
        [this] { abort(); });
  }

 private:
  static void* at(void* buffer, size_t offset, Element element) {
    return static_cast<std::byte*>(buffer) + offset * element_size(element);
  }
  std::vector<size_t> piece_offsets(std::span<const size_t> counts) const {
    if (static_cast<int>(counts.size()) != size())
      fail("internal: NCCL collective with {} counts for {} ranks", counts.size(), size());
    std::vector<size_t> offsets(counts.size());
    for (size_t r = 1; r < counts.size(); ++r) offsets[r] = offsets[r - 1] + counts[r - 1];
    return offsets;
  }
  static bool equal(std::span<const size_t> counts) {
    return std::all_of(counts.begin(), counts.end(), [&](size_t c) { return c == counts[0]; });
  }

  // A call of the non-blocking communicator: success or in progress are fine, anything else aborts.
  void check(ncclResult_t result, std::string_view call) {
    if (result != ncclSuccess && result != ncclInProgress) fail_with(result, call);
  }
  void check_async(std::string_view what) {
    ncclResult_t state = ncclSuccess;
    ncclCommGetAsyncError(comm_, &state);
    if (state != ncclSuccess && state != ncclInProgress) fail_with(state, what);
  }
  [[noreturn]] void fail_with(ncclResult_t result, std::string_view what) {
    const std::string detail = comm_ ? ncclGetLastError(comm_) : "";
    abort();
    fail("{}: NCCL error '{}'{}{}", what, ncclGetErrorString(result), detail.empty() ? "" : ": ", detail);
  }
  void abort() {
    if (comm_ && !aborted_) ncclCommAbort(comm_);
    aborted_ = true;
  }

  // Waits, under the Watchdog, until the communicator has taken the calls issued so far (initialisation,
  // or the enqueueing of a group, which may wait for connections to the peers).
  void settle(std::string_view what) {
    watchdog_.wait(
        what,
        [&] {
          ncclResult_t state = ncclSuccess;
          ncclCommGetAsyncError(comm_, &state);
          if (state == ncclInProgress) return false;
          if (state != ncclSuccess) fail_with(state, what);
          return true;
        },
        [this] { abort(); });
  }

  // One collective (one or more NCCL calls as a group) after the compute stream's work so far.
  template <typename Issue>
  void run(const char* what, Issue&& issue) {
    if (aborted_) fail("{}: the NCCL communicator was aborted after an earlier error", what);
    last_ = what;
    check_cuda(cudaEventRecord(ready_, compute_), what);
    check_cuda(cudaStreamWaitEvent(stream_, ready_, 0), what);
    check(ncclGroupStart(), "ncclGroupStart");
    issue();
    check(ncclGroupEnd(), "ncclGroupEnd");
    settle(what);
    ++issued_;
    check_cuda(cudaEventRecord(done(issued_), stream_), what);
  }

  // The event recorded after collective n: a ring, reused every done_.size() collectives.
  cudaEvent_t done(uint64_t n) const { return done_[n % done_.size()]; }

  Watchdog& watchdog_;
  cudaStream_t compute_ = nullptr, stream_ = nullptr;
  cudaEvent_t ready_ = nullptr;
  std::array<cudaEvent_t, 16> done_{};
  uint64_t issued_ = 0;  // collectives issued so far; the last one is number issued_
  float* barrier_value_ = nullptr;
  ncclComm_t comm_ = nullptr;
  bool aborted_ = false;
  const char* last_ = "NCCL collectives";
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(const ProcessGroup& group, Watchdog& watchdog,
                                                     Communicator& host, void* compute_stream) {
  return std::make_unique<NcclCommunicator>(group, watchdog, host, compute_stream);
}

}  // namespace ssmtune
