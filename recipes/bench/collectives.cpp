#include "recipes/bench/collectives.h"

#include <fmt/format.h>

#include <chrono>
#include <functional>

#include "framework/error.h"
#include "recipes/bench/harness.h"
#include "recipes/bench/peers.h"

namespace ssmtune::bench {
namespace {

using Clock = std::chrono::steady_clock;

std::optional<double> peer_bus_bandwidth(const std::string& op, size_t bytes, int ranks) {
  if (ranks != 2) return std::nullopt;
  for (const peers::CollectivePeer& p : peers::kNcclTwoH200)
    if (p.op == op && p.bytes == bytes) return p.bus_gb_per_second * 1e9;
  return std::nullopt;
}

// The mean seconds of one op over `iterations` back-to-back ops, each timed batch ending in wait().
std::vector<double> time_batches(Communicator& comm, int warmup, int iterations, int repetitions,
                                 const std::function<void()>& op) {
  for (int i = 0; i < warmup; ++i) op();
  comm.wait();
  std::vector<double> seconds;
  for (int r = 0; r < repetitions; ++r) {
    comm.barrier();  // the ranks start together
    const Clock::time_point start = Clock::now();
    for (int i = 0; i < iterations; ++i) op();
    comm.wait();
    seconds.push_back(std::chrono::duration<double>(Clock::now() - start).count() / iterations);
  }
  return seconds;
}

// One all-reduce of ones must give the number of ranks everywhere (checked at both ends).
void check_all_reduce(Backend& backend, Communicator& comm, float* buffer, size_t count) {
  std::vector<float> ones(count, 1.0f);
  backend.copy_from_host(buffer, ones.data(), count * sizeof(float));
  comm.all_reduce_sum(buffer, count, Element::f32);
  comm.wait();
  float ends[2];
  backend.copy_to_host(&ends[0], buffer, sizeof(float));
  backend.copy_to_host(&ends[1], buffer + count - 1, sizeof(float));
  if (ends[0] != comm.size() || ends[1] != comm.size())
    fail("all_reduce of ones over {} ranks gave {} and {} at the ends", comm.size(), ends[0], ends[1]);
}

}  // namespace

double CollectiveResult::bus_bytes_per_second() const {
  if (median_seconds <= 0) return 0;
  const double n = ranks, algorithm = static_cast<double>(bytes) / median_seconds;
  return op == "all_reduce" ? algorithm * 2 * (n - 1) / n : algorithm * (n - 1) / n;
}

std::vector<CollectiveResult> bench_collectives(Backend& backend, Communicator& comm, const std::vector<size_t>& sizes,
                                                int warmup, int iterations, int repetitions) {
  size_t largest = 0;
  for (size_t s : sizes) largest = std::max(largest, s);
  float* buffer = static_cast<float*>(backend.allocate(largest));
  backend.fill_zero(buffer, largest);  // zeros stay zeros under every op: no overflow across iterations
  std::vector<CollectiveResult> results;
  for (size_t bytes : sizes) {
    const size_t piece = bytes / sizeof(float) / comm.size();  // elements per rank
    const std::vector<size_t> counts(comm.size(), piece);
    const std::vector<std::pair<std::string, std::function<void()>>> ops{
        {"all_reduce", [&] { comm.all_reduce_sum(buffer, bytes / sizeof(float), Element::f32); }},
        {"all_gather", [&] { comm.all_gather(buffer, counts, Element::f32); }},
        {"reduce_scatter", [&] { comm.reduce_scatter_sum(buffer, counts, Element::f32); }},
    };
    for (const auto& [name, op] : ops) {
      CollectiveResult r;
      r.op = name;
      r.bytes = name == "all_reduce" ? bytes : piece * sizeof(float) * comm.size();
      r.ranks = comm.size();
      r.peer_bus_bytes_per_second = peer_bus_bandwidth(name, bytes, comm.size());
      r.seconds = time_batches(comm, warmup, iterations, repetitions, op);
      r.median_seconds = median(r.seconds);
      if (comm.rank() == 0)
        fmt::print("  {:<15} {:>6} MiB  {:>9.1f} us  bus {:>6.1f} GB/s\n", name, bytes >> 20, r.median_seconds * 1e6,
                   r.bus_bytes_per_second() * 1e-9);
      std::fflush(stdout);
      results.push_back(std::move(r));
    }
  }
  check_all_reduce(backend, comm, buffer, largest / sizeof(float));
  backend.release(buffer);
  return results;
}

void print_collective_table(const std::vector<CollectiveResult>& results) {
  fmt::print("\n{:<15} {:>9} {:>6} {:>11} {:>11} {:>11} {:>9}\n", "collective", "size", "ranks", "time_us",
             "bus_GB/s", "peer_GB/s", "ours/peer");
  for (const CollectiveResult& r : results) {
    const double bus = r.bus_bytes_per_second();
    const std::optional<double> peer = r.peer_bus_bytes_per_second;
    fmt::print("{:<15} {:>5} MiB {:>6} {:>11.1f} {:>11.1f} {:>11} {:>9}\n", r.op, r.bytes >> 20, r.ranks,
               r.median_seconds * 1e6, bus * 1e-9, peer ? fmt::format("{:.0f}", *peer * 1e-9) : "-",
               peer ? fmt::format("{:.2f}", bus / *peer) : "-");
  }
  fmt::print("(size: the whole buffer, all ranks' pieces; bus bandwidth as nccl-tests defines it; peer: NCCL through\n"
             " torch.distributed on 2 x H200, REFERENCE.md §7; median over the timed batches)\n");
}

}  // namespace ssmtune::bench
