#include "recipes/bench/report.h"

#include <fmt/format.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "framework/error.h"
#include "recipes/bench/peers.h"

namespace ssmtune::bench {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

std::string or_dash(bool present, const std::string& text) { return present ? text : "-"; }

// One line, however long the message: the table is read from the tail of the output.
std::string first_line(const std::string& text, size_t width) {
  std::string line = text.substr(0, text.find('\n'));
  return line.size() > width ? line.substr(0, width - 3) + "..." : line;
}

template <typename T>
nlohmann::json optional_json(const std::optional<T>& value) {
  return value ? nlohmann::json(*value) : nlohmann::json(nullptr);
}

// The GEMM rate MFU is judged against: this run's ceiling, or REFERENCE.md's where it was not measured.
double mfu_ceiling(const Ceilings& c) {
  return c.gemm_flops_per_second() > 0 ? c.gemm_flops_per_second() : peers::kGemmFlopsPerSecond;
}

}  // namespace

double KernelResult::fraction_of_ceiling(const Ceilings& c) const {
  const double ceiling = bound == Bound::bytes ? c.copy_bytes_per_second() : c.gemm_flops_per_second();
  return ceiling > 0 ? rate() / ceiling : 0;
}

void print_kernel_table(const Ceilings& c, const std::vector<KernelResult>& kernels) {
  fmt::print("\n{:<32} {:>14} {:>14} {:>8}\n", "ceiling (this run)", "measured", "REFERENCE.md", "ratio");
  const double copy = c.copy_bytes_per_second(), gemm = c.gemm_flops_per_second();
  fmt::print("{:<32} {:>14} {:>14} {:>8}\n", "d2d copy 1 GiB (read+write)",
             or_dash(copy > 0, fmt::format("{:.2f} TB/s", copy * 1e-12)),
             fmt::format("{:.2f} TB/s", peers::kCopyBytesPerSecond * 1e-12),
             or_dash(copy > 0, fmt::format("{:.2f}", copy / peers::kCopyBytesPerSecond)));
  fmt::print("{:<32} {:>14} {:>14} {:>8}\n", "bf16 GEMM 8192^3 (cuda::Gemm)",
             or_dash(gemm > 0, fmt::format("{:.0f} TFLOP/s", gemm * 1e-12)),
             fmt::format("{:.0f} TFLOP/s", peers::kGemmFlopsPerSecond * 1e-12),
             or_dash(gemm > 0, fmt::format("{:.2f}", gemm / peers::kGemmFlopsPerSecond)));
  if (!c.error.empty()) fmt::print("ceiling errors: {}\n", first_line(c.error, 100));

  fmt::print("\n{:<26} {:<24} {:>9} {:>12} {:>13} {:>6} {:>8} {:>9}\n", "kernel", "shape", "median_us",
             "amount", "rate", "%ceil", "peer_us", "peer/ours");
  for (const KernelResult& k : kernels) {
    if (!k.error.empty()) {
      fmt::print("{:<26} {:<24} FAILED: {}\n", k.name, k.shape, first_line(k.error, 70));
      continue;
    }
    const bool bytes = k.bound == Bound::bytes;
    const double fraction = k.fraction_of_ceiling(c);
    fmt::print("{:<26} {:<24} {:>9.1f} {:>12} {:>13} {:>6} {:>8} {:>9}\n", k.name, k.shape, k.median_seconds * 1e6,
               bytes ? fmt::format("{:.1f} MB", k.amount * 1e-6) : fmt::format("{:.1f} GFLOP", k.amount * 1e-9),
               bytes ? fmt::format("{:.2f} TB/s", k.rate() * 1e-12) : fmt::format("{:.0f} TFLOP/s", k.rate() * 1e-12),
               or_dash(fraction > 0, fmt::format("{:.0f}%", 100 * fraction)),
               or_dash(k.peer_seconds.has_value(), fmt::format("{:.0f}", k.peer_seconds.value_or(0) * 1e6)),
               or_dash(k.peer_seconds.has_value(), fmt::format("{:.2f}", k.peer_seconds.value_or(0) / k.median_seconds)));
  }
  fmt::print("(median of the timed repetitions, L2 flushed before each; amount: the minimum bytes moved, or the FLOPs;\n"
             " %ceil: achieved rate over this run's copy or GEMM ceiling; peer/ours > 1: we are faster)\n");
}

std::string StepResult::recompute_label() const {
  if (!recompute) return "off";
  if (checkpoint_every == 1) return "on";
  return fmt::format("on/k{}{}", checkpoint_every, keep_layer_outputs ? "+out" : "");
}

void print_step_table(const Ceilings& c, const std::vector<StepResult>& steps) {
  const double gemm = mfu_ceiling(c);
  fmt::print("\n{:<11} {:<9} {:<6} {:>6} {:>9} {:>8} {:>5} {:>8} {:>8} {:>9} {:>8} {:>7} {:>8} {:>6}\n", "model",
             "recomp", "packed", "batch", "tokens/s", "step_ms", "MFU", "plan_GiB", "used_GiB", "HF_tok/s", "ours/HF",
             "HF_GiB", "mem/HF", "loss");
  for (const StepResult& s : steps) {
    if (!s.error.empty()) {
      fmt::print("{:<11} {:<9} {:<6} FAILED: {}\n", s.model, s.recompute_label(), s.packed ? "yes" : "no",
                 first_line(s.error, 90));
      continue;
    }
    const double tokens = s.tokens_per_second(), used = static_cast<double>(s.in_use_bytes);
    fmt::print("{:<11} {:<9} {:<6} {:>6} {:>9.0f} {:>8.1f} {:>4.0f}% {:>8.2f} {:>8.2f} {:>9} {:>8} {:>7} {:>8} "
               "{:>6.3f}\n",
               s.model, s.recompute_label(), s.packed ? "yes" : "no", fmt::format("{}x{}", s.batch, s.seq_len),
               tokens, s.median_seconds * 1e3, 100 * s.mfu(gemm),
               static_cast<double>(s.planned_bytes) / kGiB, used / kGiB,
               or_dash(s.hf_tokens_per_second.has_value(), fmt::format("{:.0f}", s.hf_tokens_per_second.value_or(0))),
               or_dash(s.hf_tokens_per_second.has_value(),
                       fmt::format("{:.2f}", tokens / s.hf_tokens_per_second.value_or(1))),
               or_dash(s.hf_peak_bytes.has_value(), fmt::format("{:.1f}", s.hf_peak_bytes.value_or(0) / kGiB)),
               or_dash(s.hf_peak_bytes.has_value(), fmt::format("{:.2f}", used / s.hf_peak_bytes.value_or(1))),
               s.losses.empty() ? 0.0 : s.losses.back());
  }
  fmt::print("(MFU: model FLOPs, forward + backward as `ssmtune info` counts them without the recomputation, per\n"
             " second over {} GEMM ceiling, {:.0f} TFLOP/s;\n",
             c.gemm_flops_per_second() > 0 ? "this run's" : "REFERENCE.md's", gemm * 1e-12);
  fmt::print(" used: cudaMemGetInfo total-free after the timed steps, CUDA context included; nothing allocates in a\n"
             " step, so it is also the peak. HF: bf16 base, LoRA on in/x/dt_proj; ours: NF4 base, LoRA on all four.\n"
             " loss: mean token loss of the last step on random tokens; the random init (HF's, embeddings tied at\n"
             " std 0.1) gives each token's own logit ~0.1 * d_model, so it starts near 70, 190, 235 for 130m,\n"
             " 1.4b, 2.8b, not at ln(50280) = 10.8; packed: the same rows as documents of 300-1000 tokens,\n"
             " restarting at each)\n");
  // The cost of packing: each packed setting against the unpacked one of the same model and recompute.
  for (const StepResult& p : steps) {
    if (!p.packed || !p.error.empty()) continue;
    for (const StepResult& u : steps) {
      if (u.packed || !u.error.empty() || u.model != p.model || u.recompute_label() != p.recompute_label()) continue;
      fmt::print("packing {} recompute {}: {:.0f} tokens/s packed, {:.0f} unpacked: packed/unpacked {:.3f}\n",
                 p.model, p.recompute_label(), p.tokens_per_second(), u.tokens_per_second(),
                 p.tokens_per_second() / u.tokens_per_second());
    }
  }
}

void write_json(const std::filesystem::path& path, const DeviceInfo& device, const Ceilings& c,
                const std::vector<KernelResult>& kernels, const std::vector<StepResult>& steps) {
  nlohmann::json j;
  j["device"] = {{"name", device.name},
                 {"sm_count", device.sm_count},
                 {"l2_bytes", device.l2_bytes},
                 {"memory_bytes", device.memory_bytes},
                 {"cuda_runtime", device.runtime_version},
                 {"cuda_driver", device.driver_version}};
  j["ceilings"] = {{"copy_seconds", c.copy_seconds},
                   {"copy_bytes", c.copy_bytes},
                   {"copy_bytes_per_second", c.copy_bytes_per_second()},
                   {"reference_copy_bytes_per_second", peers::kCopyBytesPerSecond},
                   {"gemm_seconds", c.gemm_seconds},
                   {"gemm_flops", c.gemm_flops},
                   {"gemm_flops_per_second", c.gemm_flops_per_second()},
                   {"reference_gemm_flops_per_second", peers::kGemmFlopsPerSecond},
                   {"error", c.error}};
  j["kernels"] = nlohmann::json::array();
  for (const KernelResult& k : kernels) {
    nlohmann::json row = {{"name", k.name}, {"shape", k.shape}, {"error", k.error}};
    if (k.error.empty()) {
      const bool bytes = k.bound == Bound::bytes;
      row["bound"] = bytes ? "bytes" : "flops";
      row[bytes ? "min_bytes" : "flops"] = k.amount;
      row["median_seconds"] = k.median_seconds;
      row["seconds"] = k.seconds;
      row[bytes ? "bytes_per_second" : "flops_per_second"] = k.rate();
      row["fraction_of_ceiling"] = k.fraction_of_ceiling(c);
      row["peer_seconds"] = optional_json(k.peer_seconds);
      row["peer_over_ours"] = k.peer_seconds ? nlohmann::json(*k.peer_seconds / k.median_seconds) : nlohmann::json(nullptr);
    }
    j["kernels"].push_back(row);
  }
  j["steps"] = nlohmann::json::array();
  for (const StepResult& s : steps) {
    nlohmann::json row = {{"model", s.model},     {"recompute", s.recompute}, {"checkpoint_every", s.checkpoint_every},
                          {"keep_layer_outputs", s.keep_layer_outputs}, {"packed", s.packed},
                          {"batch", s.batch},     {"seq_len", s.seq_len},     {"error", s.error}};
    if (s.error.empty()) {
      row["step_seconds"] = s.step_seconds;
      row["median_step_seconds"] = s.median_seconds;
      row["tokens_per_second"] = s.tokens_per_second();
      row["model_flops_per_token"] = s.model_flops_per_token;
      row["mfu"] = s.mfu(mfu_ceiling(c));
      row["mfu_ceiling_flops_per_second"] = mfu_ceiling(c);
      row["losses"] = s.losses;
      row["planned_bytes"] = s.planned_bytes;
      row["weights_bytes"] = s.weights_bytes;
      row["adapter_params"] = s.adapter_params;
      row["activation_bytes"] = s.activation_bytes;
      row["in_use_bytes"] = s.in_use_bytes;
      row["peak_bytes"] = s.in_use_bytes;  // nothing allocates inside a step
      row["hf_tokens_per_second"] = optional_json(s.hf_tokens_per_second);
      row["hf_peak_bytes"] = optional_json(s.hf_peak_bytes);
      if (s.hf_tokens_per_second) row["tokens_per_second_ours_over_hf"] = s.tokens_per_second() / *s.hf_tokens_per_second;
      if (s.hf_peak_bytes) row["memory_ours_over_hf"] = static_cast<double>(s.in_use_bytes) / *s.hf_peak_bytes;
    }
    j["steps"].push_back(row);
  }
  std::ofstream out(path);
  if (!out) fail("cannot write {}", path.string());
  out << j.dump(2) << "\n";
  if (!out) fail("error writing {}", path.string());
}

}  // namespace ssmtune::bench
