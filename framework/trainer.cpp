#include "framework/trainer.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <fstream>

#include "data/token_dataset.h"
#include "framework/atomic_file.h"
#include "framework/checkpoint.h"
#include "framework/cpu_backend.h"
#ifdef SSMTUNE_WITH_CUDA
#include "framework/cuda_backend.h"
#endif
#include "framework/error.h"
#include "framework/lora.h"
#include "framework/mamba_model.h"
#include "framework/optimizer.h"
#include "framework/train_step.h"

namespace ssmtune {
namespace {

namespace fs = std::filesystem;

// metrics.jsonl keeps the lines of steps already done when resuming, and starts empty otherwise.
void reset_metrics(const fs::path& path, int64_t keep_up_to_step) {
  std::string kept;
  if (keep_up_to_step > 0 && fs::exists(path)) {
    std::ifstream in(path);
    std::string line;
    while (std::getline(in, line)) {
      const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
      if (!j.is_discarded() && j.contains("step") && j["step"].get<int64_t>() <= keep_up_to_step) kept += line + "\n";
    }
  }
  write_file_atomically(path, std::as_bytes(std::span(kept)));
}

}  // namespace

std::unique_ptr<Backend> make_backend(const std::string& device) {
  if (device == "cpu") return make_cpu_backend(DType::F32);
#ifdef SSMTUNE_WITH_CUDA
  if (cuda_device_count() > 0) return make_cuda_backend(0);
  if (device == "cuda") fail("device=cuda: no CUDA device is visible on this machine; use device=cpu or auto");
#else
  if (device == "cuda")
    fail("device=cuda: this build of ssmtune has no CUDA backend (nvcc was not found when it was configured); "
         "use device=cpu or auto");
#endif
  return make_cpu_backend(DType::F32);
}

TrainingSummary run_training(const RecipeConfig& r, const ProcessGroup& group) {
  const bool root = group.is_root();
  std::unique_ptr<Backend> backend = make_backend(r.device);
  const MambaWeights weights = MambaWeights::load(r.model_path, *backend);
  const MambaConfig& mc = weights.config();
  const TokenDataset dataset = TokenDataset::open(r.data_path.string());
  if (dataset.info().vocab_size > mc.vocab_size)
    fail("{}: the dataset's vocab_size {} exceeds the model's vocab_size {} ({})", r.data_path.string(),
         dataset.info().vocab_size, mc.vocab_size, (r.model_path / "config.json").string());

  LoraAdapters adapters(*backend, mc, r.lora);
  adapters.initialize(r.seed);
  TrainStep step_runner(*backend, weights, adapters, r.step);
  SequenceSampler sampler(dataset, r.step.seq_len, r.seed);

  int64_t start_step = 0;
  if (r.resume) {
    if (auto dir = latest_checkpoint(r.output_dir)) {
      const TrainingState state = load_checkpoint(*dir, adapters);
      if (state.world_size != group.size())
        fail("{}: written by {} ranks, resuming with {} is not supported yet", dir->string(), state.world_size,
             group.size());
      start_step = state.step;
      sampler.restore(state.sampler);
      if (root) fmt::print("resuming from {} (step {})\n", dir->string(), start_step);
    } else if (root) {
      fmt::print("train.resume: no complete checkpoint under {}; starting from step 0\n", r.output_dir.string());
    }
  } else if (latest_checkpoint(r.output_dir)) {
    fail("{} already holds checkpoints: set train.resume=true to continue, or choose another train.output_dir",
         r.output_dir.string());
  }
  const fs::path metrics_path = r.output_dir / "metrics.jsonl";
  if (root) {
    fs::create_directories(r.output_dir);
    reset_metrics(metrics_path, start_step);
    fmt::print("{} backend, {} layers, d_model {}, vocab {}; NF4 base {:.1f} MiB, adapters {} params, "
               "activations {:.1f} MiB; {} x {} tokens x {} micro-batches x {} ranks per step\n",
               backend->name(), mc.n_layer, mc.d_model, mc.vocab_size, weights.bytes() / 1048576.0, adapters.numel(),
               step_runner.activation_bytes() / 1048576.0, r.step.batch, r.step.seq_len, r.grad_accum, group.size());
  }

  const int64_t L = r.step.seq_len, B = r.step.batch, accum = r.grad_accum;
  const uint64_t per_rank = static_cast<uint64_t>(accum * B);
  std::vector<uint32_t> tokens(static_cast<size_t>(accum * B * (L + 1)));
  std::vector<uint8_t> mask(static_cast<size_t>(accum * B * L));
  TrainingSummary summary;
  summary.first_step = start_step;
  std::ofstream metrics;
  if (root) metrics.open(metrics_path, std::ios::app);
  const auto run_start = std::chrono::steady_clock::now();
  double tokens_total = 0;

  for (int64_t step = start_step; step < r.max_steps; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    // Each rank takes its slice of the global batch, in the same global order for any number of ranks.
    sampler.skip(per_rank * group.rank());
    for (uint64_t s = 0; s < per_rank; ++s) sampler.next(&tokens[s * (L + 1)], &mask[s * L]);
    sampler.skip(per_rank * (group.size() - group.rank() - 1));
    int64_t counts[1] = {0};
    for (uint8_t m : mask) counts[0] += m;
    group.all_reduce_sum(counts, 1);
    if (counts[0] == 0) fail("step {}: every target token of the global batch is masked out", step);
    const double grad_scale = 1.0 / static_cast<double>(counts[0]);

    backend->fill_zero(adapters.grads(), adapters.numel() * dtype_size(adapters.dtype()));
    double loss_sum[1] = {0};
    for (int64_t micro = 0; micro < accum; ++micro) {
      const uint64_t stream = (static_cast<uint64_t>(step) * group.size() + group.rank()) * accum + micro;
      loss_sum[0] += step_runner.forward_backward(&tokens[micro * B * (L + 1)], &mask[micro * B * L], grad_scale,
                                                  r.seed, stream);
    }
    if (group.size() > 1) {
      std::vector<double> grads = adapters.download(adapters.grads());
      group.all_reduce_sum(grads.data(), grads.size());
      adapters.upload(adapters.grads(), grads);
      group.all_reduce_sum(loss_sum, 1);
    }
    const UpdateStats update = apply_update(*backend, adapters, r.optimizer, step);
    backend->synchronize();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double loss = loss_sum[0] / static_cast<double>(counts[0]);
    const double step_tokens = static_cast<double>(B * L * accum * group.size());
    tokens_total += step_tokens;
    if (step == start_step) summary.first_loss = loss;
    summary.last_loss = loss;
    summary.last_step = step + 1;

    if (root && ((step + 1) % r.log_every == 0 || step + 1 == r.max_steps || step == start_step)) {
      const nlohmann::json line = {{"step", step + 1},          {"loss", loss},
                                   {"lr", update.lr},           {"grad_norm", update.grad_norm},
                                   {"tokens_per_s", step_tokens / seconds}, {"target_tokens", counts[0]}};
      metrics << line.dump() << "\n" << std::flush;
      fmt::print("step {:>5}/{}  loss {:.4f}  lr {:.2e}  grad_norm {:.3f}  {:.0f} tokens/s\n", step + 1, r.max_steps,
                 loss, update.lr, update.grad_norm, step_tokens / seconds);
      std::fflush(stdout);
    }
    const bool save_now = (r.save_every > 0 && (step + 1) % r.save_every == 0) || step + 1 == r.max_steps;
    if (save_now && root) {
      const TrainingState state{step + 1, sampler.position(), r.seed, group.size()};
      const fs::path dir = save_checkpoint(r.output_dir, adapters, state, r.resolved_yaml);
      fmt::print("saved {}\n", dir.string());
    }
  }
  summary.tokens_per_second =
      tokens_total / std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start).count();
  group.barrier();
  return summary;
}

}  // namespace ssmtune
