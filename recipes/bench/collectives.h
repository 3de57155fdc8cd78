// Bus bandwidth of the communicator's collectives on GPU buffers, as nccl-tests computes it: for a
// message of S bytes taking t seconds on n ranks, all-reduce moves S/t * 2(n-1)/n over the busiest link,
// all-gather and reduce-scatter S/t * (n-1)/n, where S is the whole buffer (all ranks' pieces). Beside
// the figures REFERENCE.md §7 measured through torch.distributed on the same machine kind.
#pragma once
#include <cstddef>
#include <optional>
#include <string>
#include <vector>

#include "distributed/communicator.h"
#include "framework/backend.h"

namespace ssmtune::bench {

struct CollectiveResult {
  std::string op;                  // all_reduce, all_gather, reduce_scatter
  size_t bytes = 0;                // S
  int ranks = 0;
  std::vector<double> seconds;     // per op, each the mean over one timed batch of iterations
  double median_seconds = 0;
  std::optional<double> peer_bus_bytes_per_second;

  double bus_bytes_per_second() const;
};

// Every rank calls it with the same arguments; buffers come from `backend` (up to the largest size).
std::vector<CollectiveResult> bench_collectives(Backend& backend, Communicator& comm, const std::vector<size_t>& sizes,
                                                int warmup, int iterations, int repetitions);

void print_collective_table(const std::vector<CollectiveResult>& results);

}  // namespace ssmtune::bench
