// ssmtune on the CUDA backend against Hugging Face transformers and PEFT themselves, over the same
// references as test_hf_reference.cpp (which says why the comparison is with HF on the NF4 weights).
#include <memory>

#include "framework/cuda_backend.h"
#include "tests/catch.h"
#include "tests/hf/hf_check.h"

using namespace ssmtune;
using namespace ssmtune::test;
namespace fs = std::filesystem;

namespace {

// The CUDA backend keeps activations and the frozen 16-bit weights (embedding, LM head) in bf16, whose
// rounding (2^-9 relative) dominates: about 1e-2 of max|logit| after the bf16 LM head, a few 1e-3 on the
// mean loss; the adapter gradients flow back through the bf16 activations of every layer, a few 1e-2
// of each tensor's largest entry. A real mistake (a skipped norm weight, a transposed tensor, a wrong
// scale, a shifted target) moves these by 1e-1 or more.
constexpr Tolerances kBf16{3e-2, 1e-2, 6e-2};

}  // namespace

TEST_CASE("CUDA: logits, loss and every adapter gradient match HF + PEFT on the NF4 weights within bf16") {
  for (const fs::path& dir : hf_reference_dirs(hf_reference_root())) {
    const HfReference ref(dir);
    const std::unique_ptr<Backend> backend = make_cuda_backend(0);
    const MambaWeights weights = MambaWeights::load(dir / "model", *backend);
    check_run(ref, "nf4.", run_ssmtune(ref, weights, *backend, ref.lora(false)), kBf16, "cuda-bf16");
  }
}
