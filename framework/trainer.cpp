#include "framework/trainer.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <cstring>
#include <fstream>
#include <optional>

#include "data/token_dataset.h"
#include "distributed/fingerprint.h"
#include "distributed/mpi_communicator.h"
#include "distributed/watchdog.h"
#include "framework/atomic_file.h"
#include "framework/bad_steps.h"
#include "framework/checkpoint.h"
#include "framework/checkpoint_manifest.h"
#include "framework/context_parallel.h"
#include "framework/cpu_backend.h"
#ifdef SSMTUNE_WITH_CUDA
#include "framework/cuda_backend.h"
#endif
#include "framework/error.h"
#include "framework/evaluation.h"
#include "framework/lora.h"
#include "framework/mamba_model.h"
#include "framework/metrics_plot.h"
#include "framework/optimizer.h"
#include "framework/progress.h"
#include "framework/stop_signals.h"
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
// refuses the same directory). Rank 0 first removes what interrupted saves left, and says what it
// removed and which newer checkpoints it passed over, and why.
std::optional<fs::path> agreed_latest_checkpoint(Communicator& host, const fs::path& output_dir) {
  std::string found;
  if (host.rank() == 0) {
    for (const std::string& name : remove_interrupted_saves(output_dir))
      fmt::print("removed {}: left by a checkpoint save or deletion that did not finish\n",
                 (output_dir / "checkpoints" / name).string());
    const CheckpointSearch search = find_latest_checkpoint(output_dir);
    for (const auto& [dir, reason] : search.skipped)
      fmt::print("skipping checkpoint {}: {}\n", dir.string(), reason);
    if (search.latest) found = search.latest->string();
  }
  uint64_t length = found.size();
  host.broadcast(&length, 1, Element::u64, 0);
  found.resize(length);
  host.broadcast(found.data(), length, Element::byte, 0);
  if (found.empty()) return std::nullopt;
  if (!fs::exists(fs::path(found) / kManifestFile))
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
  backend->set_memory_budget(static_cast<size_t>(r.memory_budget_mb * 1048576.0));
  // With shard_base_weights each rank keeps its 1/N of every layer's NF4 projections.
  const ShardIndex base_shard =
      r.distributed.shard_base_weights ? ShardIndex{group.rank(), group.size()} : ShardIndex{};
  const MambaWeights weights = MambaWeights::load(r.model_path, *backend, base_shard);
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
  // Context parallelism: `context` consecutive ranks form one data-parallel replica, each holding a
  // slice of every sequence (framework/context_parallel.h). Gradients are summed over all ranks as usual.
  const int context = r.distributed.context;
  if (group.size() % context != 0)
    fail("parallel.context={} does not divide the {} ranks of the job: start a multiple of it", context, group.size());
  const int replica = group.rank() / context, replicas = group.size() / context, slice = group.rank() % context;
  StepShape local_shape = r.step;
  local_shape.seq_len = r.step.seq_len / context;
  local_shape.context_ranks = context;
  std::optional<ProcessGroup> context_group;
  std::optional<MpiCommunicator> context_host;
  std::unique_ptr<Communicator> context_comm;
  std::optional<ContextExchange> context_exchange;
  if (context > 1) {
    context_group.emplace(group, replica);
    context_host.emplace(*context_group, watchdog);
    context_comm = make_communicator(*context_group, watchdog, *context_host, backend->stream());
    context_exchange.emplace(*backend, *context_comm,
                             ContextSliceShape{local_shape.batch, local_shape.seq_len, mc.d_inner, mc.d_state,
                                               mc.conv_kernel});
  }
  TrainStep step_runner(*backend, weights, adapters, local_shape, comm.get(),
                        context_exchange ? &*context_exchange : nullptr);
  std::optional<Validation> validation;
  if (r.eval_every > 0)
    validation.emplace(open_dataset(r.val_path), r.eval_batches, r.step, r.packing, host, context);
  DataParallelOptimizer optimizer(*backend, adapters, *comm, host, r.optimizer, r.distributed);
  SequenceSampler sampler(dataset, r.step.seq_len, r.seed, r.packing);
  const int64_t L = r.step.seq_len, B = r.step.batch, accum = r.grad_accum;
  const int64_t global_batch = B * accum * replicas;
  const std::string strategy(strategy_name(r.distributed.strategy));

  int64_t start_step = 0;
  BadSteps bad_steps(r.max_bad_steps);
  const std::optional<fs::path> latest = agreed_latest_checkpoint(host, r.output_dir);
  if (r.resume) {
    if (latest) {
      const TrainingState state = load_checkpoint(*latest, adapters);
      start_step = state.step;
      sampler.restore(state.sampler);
      bad_steps = BadSteps(r.max_bad_steps, state.bad_steps_in_a_row, state.bad_steps_total);
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
    if (weights.projections_sharded())
      fmt::print("NF4 projections sharded over {} ranks: each keeps {:.1f} MiB of every layer's {:.1f} MiB and "
                 "gathers a layer at a time into {:.1f} MiB\n",
                 group.size(), weights.nf4_layout().shard_bytes() / 1048576.0, weights.nf4_layout().bytes / 1048576.0,
                 step_runner.gathered_weight_bytes() / 1048576.0);
    fmt::print("memory plans: {:.1f} MiB on rank 0{}\n", backend->allocated_bytes() / 1048576.0,
               r.memory_budget_mb > 0 ? fmt::format(" (memory.budget_mb {})", r.memory_budget_mb) : "");
    if (group.size() > 1)
      fmt::print("{} ranks over {}: {}, {} gradient buckets of up to {} MiB, timeout {} s\n", group.size(),
                 comm->name(), strategy, optimizer.buckets().buckets().size(), r.distributed.bucket_mb,
                 r.distributed.timeout_s);
    if (context > 1)
      fmt::print("parallel.context {}: {} replicas, each sequence split into {} slices of {} tokens\n", context,
                 replicas, context, local_shape.seq_len);
  }

  const uint64_t per_rank = static_cast<uint64_t>(accum * B);  // sequences per replica and step
  std::vector<uint32_t> tokens(static_cast<size_t>(accum * B * (L + 1)));
  std::vector<uint8_t> mask(static_cast<size_t>(accum * B * L));
  std::vector<int32_t> doc_start(mask.size());
  // This rank's slices of them under context parallelism.
  const int64_t Ls = local_shape.seq_len;
  std::vector<uint32_t> slice_tokens(static_cast<size_t>(accum * B * (Ls + 1)));
  std::vector<uint8_t> slice_mask(static_cast<size_t>(accum * B * Ls));
  std::vector<int32_t> slice_doc_start(slice_mask.size());
  TrainingSummary summary;
  summary.first_step = start_step;
  std::ofstream metrics;
  if (root) metrics.open(metrics_path, std::ios::app);
  const auto run_start = std::chrono::steady_clock::now();
  double tokens_total = 0;
  std::optional<ProgressDisplay> progress;  // rank 0's
  if (root) progress.emplace(*backend, stdout_is_terminal(), start_step, r.max_steps);
  const StopSignals stop_signals;

  for (int64_t step = start_step; step < r.max_steps; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    // Each rank takes its slice of the global batch, in the same global order for any number of ranks.
    sampler.skip(per_rank * replica);
    for (uint64_t s = 0; s < per_rank; ++s) sampler.next(&tokens[s * (L + 1)], &mask[s * L], &doc_start[s * L]);
    sampler.skip(per_rank * (replicas - replica - 1));
    take_context_slice(slice, Ls, static_cast<int64_t>(per_rank), L, tokens.data(), mask.data(), doc_start.data(),
                       slice_tokens.data(), slice_mask.data(), slice_doc_start.data());
    int64_t target_tokens = 0;
    for (uint8_t m : slice_mask) target_tokens += m;
    host.all_reduce_sum(&target_tokens, 1, Element::i64);
    if (target_tokens == 0) fail("step {}: every target token of the global batch is masked out", step);
    // The gradients of the mean over the global batch's tokens, however the tokens fall on ranks.
    const double grad_scale = 1.0 / static_cast<double>(target_tokens);

    backend->fill_zero(adapters.grads(), adapters.numel() * dtype_size(adapters.dtype()));
    optimizer.start_step();
    double loss_sum = 0;
    for (int64_t micro = 0; micro < accum; ++micro) {
      // The same dropout stream as micro-batch rank * accum + micro of one process with the whole batch.
      // A replica's slices share it (their dropout masks then differ from the unsplit run's: the mask is a
      // function of the position within the slice).
      const uint64_t stream = (static_cast<uint64_t>(step) * replicas + replica) * accum + micro;
      // The last micro-batch completes each layer's gradients: its buckets go out during its backward.
      TrainStep::LayerBackwardDone on_layer_done;
      if (micro + 1 == accum) on_layer_done = [&](int64_t layer) { optimizer.layer_backward_done(layer); };
      loss_sum += step_runner.forward_backward(&slice_tokens[micro * B * (Ls + 1)], &slice_mask[micro * B * Ls],
                                               grad_scale, r.seed, stream, &slice_doc_start[micro * B * Ls],
                                               on_layer_done);
    }
    host.all_reduce_sum(&loss_sum, 1, Element::f64);
    const UpdateStats update = optimizer.update(step, std::isfinite(loss_sum));
    bad_steps.record(update.skipped);
    backend->synchronize();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double loss = loss_sum / static_cast<double>(target_tokens);
    const double step_tokens = static_cast<double>(B * L * accum * replicas);
    tokens_total += step_tokens;
    if (step == start_step) summary.first_loss = loss;
    summary.last_loss = loss;
    summary.last_step = step + 1;

    const bool logged =
        (step + 1) % r.log_every == 0 || step + 1 == r.max_steps || step == start_step || update.skipped;
    if (root) progress->step(step + 1, loss, update.lr, update.grad_norm, step_tokens, seconds, logged);
    if (root && logged) {
      nlohmann::json line = {{"step", step + 1},          {"loss", loss},
                             {"lr", update.lr},           {"grad_norm", update.grad_norm},
                             {"tokens_per_s", step_tokens / seconds}, {"target_tokens", target_tokens}};
      if (update.skipped)  // NaN and inf become null in JSON
        line.update({{"skipped", true}, {"bad_steps_in_a_row", bad_steps.in_a_row()}, {"bad_steps_total", bad_steps.total()}});
      metrics << line.dump() << "\n" << std::flush;
      if (update.skipped)
        progress->message(fmt::format("step {:>5}: update skipped: the loss or gradient norm is not finite ({} in "
                                      "a row, {} in all)",
                                      step + 1, bad_steps.in_a_row(), bad_steps.total()));
      std::fflush(stdout);
    }
    bad_steps.stop_if_diverged(step + 1, loss, update.grad_norm);
    if (validation && ((step + 1) % r.eval_every == 0 || step + 1 == r.max_steps)) {
      const ValidationResult v = validation->evaluate(step_runner);
      if (root) {
        const nlohmann::json line = {{"step", step + 1}, {"val_loss", v.loss}, {"val_perplexity", v.perplexity},
                                     {"val_tokens", v.target_tokens}};
        metrics << line.dump() << "\n" << std::flush;
        progress->message(fmt::format("step {:>5}/{}  val_loss {:.4f}  val_perplexity {:.3f}", step + 1, r.max_steps,
                                      v.loss, v.perplexity));
      }
    }
    const bool save_now = (r.save_every > 0 && (step + 1) % r.save_every == 0) || step + 1 == r.max_steps;
    const int stop_signal = stop_signals.agreed(host);  // every rank stops after the same step
    if (save_now || stop_signal != 0) {
      const TrainingState state{step + 1,      sampler.position(), r.seed,           group.size(),
                                strategy,      global_batch,       bad_steps.in_a_row(), bad_steps.total()};
      const fs::path dir = save_checkpoint(host, r.output_dir, adapters, shard, state, r.resolved_yaml, r.keep_last);
      if (root) progress->message("saved " + dir.string());
    }
    if (stop_signal != 0) {
      if (root)
        progress->message(fmt::format("stopped by signal {} ({}) after step {}; continue with train.resume=true",
                                      stop_signal, strsignal(stop_signal), step + 1));
      break;
    }
  }
  summary.tokens_per_second =
      tokens_total / std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start).count();
  summary.peak_memory_bytes = backend->peak_allocated_bytes();
  progress.reset();  // ends the live line
  if (root) {
    // The plot is a view of metrics.jsonl, which is complete: failing to draw it loses nothing.
    try {
      fmt::print("wrote {}\n", write_metrics_plot(r.output_dir).string());
    } catch (const Error& e) {
      print_warning(fmt::format("no plot: {}", e.what()), group.rank(), group.size());
    }
  }
  host.barrier();
  return summary;
}

}  // namespace ssmtune
