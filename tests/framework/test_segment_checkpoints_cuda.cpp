// Segment checkpoints (memory.checkpoint_every) on the GPU: the CUDA backend's step that regenerates the
// layer inputs between checkpoints, by re-running layers or from the kept layer outputs
// (memory.keep_layer_outputs), gives the loss and adapter gradients of the step that keeps them all,
// bit for bit. Every kernel of the step is deterministic (no atomics; cuBLASLt picks the same algorithm
// for the same shapes), and each layer runs the same ops on the same values, only more often; a
// regenerated residual that differed in one bit would show in the gradients.
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "framework/cuda_backend.h"
#include "framework/lora.h"
#include "framework/mamba_model.h"
#include "framework/model_sizes.h"
#include "framework/train_step.h"
#include "tests/catch.h"
#include "tests/framework/packing_check.h"

using namespace ssmtune;

namespace {

struct StepOutput {
  double loss = 0;
  std::vector<double> gradients;
};

StepOutput train_step(const MambaConfig& config, const LoraConfig& lora, const std::vector<double>& params,
                      const test::DocumentBatch& batch, int64_t checkpoint_every, bool keep_layer_outputs) {
  const std::unique_ptr<Backend> backend = make_cuda_backend();
  const MambaWeights weights = MambaWeights::random(config, *backend, 9);
  LoraAdapters adapters(*backend, config, lora);
  adapters.upload(adapters.params(), params);
  backend->fill_zero(adapters.grads(), static_cast<size_t>(adapters.numel()) * dtype_size(adapters.dtype()));
  StepShape shape{batch.batch, batch.seq_len, 64, true, 100};
  shape.checkpoint_every = checkpoint_every;
  shape.keep_layer_outputs = keep_layer_outputs;
  TrainStep step(*backend, weights, adapters, shape);
  StepOutput out;
  out.loss = step.forward_backward(batch.tokens.data(), batch.mask.data(), 1e-3, 17, 2, batch.doc_start_or_null());
  out.gradients = adapters.download(adapters.grads());
  return out;
}

}  // namespace

TEST_CASE("segment checkpoints on the GPU give every layer's input kept bit for bit") {
  // Two rows of 255 tokens packing documents of 20 to 120 tokens.
  std::mt19937_64 rng(5);
  std::vector<test::Document> docs;
  std::vector<std::vector<size_t>> rows(2);
  for (auto& row : rows)
    for (size_t used = 0;;) {
      const size_t n = 20 + rng() % 101;
      if (used + n > 256) break;
      test::Document d(n);
      for (uint32_t& token : d) token = static_cast<uint32_t>(rng() % 64);
      row.push_back(docs.size());
      docs.push_back(d);
      used += n;
    }
  const test::DocumentBatch batch = test::DocumentBatch::make(docs, rows, 255, true, 0);
  LoraConfig lora;
  lora.rank = 8;
  lora.alpha = 16;
  lora.dropout = 0.1;  // the regenerated forwards draw the same masks again
  for (const std::string size : {"demo", "falcon-demo"}) {
    MambaConfig config = model_size(size);
    config.n_layer = 8;
    const std::vector<double> params = test::random_adapter_values(config, lora, 4);
    const StepOutput kept = train_step(config, lora, params, batch, 1, false);
    for (const int64_t k : {3, 4})  // segments [0,3) [3,6) [6,8), and two of four
      for (const bool keep_layer_outputs : {false, true}) {
        INFO(size << ", memory.checkpoint_every=" << k << ", keep_layer_outputs " << keep_layer_outputs);
        const StepOutput segmented = train_step(config, lora, params, batch, k, keep_layer_outputs);
        CHECK(segmented.loss == kept.loss);
        CHECK(segmented.gradients == kept.gradients);
      }
  }
}
