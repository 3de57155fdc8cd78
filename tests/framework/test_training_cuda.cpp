// The CUDA backend against the CPU backend on the whole model: one step's loss, adapter gradients and
// logits (for Mamba and for falcon-mamba, whose mixer norm runs as its own kernel), twenty steps of
// training, and the train recipe on the GPU. The CPU backend computes in fp32
// throughout; the CUDA backend keeps activations in bf16 (8 significant bits, relative rounding
// 2^-9 = 2e-3 per value), so the two agree to bf16 accuracy accumulated over two layers, not bit for bit.
#include <cmath>
#include <random>

#include "data/demo_dataset.h"
#include "distributed/process_group.h"
#include "framework/cpu_backend.h"
#include "framework/cuda_backend.h"
#include "framework/lora.h"
#include "framework/mamba_model.h"
#include "framework/model_sizes.h"
#include "framework/optimizer.h"
#include "framework/recipe_config.h"
#include "framework/train_step.h"
#include "framework/trainer.h"
#include "tests/catch.h"
#include "tests/framework/scratch_dir.h"

using namespace ssmtune;
namespace fs = std::filesystem;

namespace {

struct Side {
  std::unique_ptr<Backend> backend;
  MambaWeights weights;
  LoraAdapters adapters;
  TrainStep step;
  Side(std::unique_ptr<Backend> b, const fs::path& model, const LoraConfig& lora, const StepShape& shape)
      : backend(std::move(b)),
        weights(MambaWeights::load(model, *backend)),
        adapters(*backend, weights.config(), lora),
        step(*backend, weights, adapters, shape) {}
};

struct Batch {
  std::vector<uint32_t> tokens;
  std::vector<uint8_t> mask;
};

std::vector<Batch> demo_batches(const TokenDataset& data, const StepShape& shape, int count, uint64_t seed) {
  SequenceSampler sampler(data, shape.seq_len, seed);
  std::vector<Batch> batches(static_cast<size_t>(count));
  for (Batch& b : batches) {
    b.tokens.resize(static_cast<size_t>(shape.batch * (shape.seq_len + 1)));
    b.mask.resize(static_cast<size_t>(shape.batch * shape.seq_len));
    for (int64_t s = 0; s < shape.batch; ++s) sampler.next(&b.tokens[s * (shape.seq_len + 1)], &b.mask[s * shape.seq_len]);
  }
  return batches;
}

double relative_difference(const std::vector<double>& a, const std::vector<double>& b) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    diff += (a[i] - b[i]) * (a[i] - b[i]);
    norm += b[i] * b[i];
  }
  return std::sqrt(diff / norm);
}

// A random model of `size` (model_sizes.h; both tiny ones share the demo vocabulary) and demo data in a
// scratch directory.
TokenDataset write_demo_files(const test::ScratchDir& dir, const std::string& size) {
  write_random_mamba(dir / "model", model_size(size), 1);
  write_token_dataset((dir / "data.h5").string(), make_demo_dataset(3, 400));
  return TokenDataset::open((dir / "data.h5").string());
}

struct Fixture {
  explicit Fixture(const std::string& size = "demo") : data(write_demo_files(dir, size)) {}
  test::ScratchDir dir{"training-cuda"};
  TokenDataset data;
};

// One step with dropout from the same non-zero adapters on both backends: loss and adapter gradients;
// then forward_logits on the same inputs.
void check_one_step(const std::string& size) {
  Fixture f(size);
  LoraConfig lora;
  lora.dropout = 0.1;  // the same counter-RNG mask on both backends
  // Odd lengths and a chunk that does not divide them; recomputation on.
  const StepShape shape{3, 77, 16, true, 50};
  Side cpu(make_cpu_backend(DType::F32), f.dir / "model", lora, shape);
  Side gpu(make_cuda_backend(), f.dir / "model", lora, shape);
  // Non-zero B so that every adapter gradient is non-zero (PEFT starts B at 0).
  std::mt19937_64 rng(std::random_device{}());
  std::normal_distribution<double> normal(0.0, 0.05);
  std::vector<double> params(static_cast<size_t>(cpu.adapters.numel()));
  for (double& p : params) p = normal(rng);
  for (Side* s : {&cpu, &gpu}) {
    s->adapters.upload(s->adapters.params(), params);
    s->backend->fill_zero(s->adapters.grads(), s->adapters.numel() * sizeof(float));
  }
  const Batch b = demo_batches(f.data, shape, 1, 5)[0];
  const double cpu_loss = cpu.step.forward_backward(b.tokens.data(), b.mask.data(), 1e-3, 7, 11);
  const double gpu_loss = gpu.step.forward_backward(b.tokens.data(), b.mask.data(), 1e-3, 7, 11);
  // Loss: a sum over ~230 tokens of ~4-6 nats, each from bf16 hidden states: 0.5% is ~3x the rounding.
  CHECK(std::abs(gpu_loss - cpu_loss) <= 5e-3 * std::abs(cpu_loss));
  // Gradients pass through every bf16 activation of the backward as well: 3% relative (measured ~1%).
  const double grad_error = relative_difference(gpu.adapters.download(gpu.adapters.grads()),
                                                cpu.adapters.download(cpu.adapters.grads()));
  INFO("relative gradient difference " << grad_error);
  CHECK(grad_error <= 3e-2);

  std::vector<uint32_t> inputs;
  for (int64_t s = 0; s < shape.batch; ++s)
    for (int64_t t = 0; t < shape.seq_len; ++t) inputs.push_back(b.tokens[s * (shape.seq_len + 1) + t]);
  // Logits of ~O(1) from bf16 final hidden states and a bf16 LM head (2^-9 relative each) after two layers
  // of bf16 activations: 2% norm-wise, the gradients' budget less the backward's share.
  const double logit_error =
      relative_difference(gpu.step.forward_logits(inputs.data()), cpu.step.forward_logits(inputs.data()));
  INFO("relative logit difference " << logit_error);
  CHECK(logit_error <= 2e-2);
}

}  // namespace

TEST_CASE("one step on the GPU gives the CPU backend's loss, adapter gradients and logits") {
  check_one_step("demo");
}

TEST_CASE("one falcon-mamba step on the GPU gives the CPU backend's loss, adapter gradients and logits") {
  check_one_step("falcon-demo");
}

TEST_CASE("twenty training steps on the GPU track the CPU backend's losses") {
  Fixture f;
  LoraConfig lora;
  lora.dropout = 0.05;
  const StepShape shape{8, 128, 64, false, 256};
  Side cpu(make_cpu_backend(DType::F32), f.dir / "model", lora, shape);
  Side gpu(make_cuda_backend(), f.dir / "model", lora, shape);
  cpu.adapters.initialize(0);
  gpu.adapters.initialize(0);
  OptimizerConfig opt;
  opt.lr = 3e-3;
  opt.warmup_steps = 5;
  opt.total_steps = 20;
  const std::vector<Batch> batches = demo_batches(f.data, shape, 20, 9);
  std::vector<double> cpu_losses, gpu_losses;
  for (int step = 0; step < 20; ++step) {
    for (Side* s : {&cpu, &gpu}) {
      s->backend->fill_zero(s->adapters.grads(), s->adapters.numel() * sizeof(float));
      int64_t targets = 0;
      for (uint8_t m : batches[step].mask) targets += m;
      const double loss = s->step.forward_backward(batches[step].tokens.data(), batches[step].mask.data(),
                                                   1.0 / targets, 0, step) / targets;
      apply_update(*s->backend, s->adapters, opt, step);
      (s == &cpu ? cpu_losses : gpu_losses).push_back(loss);
    }
  }
  for (int step = 0; step < 20; ++step) {
    INFO("step " << step << ": cpu " << cpu_losses[step] << ", gpu " << gpu_losses[step]);
    // Mean token loss from bf16 activations, after up to 20 AdamW updates computed from bf16-accurate
    // gradients: 1% relative leaves room for that drift and still catches any wrong op.
    CHECK(std::abs(gpu_losses[step] - cpu_losses[step]) <= 1e-2 * cpu_losses[step]);
  }
  CHECK(gpu_losses.back() < gpu_losses.front() - 0.5);
}

TEST_CASE("the demo recipe trains on the GPU with device=cuda") {
  Fixture f;
  static ProcessGroup group(nullptr, nullptr);
  const RecipeConfig recipe = load_recipe(
      fs::path(SSMTUNE_SOURCE_DIR) / "recipes/configs/demo.yaml",
      {"device=cuda", "model.path=" + (f.dir / "model").string(), "data.path=" + (f.dir / "data.h5").string(),
       "train.output_dir=" + (f.dir / "out").string(), "train.max_steps=60", "train.log_every=20"});
  const TrainingSummary s = run_training(recipe, group);
  CHECK(s.first_loss > 5.5);
  CHECK(s.last_loss < s.first_loss - 1.5);
}
