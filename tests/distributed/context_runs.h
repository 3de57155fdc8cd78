// The context-parallel training runs of test_context_parallel.cpp (CPU) and test_context_parallel_cuda.cpp
// (NCCL): every way this job's ranks can split a sequence, with packed documents and with one document per
// sequence, against rank 0 alone training the same global batch unsplit.
#pragma once
#include <string>
#include <vector>

#include "tests/distributed/training_runs.h"

namespace ssmtune::test {

// The context sizes this job's ranks allow: every divisor of the world above 1 that divides data.seq_len
// (24 in TrainingRuns' recipes). With 4 ranks, 2 replicas of 2 slices and 1 of 4.
inline std::vector<int> context_sizes() {
  std::vector<int> sizes;
  for (int c = 2; c <= world().size(); ++c)
    if (world().size() % c == 0 && 24 % c == 0) sizes.push_back(c);
  return sizes;
}

// Dropout is off in both: its masks are drawn per position within a slice, so they differ by design.
inline void check_context_parallel_trains_as_one_process(const TrainingRuns& runs, double tolerance) {
  for (const bool packing : {true, false}) {
    const std::vector<std::string> exact{"lora.dropout=0", packing ? "data.packing=true" : "data.packing=false"};
    const std::string alone = packing ? "alone-packed" : "alone-unpacked";
    runs.train_alone(runs.recipe(alone, 1, "ddp", 4, exact));
    for (const int context : context_sizes()) {
      const int replicas = world().size() / context;
      std::vector<std::string> overrides = exact;
      overrides.push_back("parallel.context=" + std::to_string(context));
      const std::string name = alone + "-context" + std::to_string(context);
      runs.train_together(runs.recipe(name, replicas, "zero2", 4, overrides));
      INFO(context << " context ranks x " << replicas << " replicas, packing " << packing);
      compare_runs(runs, name, alone, 4, tolerance);
      check_adapters_moved(runs, name, 4, tolerance);
    }
  }
}

}  // namespace ssmtune::test
