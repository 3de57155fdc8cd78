// ssmtune-bench: the CUDA kernels and whole training steps on one GPU, beside the ceilings measured in
// the same run and the peer figures of REFERENCE.md §7. Progress goes out as it happens; the short
// tables come last, one line per entry, and --json keeps every number. --long runs the long-sequence
// benchmark instead (long_sequences.h).
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <string_view>

#include "recipes/bench/entries.h"
#include "recipes/bench/harness.h"
#include "recipes/bench/long_sequences.h"
#include "recipes/bench/targets.h"
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
  std::string recompute = "both", keep_layer_outputs = "off", packing = "off", json;
  bool run_long = false;
  std::string only;
  LongOptions long_options;
  app.add_flag("--kernels,!--no-kernels", run_kernels, "benchmark the kernels (default on)");
  app.add_flag("--steps,!--no-steps", run_steps, "benchmark whole training steps (default on)");
  app.add_option("--models", steps.models, "models for the training steps, comma separated")
      ->delimiter(',')
      ->capture_default_str();
  app.add_option("--recompute", recompute, "layer recomputation in the training steps")
      ->check(CLI::IsMember({"on", "off", "both"}))
      ->capture_default_str();
  app.add_option("--checkpoint-every", steps.checkpoint_every,
                 "memory.checkpoint_every of the recompute-on training steps, comma separated")
      ->delimiter(',')
      ->check(CLI::Range(1, 1024))
      ->capture_default_str();
  app.add_option("--keep-layer-outputs", keep_layer_outputs,
                 "memory.keep_layer_outputs of the settings with --checkpoint-every > 1: off, on or both")
      ->check(CLI::IsMember({"on", "off", "both"}))
      ->capture_default_str();
  app.add_option("--packing", packing,
                 "training steps on unpacked rows (off), rows packing documents of 300-1000 tokens (on), or both")
      ->check(CLI::IsMember({"on", "off", "both"}))
      ->capture_default_str();
  app.add_option("--only", only, "only the kernel families whose title contains this text, e.g. \"selective scan\"");
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
  app.add_flag("--long", run_long,
               "instead of the kernels and steps: one sequence per step at lengths doubling until one does not fit");
  app.add_option("--long-model", long_options.model, "--long: the model (framework/model_sizes.h)")
      ->capture_default_str();
  app.add_option("--long-start", long_options.start, "--long: the first length")->check(CLI::Range(1, 1 << 24))
      ->capture_default_str();
  app.add_option("--long-last", long_options.last, "--long: the longest length tried")->check(CLI::Range(1, 1 << 24))
      ->capture_default_str();
  app.add_option("--long-checkpoint-every", long_options.checkpoint_every,
                 "--long: memory.checkpoint_every of each series, comma separated")
      ->delimiter(',')
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  app.add_option("--long-scan-chunk", long_options.scan_chunk, "--long: memory.scan_chunk")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  app.add_option("--long-timed-steps", long_options.timed_steps, "--long: timed steps per length (after one warm-up)")
      ->check(CLI::Range(1, 100))
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  try {
    for (std::string& model : steps.models) model = full_model_name(model);
    if (recompute == "both") steps.recompute = {false, true};
    else steps.recompute = {recompute == "on"};
    if (keep_layer_outputs == "both") steps.keep_layer_outputs = {false, true};
    else steps.keep_layer_outputs = {keep_layer_outputs == "on"};
    if (packing == "both") steps.packing = {false, true};
    else steps.packing = {packing == "on"};

    const DeviceInfo device = device_info();
    fmt::print("{}: {} SMs, {:.0f} MiB L2, {:.1f} GiB; CUDA runtime {}, driver {}\n", device.name, device.sm_count,
               device.l2_bytes / 1048576.0, device.memory_bytes / 1073741824.0, device.runtime_version,
               device.driver_version);
    std::fflush(stdout);

    if (run_long) {
      long_options.seed = steps.seed;
      fmt::print("long sequences: {}, LoRA r=16 alpha 32 dropout 0 on all four projections, AdamW, {} warm-up + {} "
                 "timed steps per length\n",
                 long_options.model, long_options.warmup_steps, long_options.timed_steps);
      const std::vector<LongResult> results = bench_long_sequences(long_options);
      if (!json.empty()) {
        write_long_json(json, device, results);
        fmt::print("wrote {}\n", json);
      }
      print_long_table(results);
      // A length that does not fit ends its series by design; only failures of steps that fit fail the run.
      return std::any_of(results.begin(), results.end(), [](const auto& r) { return r.fits && !r.error.empty(); }) ? 1
                                                                                                                 : 0;
    }

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
        if (std::string_view(family.title).find(only) == std::string_view::npos) continue;
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
    if (run_steps) print_step_table(ceilings, step_results);
    print_target_table(ceilings, kernels, step_results);
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
