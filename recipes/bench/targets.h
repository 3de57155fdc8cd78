// Issue 6's targets (speed and memory on nvidia-h100-x1), judged against what this run measured: the
// last table the benchmark prints, one line per row of the issue, met or not.
#pragma once
#include <vector>

#include "recipes/bench/report.h"

namespace ssmtune::bench {

void print_target_table(const Ceilings& ceilings, const std::vector<KernelResult>& kernels,
                        const std::vector<StepResult>& steps);

}  // namespace ssmtune::bench
