#include "recipes/bench/targets.h"

#include <fmt/format.h>

#include <string>
#include <string_view>

namespace ssmtune::bench {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// A kernel row: at least `value` of this run's ceiling, at least `value` times the peer's speed, or at
// most `value` microseconds.
struct KernelTarget {
  enum class Kind { ceiling_fraction, peer_speedup, max_us };
  const char* name;
  const char* shape;
  Kind kind;
  double value;
};
using K = KernelTarget::Kind;
constexpr KernelTarget kKernelTargets[] = {
    {"nf4 dequantize", "4096x14336", K::ceiling_fraction, 0.90},
    {"nf4 dequantize", "8192x8192", K::ceiling_fraction, 0.90},
    {"selective scan fwd+bwd", "(2,4096,2048,16)", K::max_us, 840},
    {"selective scan fwd+bwd", "(8,1536,2048,16)", K::peer_speedup, 2},
    {"selective scan fwd+bwd", "(1,5120,8192,16)", K::peer_speedup, 2},
    {"selective scan fwd", "(2,4096,2048,16)", K::peer_speedup, 2},
    {"selective scan fwd", "(8,1536,2048,16)", K::peer_speedup, 2},
    {"selective scan fwd", "(1,5120,8192,16)", K::peer_speedup, 2},
    {"causal conv1d+silu fwd+bwd", "(2,4096,2048) K4", K::max_us, 290},
};

// A training-step row: QLoRA, NF4 base, LoRA r=16 on all four projections, sequences of 2048.
struct StepTarget {
  const char* model;
  int64_t batch;
  double min_tokens_per_second, max_gib;
};
constexpr StepTarget kStepTargets[] = {
    {"mamba-1.4b", 4, 42000, 6},
    {"mamba-130m", 8, 180000, 4},
    {"mamba-2.8b", 2, 24000, 6},
};

const KernelResult* find_kernel(const std::vector<KernelResult>& kernels, std::string_view name,
                                std::string_view shape) {
  for (const KernelResult& k : kernels)
    if (k.name == name && k.shape == shape && k.error.empty()) return &k;
  return nullptr;
}

// The setting shown for a step row: the fastest within the memory target (it meets both targets if any
// setting does), else the smallest.
const StepResult* pick_step(const std::vector<StepResult>& steps, const StepTarget& t) {
  const StepResult *fastest_within = nullptr, *smallest = nullptr;
  for (const StepResult& s : steps) {
    if (s.model != t.model || s.batch != t.batch || s.packed || !s.error.empty()) continue;
    const bool fits = static_cast<double>(s.in_use_bytes) / kGiB <= t.max_gib;
    if (fits && (!fastest_within || s.tokens_per_second() > fastest_within->tokens_per_second())) fastest_within = &s;
    if (!smallest || s.in_use_bytes < smallest->in_use_bytes) smallest = &s;
  }
  return fastest_within ? fastest_within : smallest;
}

}  // namespace

void print_target_table(const Ceilings& c, const std::vector<KernelResult>& kernels,
                        const std::vector<StepResult>& steps) {
  fmt::print("\nissue 6 targets, this run\n{:<28} {:<26} {:<50} {:<26} {}\n", "what", "shape", "measured", "target",
             "met");
  int met = 0, judged = 0;
  for (const KernelTarget& t : kKernelTargets) {
    const KernelResult* k = find_kernel(kernels, t.name, t.shape);
    if (!k) {
      fmt::print("{:<28} {:<26} not measured\n", t.name, t.shape);
      continue;
    }
    const double us = k->median_seconds * 1e6;
    std::string measured, target;
    bool ok = false;
    switch (t.kind) {
      case K::ceiling_fraction: {
        measured = fmt::format("{:.1f} us, {:.0f}% of copy", us, 100 * k->fraction_of_ceiling(c));
        // Beside it, the share of a copy of the same bytes (recipes/bench/nf4.cpp), where there is one.
        if (const KernelResult* copy = find_kernel(kernels, kSameBytesCopy, t.shape))
          measured += fmt::format(" ({:.0f}% of same-size copy)", 100 * k->rate() / copy->rate());
        target = fmt::format(">= {:.0f}% of copy", 100 * t.value);
        ok = k->fraction_of_ceiling(c) >= t.value;
        break;
      }
      case K::peer_speedup:
      case K::max_us: {
        const double limit_us = t.kind == K::max_us ? t.value : k->peer_seconds.value_or(0) * 1e6 / t.value;
        measured = k->peer_seconds ? fmt::format("{:.0f} us, {:.2f}x peer", us, *k->peer_seconds / k->median_seconds)
                                   : fmt::format("{:.0f} us", us);
        target = fmt::format("<= {:.0f} us", limit_us);
        ok = limit_us > 0 && us <= limit_us;
        break;
      }
    }
    ++judged;
    met += ok;
    fmt::print("{:<28} {:<26} {:<50} {:<26} {}\n", t.name, t.shape, measured, target, ok ? "yes" : "no");
  }
  for (const StepTarget& t : kStepTargets) {
    const std::string shape = fmt::format("{}x2048", t.batch);
    const StepResult* s = pick_step(steps, t);
    const std::string what = fmt::format("QLoRA step {}", t.model);
    if (!s) {
      fmt::print("{:<28} {:<26} not measured\n", what, shape);
      continue;
    }
    const double gib = static_cast<double>(s->in_use_bytes) / kGiB;
    const bool ok = s->tokens_per_second() >= t.min_tokens_per_second && gib <= t.max_gib;
    ++judged;
    met += ok;
    fmt::print("{:<28} {:<26} {:<50} {:<26} {}\n", what, fmt::format("{} recompute {}", shape, s->recompute_label()),
               fmt::format("{:.0f} tok/s, {:.2f} GiB", s->tokens_per_second(), gib),
               fmt::format(">= {:.0f} tok/s, <= {:.0f} GiB", t.min_tokens_per_second, t.max_gib), ok ? "yes" : "no");
  }
  fmt::print("({} of {} measured rows met; a step row shows the fastest setting within the memory target, else\n"
             " the smallest)\n",
             met, judged);
}

}  // namespace ssmtune::bench
