#include "recipes/info_command.h"

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <cmath>

#include "framework/mamba_model.h"
#include "framework/progress.h"

namespace ssmtune {
namespace {

// 1234567 -> "1,234,567"
std::string grouped(int64_t n) {
  std::string digits = std::to_string(n < 0 ? -n : n), out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return n < 0 ? "-" + out : out;
}

// 3.2e9 -> "3.20 GFLOP"
std::string flops_text(double flops) {
  static constexpr const char* kPrefixes[] = {"", "K", "M", "G", "T", "P", "E"};
  int i = 0;
  while (std::abs(flops) >= 1000 && i < 6) flops /= 1000, ++i;
  return fmt::format("{:.2f} {}FLOP", flops, kPrefixes[i]);
}

std::string targets_text(const LoraConfig& lora) {
  std::vector<std::string> names;
  for (Projection p : lora.targets) names.emplace_back(projection_name(p));
  return fmt::format("{}", fmt::join(names, ", "));
}

}  // namespace

void add_info_options(CLI::App& command, InfoOptions& options) {
  command.add_option("--config", options.config, "recipe YAML file")->required();
  command.add_option("--ranks", options.ranks, "ranks (GPUs) the job will run on, as mpirun -np (default 1)")
      ->check(CLI::PositiveNumber);
  command.add_option("overrides", options.overrides, "dotted.key=value overrides of recipe keys");
}

std::string format_model_info(const ModelInfo& info, const RecipeConfig& r) {
  const MambaConfig& c = info.model;
  const ParameterCounts& p = info.params;
  const MemoryEstimate& m = info.memory;
  std::string out;
  auto line = [&out](const std::string& text) { out += text + "\n"; };
  auto row = [&line](const std::string& label, const std::string& value, const std::string& note = "") {
    line(fmt::format("  {:<46} {:>12}{}", label, value, note.empty() ? "" : "   " + note));
  };

  line(fmt::format("model {}: {}, {} layers, d_model {}, d_inner {}, d_state {}, dt_rank {}, conv {}, vocab {}, {}",
                   (r.model_path / "config.json").string(), c.model_type, c.n_layer, c.d_model, c.d_inner, c.d_state,
                   c.dt_rank, c.conv_kernel, c.vocab_size, info.tied_lm_head ? "LM head tied to the embedding" : "own LM head"));
  line(fmt::format("backend {}: activations and frozen embedding {}, residual stream, adapters and optimizer {}",
                   info.backend, dtype_name(info.act_dtype), dtype_name(info.master_dtype)));
  if (!info.assumption.empty()) line(info.assumption);

  line("\nparameters");
  row("base model (frozen)", grouped(p.base));
  row("  NF4: in_proj, x_proj, dt_proj, out_proj", grouped(p.nf4));
  row("  other: embedding, norms, conv, dt bias, A, D", grouped(p.dense));
  row("LoRA adapters (trainable)", grouped(p.trainable),
      fmt::format("rank {} on {}; {:.3f}% of the base", r.lora.rank, targets_text(r.lora),
                  100.0 * static_cast<double>(p.trainable) / static_cast<double>(p.base)));

  const std::string strategy(strategy_name(r.distributed.strategy));
  line(fmt::format("\nmemory per GPU (rank 0 of {}, {}); micro-batch {} x {} tokens, memory.recompute {}{}",
                   info.ranks, strategy, r.step.batch, r.step.seq_len, r.step.recompute ? "true" : "false",
                   r.step.checkpoint_every > 1 ? fmt::format(", memory.checkpoint_every {}{}", r.step.checkpoint_every,
                                                             r.step.keep_layer_outputs ? " keeping layer outputs" : "")
                                               : ""));
  row("NF4 weights + quantization state", format_bytes(m.nf4_weights),
      m.gathered_weights > 0 ? fmt::format("1/{} of each layer (distributed.shard_base_weights)", info.ranks) : "");
  if (m.gathered_weights > 0) row("two gathered layers", format_bytes(m.gathered_weights));
  row("other frozen weights", format_bytes(m.dense_weights));
  row("adapters + gradients", format_bytes(m.adapters),
      info.act_dtype != info.master_dtype ? fmt::format("with a {} copy of the adapters for the GEMMs", dtype_name(info.act_dtype))
                                          : "");
  row("AdamW moments", format_bytes(m.adam_moments),
      info.ranks > 1 && r.distributed.strategy != ShardingStrategy::ddp ? fmt::format("1/{} of them ({})", info.ranks, strategy)
                                                                         : "all of them");
  row("activations", format_bytes(m.step.activations), "one micro-batch; grad_accum adds none");
  row("workspaces (GEMM, scan, LM head)", format_bytes(m.step.workspaces));
  row("total", format_bytes(m.total()));
  const size_t other_total = m.total() - m.step.total() + info.step_other_recompute.total();
  line(fmt::format("  with memory.recompute={}: activations {}, total {}", r.step.recompute ? "false" : "true",
                   format_bytes(info.step_other_recompute.activations), format_bytes(other_total)));
  if (info.backend == "cuda")
    line("  not counted: the CUDA context (about 0.5 GiB), cuBLASLt's 32 MiB workspace, NCCL's buffers");

  const FlopsPerToken& f = info.flops;
  const int64_t tokens_per_step = r.step.batch * r.step.seq_len * r.grad_accum * info.ranks;
  line("\nFLOPs per token (a multiply-add is 2)");
  row("forward", flops_text(f.forward));
  row("backward", flops_text(f.backward));
  row("recompute (memory.recompute=true)", flops_text(f.recompute));
  if (f.regenerate > 0)
    row(fmt::format("regenerate (memory.checkpoint_every={})", r.step.checkpoint_every), flops_text(f.regenerate));
  row("training step", flops_text(f.step(r.step.recompute)),
      fmt::format("{} per step of {} tokens", flops_text(f.step(r.step.recompute) * static_cast<double>(tokens_per_step)),
                  grouped(tokens_per_step)));
  return out;
}

void run_info(const InfoOptions& options) {
  const RecipeConfig recipe = load_recipe(options.config, options.overrides);
  fmt::print("{}", format_model_info(model_info(recipe, options.ranks), recipe));
}

}  // namespace ssmtune
