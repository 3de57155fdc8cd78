// Segment checkpoints (memory.checkpoint_every) on the CPU backend: a step that keeps only every k-th
// layer's input and regenerates the others in the backward, by re-running layers or by adding the kept
// layer outputs (memory.keep_layer_outputs), gives the loss and adapter gradients of the step that keeps
// them all, bit for bit: each layer runs the same ops on the same values in the same order, only more
// often. For Mamba and falcon-mamba, on packed documents (doc_start) with LoRA dropout
// (whose masks the regenerated forwards must draw again), in fp64 and fp32. The memory plan shrinks by
// exactly the residual buffers it no longer holds; bad values name the key.
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "framework/arena.h"
#include "framework/cpu_backend.h"
#include "framework/lora.h"
#include "framework/mamba_model.h"
#include "framework/model_info.h"
#include "framework/model_sizes.h"
#include "framework/recipe_config.h"
#include "framework/train_step.h"
#include "tests/catch.h"
#include "tests/framework/error_message.h"
#include "tests/framework/packing_check.h"
#include "tests/framework/scratch_dir.h"

using namespace ssmtune;

namespace {

// The demo model (or falcon-demo) with seven layers, shrunk so that its twenty steps take a moment: segments
// of 2 and 3 leave a shorter last one ([6, 7)), and 7 makes one segment of all.
MambaConfig seven_layers(const std::string& size) {
  MambaConfig c = model_size(size);
  c.n_layer = 7;
  c.d_model = 8;
  c.d_inner = 16;
  c.d_state = 4;
  c.dt_rank = 3;
  c.vocab_size = 11;
  return c;
}

struct StepOutput {
  double loss = 0;
  std::vector<double> gradients;
  std::vector<int64_t> layers_done;  // the LayerBackwardDone calls, in order
};

StepOutput train_step(DType dtype, const MambaConfig& config, const LoraConfig& lora, const std::vector<double>& params,
                      const test::DocumentBatch& batch, int64_t checkpoint_every, bool keep_layer_outputs = false) {
  const std::unique_ptr<Backend> backend = make_cpu_backend(dtype);
  const MambaWeights weights = MambaWeights::random(config, *backend, 9);
  LoraAdapters adapters(*backend, config, lora);
  adapters.upload(adapters.params(), params);
  backend->fill_zero(adapters.grads(), static_cast<size_t>(adapters.numel()) * dtype_size(adapters.dtype()));
  StepShape shape{batch.batch, batch.seq_len, 3, true, 8};
  shape.checkpoint_every = checkpoint_every;
  shape.keep_layer_outputs = keep_layer_outputs;
  TrainStep step(*backend, weights, adapters, shape);
  StepOutput out;
  out.loss = step.forward_backward(batch.tokens.data(), batch.mask.data(), 1.0, 17, 2, batch.doc_start_or_null(),
                                   [&](int64_t layer) { out.layers_done.push_back(layer); });
  out.gradients = adapters.download(adapters.grads());
  return out;
}

// Rows packing documents of 1 to 9 tokens, boundaries inside and at the edges of the 3-token scan chunks.
test::DocumentBatch packed_documents() {
  std::mt19937_64 rng(31);
  std::vector<test::Document> docs;
  for (const size_t n : {5, 1, 2, 6, 9, 4}) {
    test::Document d(n);
    for (uint32_t& token : d) token = static_cast<uint32_t>(rng() % 11);
    docs.push_back(d);
  }
  return test::DocumentBatch::make(docs, {{0, 1, 2, 3}, {4, 5}}, 13, true, 0);
}

}  // namespace

TEST_CASE("segment checkpoints give every layer's input kept bit for bit (CPU, fp64 and fp32)") {
  const test::DocumentBatch batch = packed_documents();
  REQUIRE(batch.doc_start_or_null() != nullptr);
  LoraConfig lora;
  lora.rank = 2;
  lora.alpha = 3;
  lora.dropout = 0.2;
  const std::vector<int64_t> every_layer_down{6, 5, 4, 3, 2, 1, 0};
  for (const std::string size : {"demo", "falcon-demo"}) {
    const MambaConfig config = seven_layers(size);
    const std::vector<double> params = test::random_adapter_values(config, lora, 4);
    for (const DType dtype : {DType::F64, DType::F32}) {
      const StepOutput kept = train_step(dtype, config, lora, params, batch, 1);
      CHECK(kept.layers_done == every_layer_down);
      for (const int64_t k : {2, 3, 7, 8})  // 8: more than the layers, one segment as with 7
        for (const bool keep_layer_outputs : {false, true}) {
          INFO(size << ", " << dtype_name(dtype) << ", memory.checkpoint_every=" << k << ", keep_layer_outputs "
                    << keep_layer_outputs);
          const StepOutput segmented = train_step(dtype, config, lora, params, batch, k, keep_layer_outputs);
          CHECK(segmented.loss == kept.loss);
          CHECK(segmented.gradients == kept.gradients);
          CHECK(segmented.layers_done == every_layer_down);
        }
    }
  }
}

TEST_CASE("segment checkpoints plan exactly the residual buffers they keep") {
  const std::unique_ptr<Backend> backend = make_cpu_backend(DType::F32);
  LoraConfig lora;
  lora.rank = 4;
  StepShape shape{2, 16, 8, true, 16};
  // mamba-2.8b's 64 layers: checkpoints at multiples of k below 64 and at 64, plus min(k, 64) - 1 segment
  // buffers, against the 65 of k = 1.
  const MambaConfig big = model_size("mamba-2.8b");
  REQUIRE(big.n_layer == 64);
  const size_t residual = Arena::padded(static_cast<size_t>(shape.batch * shape.seq_len * big.d_model) * 4);
  const StepPlanBytes every_layer = TrainStep::planned_bytes(*backend, big, lora, shape);
  for (const auto& [k, buffers] : std::vector<std::pair<int64_t, size_t>>{
           {2, 32 + 1 + 1}, {5, 13 + 1 + 4}, {8, 8 + 1 + 7}, {63, 2 + 1 + 62}, {64, 1 + 1 + 63}, {100, 1 + 1 + 63}}) {
    INFO("memory.checkpoint_every=" << k);
    shape.checkpoint_every = k;
    const StepPlanBytes segmented = TrainStep::planned_bytes(*backend, big, lora, shape);
    CHECK(every_layer.activations - segmented.activations == (65 - buffers) * residual);
    CHECK(segmented.workspaces == every_layer.workspaces);
    // memory.keep_layer_outputs adds a layer output (half a residual in bf16, as here in fp32: one) for
    // each residual between checkpoints below the last segment, whose own stay in place.
    shape.keep_layer_outputs = k > 1;
    if (shape.keep_layer_outputs) {
      const int64_t last_first = 63 / k * k, between = last_first - last_first / k;
      const StepPlanBytes kept = TrainStep::planned_bytes(*backend, big, lora, shape);
      CHECK(kept.activations - segmented.activations == static_cast<size_t>(between) * residual);
      CHECK(kept.workspaces == every_layer.workspaces);
    }
    shape.keep_layer_outputs = false;
  }

  // The backward's extra layer forwards: every segment below the last runs all its layers but the last.
  CHECK(TrainStep::regenerated_layer_forwards(64, 1, false) == 0);
  CHECK(TrainStep::regenerated_layer_forwards(64, 8, false) == 7 * 7);
  CHECK(TrainStep::regenerated_layer_forwards(64, 5, false) == 12 * 4);   // [0,5) ... [55,60) below [60,64)
  CHECK(TrainStep::regenerated_layer_forwards(7, 3, false) == 2 * 2);     // [0,3) [3,6) below [6,7)
  CHECK(TrainStep::regenerated_layer_forwards(7, 7, false) == 0);         // one segment, still in place
  CHECK(TrainStep::regenerated_layer_forwards(64, 8, true) == 0);         // rebuilt by additions
  const FlopsPerToken plain = flops_per_token(big, lora), segmented = flops_per_token(big, lora, 8);
  // Whole layer forwards: the forward less its LM head (the recomputation skips out_proj's output, these
  // form it).
  const double head = 2.0 * static_cast<double>(big.d_model * big.vocab_size);
  CHECK(segmented.regenerate == Approx((plain.forward - head) * 49 / 64).epsilon(1e-12));
  CHECK(segmented.step(true) == Approx(plain.step(true) + segmented.regenerate).epsilon(1e-12));
  CHECK(segmented.step(false) == plain.step(false));
  CHECK(flops_per_token(big, lora, 8, true).step(true) == plain.step(true));

  // The plan TrainStep allocates is the one planned_bytes sizes.
  const MambaConfig small = seven_layers("demo");
  const MambaWeights weights = MambaWeights::random(small, *backend, 3);
  LoraAdapters adapters(*backend, small, lora);
  shape.checkpoint_every = 3;
  for (const bool keep_layer_outputs : {false, true}) {
    shape.keep_layer_outputs = keep_layer_outputs;
    const TrainStep step(*backend, weights, adapters, shape);
    CHECK(step.activation_bytes() == TrainStep::planned_bytes(*backend, small, lora, shape).total());
  }
}

TEST_CASE("memory.checkpoint_every and memory.keep_layer_outputs: bad values name the key, and the recipe and "
          "ssmtune info take them") {
  const std::unique_ptr<Backend> backend = make_cpu_backend(DType::F32);
  const MambaConfig config = seven_layers("demo");
  const LoraConfig lora;
  auto error = [&](int64_t k, bool recompute) {
    StepShape shape{1, 8, 4, recompute, 8};
    shape.checkpoint_every = k;
    return test::error_message([&] { TrainStep::planned_bytes(*backend, config, lora, shape); });
  };
  for (const int64_t k : {0, -2}) {
    const std::string message = error(k, true);
    INFO(message);
    CHECK(test::contains(message, "memory.checkpoint_every must be positive"));
    CHECK(test::contains(message, "got " + std::to_string(k)));
  }
  const std::string message = error(2, false);
  INFO(message);
  CHECK(test::contains(message, "memory.checkpoint_every=2 needs memory.recompute=true"));
  CHECK(error(1, false).empty());
  {
    StepShape shape{1, 8, 4, true, 8};
    shape.keep_layer_outputs = true;
    const std::string keep = test::error_message([&] { TrainStep::planned_bytes(*backend, config, lora, shape); });
    INFO(keep);
    CHECK(test::contains(keep, "memory.keep_layer_outputs=true needs memory.checkpoint_every > 1"));
  }

  test::ScratchDir dir("segment-checkpoints");
  write_random_mamba(dir / "model", config, 1);
  const std::string yaml = "model:\n  path: " + (dir / "model").string() +
                           "\ndata:\n  path: d.h5\ntrain:\n  output_dir: out\ndevice: cpu\n";
  CHECK(parse_recipe(yaml, "recipe.yaml", {}).step.checkpoint_every == 1);
  const RecipeConfig recipe = parse_recipe(yaml, "recipe.yaml", {"memory.checkpoint_every=4"});
  REQUIRE(recipe.step.checkpoint_every == 4);
  // ssmtune info: the plan as the recipe sets it, and without recompute (which keeps every layer).
  const ModelInfo info = model_info(recipe, 1);
  const MambaConfig written = load_mamba_config(dir / "model" / "config.json");
  CHECK(info.memory.step.total() == TrainStep::planned_bytes(*backend, written, recipe.lora, recipe.step).total());
  StepShape without = recipe.step;
  without.recompute = false;
  without.checkpoint_every = 1;
  CHECK(info.step_other_recompute.total() == TrainStep::planned_bytes(*backend, written, recipe.lora, without).total());
  CHECK(info.flops.regenerate == flops_per_token(written, recipe.lora, 4).regenerate);
  CHECK(info.flops.regenerate > 0);
  const RecipeConfig kept =
      parse_recipe(yaml, "recipe.yaml", {"memory.checkpoint_every=4", "memory.keep_layer_outputs=true"});
  CHECK(kept.step.keep_layer_outputs);
  CHECK_FALSE(recipe.step.keep_layer_outputs);
  CHECK(model_info(kept, 1).flops.regenerate == 0);
  CHECK(model_info(kept, 1).memory.step.total() ==
        TrainStep::planned_bytes(*backend, written, kept.lora, kept.step).total());
}
