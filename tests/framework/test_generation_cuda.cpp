// Recurrent decoding on the CUDA backend gives the full-sequence forward's logits (TrainStep::
// forward_logits on the same backend), for Mamba and falcon-mamba with non-zero adapters on every
// projection. The two paths round their bf16 activations at the same places but from fp32 values
// computed differently (one-token GEMVs against sequence GEMMs, the step kernels' expf against the
// chunked scan's ex2.approx), so they agree to bf16 accuracy over two layers, not bit for bit.
#include <random>

#include "framework/cuda_backend.h"
#include "framework/generation.h"
#include "framework/lora.h"
#include "framework/mamba_model.h"
#include "framework/model_sizes.h"
#include "framework/train_step.h"
#include "tests/catch.h"
#include "tests/framework/scratch_dir.h"
#include "tests/kernels/device_buffer.h"

using namespace ssmtune;

TEST_CASE("on the GPU, decoding token by token gives the full-sequence logits") {
  for (const std::string size : {"demo", "falcon-demo"}) {
    INFO(size);
    test::ScratchDir dir("generation-cuda");
    const MambaConfig config = model_size(size);
    write_random_mamba(dir / "model", config, 3);
    const std::unique_ptr<Backend> backend = make_cuda_backend();
    const MambaWeights weights = MambaWeights::load(dir / "model", *backend);
    LoraConfig lora;
    lora.rank = 8;
    LoraAdapters adapters(*backend, config, lora);
    std::mt19937_64 rng(std::random_device{}());
    std::normal_distribution<double> normal(0.0, 0.05);  // B non-zero, so the adapters change every projection
    std::vector<double> params(static_cast<size_t>(adapters.numel()));
    for (double& p : params) p = normal(rng);
    adapters.upload(adapters.params(), params);

    const int64_t len = 40;
    std::vector<uint32_t> tokens(static_cast<size_t>(len));
    for (uint32_t& t : tokens) t = static_cast<uint32_t>(rng() % config.vocab_size);
    TrainStep step(*backend, weights, adapters, StepShape{1, len, 16, true, 64});
    const std::vector<double> full = step.forward_logits(tokens.data());

    Decoder decoder(*backend, weights, &adapters);
    std::vector<double> recurrent;
    for (const uint32_t t : tokens) {
      decoder.feed(t);
      const std::span<const double> logits = decoder.next_logits();
      recurrent.insert(recurrent.end(), logits.begin(), logits.end());
    }
    // Logits of ~O(1) from bf16 hidden states and a bf16 LM head (2^-9 relative each) after two layers of
    // bf16 activations, each path rounding on its own: 2% norm-wise, the budget test_training_cuda.cpp
    // allows between the CUDA and CPU backends; a wrong state carry or a missing adapter is O(1).
    const double error = testing::relative_error(recurrent, full);
    INFO("relative logit difference " << error);
    CHECK(error <= 2e-2);
  }
}
