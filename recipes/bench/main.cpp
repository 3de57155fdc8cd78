// ssmtune-bench: the CUDA kernels and whole training steps on one GPU, beside the ceilings measured in
// the same run and the peer figures of REFERENCE.md §7. Progress goes out as it happens; the short
// tables come last, one line per entry, and --json keeps every number.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <cstdio>

#include "recipes/bench/entries.h"
#include "recipes/bench/harness.h"
#include "recipes/bench/train_steps.h"

namespace {

using namespace ssmtune::bench;

struct Family {
  const char* title;
  void (*run)(KernelBench&);
};
constexpr Family kFamilies[] = {
    {"selective scan (chunk 64, B/C and z strided as in the step; peer mamba-ssm)", bench_selective_scan},
    {"causal conv1d + SiLU (kernel 4, x strided as in the step; peer causal-conv1d)", bench_causal_conv1d},
    {"NF4 dequantize", bench_nf4_dequantize},
    {"NF4 linear layer (dequantize + GEMM + LoRA r=16)", bench_nf4_linear},
    {"RMSNorm", bench_rmsnorm},
    {"LM head + cross-entropy", bench_cross_entropy},
    {"AdamW", bench_adamw},
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"ssmtune-bench: CUDA kernels and training steps against the ceilings and peers of REFERENCE.md"};
  bool run_kernels = true, run_steps = true;
  int warmup = 3, repetitions = 25;
  StepOptions steps;
  steps.models = {"130m", "1.4b", "2.8b"};
  std::string recompute = "both", json;
  app.add_flag("--kernels,!--no-kernels", run_kernels, "benchmark the kernels (default on)");
  app.add_flag("--steps,!--no-steps", run_steps, "benchmark whole training steps (default on)");
  app.add_option("--models", steps.models, "models for the training steps, comma separated")
      ->delimiter(',')
      ->capture_default_str();
  app.add_option("--recompute", recompute, "layer recomputation in the training steps")
      ->check(CLI::IsMember({"on", "off", "both"}))
      ->capture_default_str();
  app.add_option("--json", json, "write every number measured to this JSON file");
  app.add_option("--warmup", warmup, "untimed runs of each kernel before timing")->check(CLI::Range(1, 1000))
      ->capture_default_str();
  app.add_option("--reps", repetitions, "timed runs of each kernel (median kept)")->check(CLI::Range(20, 100000))
      ->capture_default_str();
  app.add_option("--warmup-steps", steps.warmup_steps, "untimed training steps per setting")
      ->check(CLI::Range(1, 100))
      ->capture_default_str();
  app.add_option("--timed-steps", steps.timed_steps, "timed training steps per setting (median kept)")
      ->check(CLI::Range(5, 1000))
      ->capture_default_str();
  app.add_option("--seed", steps.seed, "seed of the random weights and token batches")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  try {
    for (std::string& model : steps.models) model = full_model_name(model);
    if (recompute == "both") steps.recompute = {false, true};
    else steps.recompute = {recompute == "on"};

    const DeviceInfo device = device_info();
    fmt::print("{}: {} SMs, {:.0f} MiB L2, {:.1f} GiB; CUDA runtime {}, driver {}\n", device.name, device.sm_count,
               device.l2_bytes / 1048576.0, device.memory_bytes / 1073741824.0, device.runtime_version,
               device.driver_version);
    std::fflush(stdout);

    Ceilings ceilings;
    std::vector<KernelResult> kernels;
    if (run_kernels) {
      // Scoped: the kernels' stream, GEMM workspace and cache-flush buffer are gone before the steps
      // measure the memory in use.
      KernelBench bench(warmup, repetitions);
      fmt::print("ceilings\n");
      std::fflush(stdout);
      ceilings = measure_ceilings(bench);
      fmt::print("  copy {:.2f} TB/s, bf16 GEMM {:.0f} TFLOP/s{}\n", ceilings.copy_bytes_per_second() * 1e-12,
                 ceilings.gemm_flops_per_second() * 1e-12, ceilings.error.empty() ? "" : "; errors: " + ceilings.error);
      for (const Family& family : kFamilies) {
        fmt::print("{}\n", family.title);
        std::fflush(stdout);
        family.run(bench);
      }
      kernels = bench.results();
    }
    std::vector<StepResult> step_results;
    if (run_steps) {
      fmt::print("training steps: LoRA r=16 alpha 32 dropout 0 on all four projections, AdamW, {} warm-up + {} "
                 "timed steps\n",
                 steps.warmup_steps, steps.timed_steps);
      step_results = bench_training_steps(steps);
    }

    if (!json.empty()) {
      write_json(json, device, ceilings, kernels, step_results);
      fmt::print("wrote {}\n", json);
    }
    if (run_kernels) print_kernel_table(ceilings, kernels);
    if (run_steps) print_step_table(step_results);
    const bool failed = !ceilings.error.empty() ||
                        std::any_of(kernels.begin(), kernels.end(), [](const auto& k) { return !k.error.empty(); }) ||
                        std::any_of(step_results.begin(), step_results.end(),
                                    [](const auto& s) { return !s.error.empty(); });
    return failed ? 1 : 0;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    fmt::print(stderr, "ssmtune-bench: error: {}\n", e.what());
    return 1;
  }
}
