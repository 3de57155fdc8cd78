// The kernel entries, one function per kernel family: each builds random inputs at the shapes the
// training step uses (REFERENCE.md §7 where it has a peer), times the ops through the harness and
// appends one row per (op, shape).
#pragma once
#include "recipes/bench/harness.h"

namespace ssmtune::bench {

void bench_selective_scan(KernelBench& bench);
void bench_causal_conv1d(KernelBench& bench);
void bench_nf4_dequantize(KernelBench& bench);
void bench_nf4_linear(KernelBench& bench);
void bench_rmsnorm(KernelBench& bench);
void bench_cross_entropy(KernelBench& bench);
void bench_adamw(KernelBench& bench);

}  // namespace ssmtune::bench
