// The LM head fused with cross-entropy, loss and dh, at mamba-130m's shape (8 x 2048 tokens, 768,
// vocab 50280, slices of 1024 rows). FLOP-bound: the logits GEMM, then dh = dlogits · W, and the
// count of REFERENCE.md's convention, 3 * 2 * rows * dim * vocab.
#include <fmt/format.h>

#include "kernels/cuda/cross_entropy.h"
#include "recipes/bench/entries.h"

namespace ssmtune::bench {

void bench_cross_entropy(KernelBench& bench) {
  const int64_t rows = 8 * 2048, dim = 768, vocab = 50280, slice = 1024;
  const std::string shape = fmt::format("{}x{} V{} s{}", rows, dim, vocab, slice);
  bench.attempt("lm head + cross-entropy", shape, [&] {
    // Activations after the final norm are O(1); embedding rows O(0.02), as initialised.
    const DeviceBuffer h = random_bf16(rows * dim, -2, 2, 61), W = random_bf16(vocab * dim, -0.05f, 0.05f, 62);
    const DeviceBuffer targets = random_int32(rows, static_cast<int32_t>(vocab), 63);
    const DeviceBuffer weights = constant_bf16(rows, 1.0f);  // every target counted, as in the step
    DeviceBuffer dh(rows * dim * 2), workspace(cuda::cross_entropy_workspace_bytes(rows, slice, vocab));
    // The op synchronises its stream to return the loss: the stop event then follows a host round trip
    // of a few microseconds, small beside the milliseconds of the GEMMs.
    bench.record("lm head + cross-entropy", shape, Bound::flops, 3 * 2.0 * rows * dim * vocab, {}, [&] {
      cuda::cross_entropy_forward_backward(bench.gemm(), h.as<uint16_t>(), W.as<uint16_t>(), rows, dim, vocab,
                                           targets.as<int32_t>(), weights.as<uint16_t>(), 1.0f / rows,
                                           dh.as<uint16_t>(), workspace.as<void>(), slice);
    });
  });
}

}  // namespace ssmtune::bench
