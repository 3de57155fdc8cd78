#include "framework/trainer.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <fstream>
#include <optional>

#include "data/token_dataset.h"
#include "distributed/fingerprint.h"
#include "distributed/mpi_communicator.h"
#include "distributed/watchdog.h"
#include "framework/atomic_file.h"
#include "framework/checkpoint.h"
#include "framework/cpu_backend.h"
#ifdef SSMTUNE_WITH_CUDA
#include "framework/cuda_backend.h"
#endif
#include "framework/error.h"
#include "framework/evaluation.h"
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

// The newest complete checkpoint as rank 0 sees it, so that every rank resumes from the same one (or
// refuses the same directory).
std::optional<fs::path> agreed_latest_checkpoint(Communicator& host, const fs::path& output_dir) {
  std::string found;
  if (host.rank() == 0)
    if (std::optional<fs::path> dir = latest_checkpoint(output_dir)) found = dir->string();
  uint64_t length = found.size();
  host.broadcast(&length, 1, Element::u64, 0);
  found.resize(length);
  host.broadcast(found.data(), length, Element::byte, 0);
  if (found.empty()) return std::nullopt;
  if (!fs::exists(fs::path(found) / kStateFile))
    fail("{}: rank {} cannot see the checkpoint rank 0 found: train.output_dir must be on a filesystem that "
         "every host of the job shares",
         found, host.rank());
  return fs::path(found);
}

}  // namespace

std::unique_ptr<Backend> make_backend(const std::string& device, int local_rank) {
  if (device == "cpu") return make_cpu_backend(DType::F32);
#ifdef SSMTUNE_WITH_CUDA
  if (const int devices = cuda_device_count(); devices > 0) {
    if (devices == 1) return make_cuda_backend(0);
    if (local_rank >= devices)
      fail("local rank {} on this host has no GPU of its own: {} are visible; start one rank per GPU "
           "(mpirun -np <GPUs>, or --map-by ppr:<GPUs per host>:node across hosts)",
           local_rank, devices);
    return make_cuda_backend(local_rank);
  }
  if (device == "cuda") fail("device=cuda: no CUDA device is visible on this machine; use device=cpu or auto");
#else
  (void)local_rank;
  if (device == "cuda")
    fail("device=cuda: this build of ssmtune has no CUDA backend (nvcc was not found when it was configured); "
         "use device=cpu or auto");
#endif
  return make_cpu_backend(DType::F32);
}

TrainingSummary run_training(const RecipeConfig& r, const ProcessGroup& group) {
  const bool root = group.is_root();
  Watchdog watchdog(group, r.distributed.timeout_s);
  MpiCommunicator host(group, watchdog);
  require_same_on_all_ranks(host, {{"recipe (the resolved YAML after overrides)", r.resolved_yaml,
                                    "start every rank with the same --config file and the same overrides"}});
  std::unique_ptr<Backend> backend = make_backend(r.device, group.local_rank());
  const MambaWeights weights = MambaWeights::load(r.model_path, *backend);
  const MambaConfig& mc = weights.config();
  require_same_on_all_ranks(host, {{"model (its config.json)", mamba_config_to_json(mc).dump(),
                                    fmt::format("every host must see the same model at {}", r.model_path.string())}});
  auto open_dataset = [&](const fs::path& path) {
    TokenDataset dataset = TokenDataset::open(path.string());
    if (dataset.info().vocab_size > mc.vocab_size)
      fail("{}: the dataset's vocab_size {} exceeds the model's vocab_size {} ({})", path.string(),
           dataset.info().vocab_size, mc.vocab_size, (r.model_path / "config.json").string());
    return dataset;
  };
  const TokenDataset dataset = open_dataset(r.data_path);

  const std::unique_ptr<Communicator> comm = make_communicator(group, watchdog, host, backend->stream());
  const ShardIndex shard = optimizer_shard(r.distributed.strategy, group.rank(), group.size());
  LoraAdapters adapters(*backend, mc, r.lora, shard);
  adapters.initialize(r.seed);
  TrainStep step_runner(*backend, weights, adapters, r.step);
  std::optional<Validation> validation;
  if (r.eval_every > 0) validation.emplace(open_dataset(r.val_path), r.eval_batches, r.step, host);
  DataParallelOptimizer optimizer(*backend, adapters, *comm, host, r.optimizer, r.distributed);
  SequenceSampler sampler(dataset, r.step.seq_len, r.seed);
  const int64_t L = r.step.seq_len, B = r.step.batch, accum = r.grad_accum;
  const int64_t global_batch = B * accum * group.size();
  const std::string strategy(strategy_name(r.distributed.strategy));

  int64_t start_step = 0;
  const std::optional<fs::path> latest = agreed_latest_checkpoint(host, r.output_dir);
  if (r.resume) {
    if (latest) {
      const TrainingState state = load_checkpoint(*latest, adapters);
      start_step = state.step;
      sampler.restore(state.sampler);
      if (root) {
        fmt::print("resuming from {} (step {})\n", latest->string(), start_step);
        if (state.world_size != group.size() || state.strategy != strategy)
          fmt::print("note: written by {} ranks with {}, resumed by {} with {}: the optimizer state is resharded\n",
                     state.world_size, state.strategy, group.size(), strategy);
        if (state.global_batch != global_batch)
          fmt::print("note: the global batch was {} sequences per step and is now {}\n", state.global_batch,
                     global_batch);
      }
    } else if (root) {
      fmt::print("train.resume: no complete checkpoint under {}; starting from step 0\n", r.output_dir.string());
    }
  } else if (latest) {
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
               step_runner.activation_bytes() / 1048576.0, B, L, accum, group.size());
    if (group.size() > 1)
      fmt::print("{} ranks over {}: {}, {} gradient buckets of up to {} MiB, timeout {} s\n", group.size(),
                 comm->name(), strategy, optimizer.buckets().buckets().size(), r.distributed.bucket_mb,
                 r.distributed.timeout_s);
  }

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
    int64_t target_tokens = 0;
    for (uint8_t m : mask) target_tokens += m;
    host.all_reduce_sum(&target_tokens, 1, Element::i64);
    if (target_tokens == 0) fail("step {}: every target token of the global batch is masked out", step);
    // The gradients of the mean over the global batch's tokens, however the tokens fall on ranks.
    const double grad_scale = 1.0 / static_cast<double>(target_tokens);

    backend->fill_zero(adapters.grads(), adapters.numel() * dtype_size(adapters.dtype()));
    optimizer.start_step();
    double loss_sum = 0;
    for (int64_t micro = 0; micro < accum; ++micro) {
      // The same dropout stream as micro-batch rank * accum + micro of one process with the whole batch.
      const uint64_t stream = (static_cast<uint64_t>(step) * group.size() + group.rank()) * accum + micro;
      // The last micro-batch completes each layer's gradients: its buckets go out during its backward.
      TrainStep::LayerBackwardDone on_layer_done;
      if (micro + 1 == accum) on_layer_done = [&](int64_t layer) { optimizer.layer_backward_done(layer); };
      loss_sum += step_runner.forward_backward(&tokens[micro * B * (L + 1)], &mask[micro * B * L], grad_scale,
                                               r.seed, stream, on_layer_done);
    }
    host.all_reduce_sum(&loss_sum, 1, Element::f64);
    const UpdateStats update = optimizer.update(step);
    backend->synchronize();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double loss = loss_sum / static_cast<double>(target_tokens);
    const double step_tokens = static_cast<double>(B * L * accum * group.size());
    tokens_total += step_tokens;
    if (step == start_step) summary.first_loss = loss;
    summary.last_loss = loss;
    summary.last_step = step + 1;

    if (root && ((step + 1) % r.log_every == 0 || step + 1 == r.max_steps || step == start_step)) {
      const nlohmann::json line = {{"step", step + 1},          {"loss", loss},
                                   {"lr", update.lr},           {"grad_norm", update.grad_norm},
                                   {"tokens_per_s", step_tokens / seconds}, {"target_tokens", target_tokens}};
      metrics << line.dump() << "\n" << std::flush;
      fmt::print("step {:>5}/{}  loss {:.4f}  lr {:.2e}  grad_norm {:.3f}  {:.0f} tokens/s\n", step + 1, r.max_steps,
                 loss, update.lr, update.grad_norm, step_tokens / seconds);
      std::fflush(stdout);
    }
    if (validation && ((step + 1) % r.eval_every == 0 || step + 1 == r.max_steps)) {
      const ValidationResult v = validation->evaluate(step_runner);
      if (root) {
        const nlohmann::json line = {{"step", step + 1}, {"val_loss", v.loss}, {"val_perplexity", v.perplexity},
                                     {"val_tokens", v.target_tokens}};
        metrics << line.dump() << "\n" << std::flush;
        fmt::print("step {:>5}/{}  val_loss {:.4f}  val_perplexity {:.3f}\n", step + 1, r.max_steps, v.loss,
                   v.perplexity);
        std::fflush(stdout);
      }
    }
    const bool save_now = (r.save_every > 0 && (step + 1) % r.save_every == 0) || step + 1 == r.max_steps;
    if (save_now) {
      const TrainingState state{step + 1, sampler.position(), r.seed, group.size(), strategy, global_batch};
      const fs::path dir = save_checkpoint(host, r.output_dir, adapters, shard, state, r.resolved_yaml);
      if (root) fmt::print("saved {}\n", dir.string());
    }
  }
  summary.tokens_per_second =
      tokens_total / std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start).count();
  host.barrier();
  return summary;
}

}  // namespace ssmtune
