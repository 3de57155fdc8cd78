// ssmtune-bench-dist: the multi-GPU benchmark, run under mpirun with one rank per GPU. It measures the bus
// bandwidth of the communicator's collectives (nccl-tests' formulas, against REFERENCE.md §7) and the
// training throughput of each data-parallel strategy against one GPU alone (scaling efficiency), and
// zero2 with sharded base weights (the memory per GPU that sharding the NF4 base saves, and its cost);
// with --context, one long sequence split over the ranks (context parallelism) against one GPU alone.
//   mpirun -np 2 --bind-to none -x NCCL_NVLS_ENABLE=0 build/recipes/ssmtune-bench-dist --json dist.json
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "distributed/mpi_communicator.h"
#include "framework/error.h"
#include "framework/model_sizes.h"
#include "framework/trainer.h"
#include "recipes/bench/collectives.h"
#include "recipes/bench/context_parallel_steps.h"
#include "recipes/bench/data_parallel_steps.h"
#include "recipes/bench/harness.h"

namespace {

using namespace ssmtune;
using namespace ssmtune::bench;

void write_json(const std::string& path, const DeviceInfo& device, int ranks,
                const std::vector<CollectiveResult>& collectives, const std::vector<ParallelStepResult>& steps) {
  nlohmann::json j;
  j["device"] = {{"name", device.name}, {"ranks", ranks}};
  for (const CollectiveResult& c : collectives)
    j["collectives"].push_back({{"op", c.op},
                                {"bytes", c.bytes},
                                {"ranks", c.ranks},
                                {"seconds", c.seconds},
                                {"median_seconds", c.median_seconds},
                                {"bus_bytes_per_second", c.bus_bytes_per_second()},
                                {"peer_bus_bytes_per_second", c.peer_bus_bytes_per_second
                                                                  ? nlohmann::json(*c.peer_bus_bytes_per_second)
                                                                  : nlohmann::json(nullptr)}});
  for (const ParallelStepResult& s : steps)
    j["steps"].push_back({{"setting", s.setting},
                          {"ranks", s.ranks},
                          {"batch", s.batch},
                          {"seq_len", s.seq_len},
                          {"step_seconds", s.step_seconds},
                          {"median_seconds", s.median_seconds},
                          {"tokens_per_second_per_gpu", s.tokens_per_second_per_gpu()},
                          {"losses", s.losses},
                          {"planned_bytes", s.planned_bytes},
                          {"in_use_bytes", s.in_use_bytes},
                          {"error", s.error}});
  std::ofstream(path) << j.dump(2) << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  ProcessGroup world(&argc, &argv);
  CLI::App app{"ssmtune-bench-dist: collectives and data-parallel training steps across the GPUs of an mpirun job"};
  bool run_collectives = true, run_steps = true, sharded_base = true, run_context = false;
  ContextStepOptions context;
  std::string context_model = "mamba-2.8b";
  std::vector<size_t> sizes_mib{16, 64, 256, 1024};
  int warmup = 5, iterations = 20, repetitions = 5;
  ParallelStepOptions steps;
  std::vector<std::string> strategies{"ddp", "zero1", "zero2"};
  std::string recompute = "on", json;
  app.add_flag("--collectives,!--no-collectives", run_collectives, "bus bandwidth of the collectives (default on)");
  app.add_flag("--steps,!--no-steps", run_steps, "data-parallel training steps (default on)");
  app.add_flag("--sharded-base,!--no-sharded-base", sharded_base,
               "also zero2 with sharded base weights, on 2 or more ranks (default on)");
  app.add_option("--sizes-mib", sizes_mib, "collective buffer sizes in MiB")->delimiter(',')->capture_default_str();
  app.add_option("--warmup", warmup, "untimed collectives per size")->check(CLI::Range(0, 1000))->capture_default_str();
  app.add_option("--iters", iterations, "collectives per timed batch")->check(CLI::Range(1, 100000))->capture_default_str();
  app.add_option("--reps", repetitions, "timed batches per size (median kept)")->check(CLI::Range(1, 1000))
      ->capture_default_str();
  app.add_option("--model", steps.model, "model size (framework/model_sizes.h)")->capture_default_str();
  app.add_option("--batch", steps.batch, "sequences per rank and step")->check(CLI::Range(1, 1024))->capture_default_str();
  app.add_option("--seq-len", steps.seq_len, "tokens per sequence")->check(CLI::Range(1, 1 << 20))->capture_default_str();
  app.add_option("--recompute", recompute, "layer recomputation")->check(CLI::IsMember({"on", "off"}))
      ->capture_default_str();
  app.add_option("--strategies", strategies, "ddp, zero1, zero2")->delimiter(',')->capture_default_str();
  app.add_option("--warmup-steps", steps.warmup_steps, "untimed steps per setting")->check(CLI::Range(1, 100))
      ->capture_default_str();
  app.add_option("--timed-steps", steps.timed_steps, "timed steps per setting (median kept)")->check(CLI::Range(3, 1000))
      ->capture_default_str();
  app.add_option("--bucket-mb", steps.bucket_mb, "gradient bucket size in MiB")->capture_default_str();
  app.add_option("--timeout", steps.timeout_s, "seconds any collective may wait (the watchdog)")->capture_default_str();
  app.add_option("--seed", steps.seed, "seed of the random weights and batches")->capture_default_str();
  app.add_option("--json", json, "write every number measured to this JSON file (rank 0)");
  app.add_flag("--context,!--no-context", run_context,
               "context parallelism: one long sequence split over the ranks, against one GPU (default off)");
  app.add_option("--context-model", context_model, "model of the context-parallel steps")->capture_default_str();
  app.add_option("--context-lengths", context.lengths, "sequence lengths of the context-parallel steps")
      ->delimiter(',')->capture_default_str();
  app.add_option("--checkpoint-every", context.checkpoint_every, "memory.checkpoint_every of the context-parallel steps")
      ->check(CLI::Range(1, 1024))->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return world.is_root() ? app.exit(e) : (e.get_exit_code() == 0 ? 0 : 2);
  }

  try {
    steps.recompute = recompute == "on";
    steps.strategies.clear();
    for (const std::string& name : strategies) {
      const std::optional<ShardingStrategy> s = strategy_from_name(name);
      if (!s) fail("--strategies: unknown strategy '{}' (ddp, zero1, zero2)", name);
      steps.strategies.push_back(*s);
    }
    const std::unique_ptr<Backend> backend = make_backend("cuda", world.local_rank());
    Watchdog watchdog(world, steps.timeout_s);
    MpiCommunicator host(world, watchdog);
    const std::unique_ptr<Communicator> comm = make_communicator(world, watchdog, host, backend->stream());
    const DeviceInfo device = device_info();
    if (world.is_root())
      fmt::print("{} ranks, {} each ({} SMs, {:.1f} GiB); collectives over {}\n", world.size(), device.name,
                 device.sm_count, device.memory_bytes / 1073741824.0, comm->name());

    std::vector<CollectiveResult> collectives;
    if (run_collectives && world.size() > 1) {
      if (world.is_root()) fmt::print("collectives: {} warm-up, {} batches of {}\n", warmup, repetitions, iterations);
      std::vector<size_t> bytes;
      for (size_t mib : sizes_mib) bytes.push_back(mib << 20);
      collectives = bench_collectives(*backend, *comm, bytes, warmup, iterations, repetitions);
    }
    std::vector<ParallelStepResult> step_results;
    if (run_steps) {
      if (world.is_root())
        fmt::print("training steps: random {}, {} x {} tokens per GPU, LoRA r=16 on all four projections, recompute {}, "
                   "{} warm-up + {} timed steps\n",
                   steps.model, steps.batch, steps.seq_len, recompute, steps.warmup_steps, steps.timed_steps);
      {
        const MambaWeights weights = MambaWeights::random(model_size(steps.model), *backend, steps.seed);
        step_results = bench_data_parallel_steps(world, *backend, weights, host, *comm, steps);
      }  // the whole base is gone before the sharded one is built: each row's memory is its own
      if (sharded_base && world.size() > 1) {
        const MambaWeights sharded =
            MambaWeights::random(model_size(steps.model), *backend, steps.seed, {world.rank(), world.size()});
        step_results.insert(step_results.end() - 1, bench_sharded_base_steps(*backend, sharded, host, *comm, steps));
      }
    }
    std::vector<ContextStepResult> context_results;
    if (run_context && world.size() > 1) {
      if (world.is_root())
        fmt::print("context parallelism: random {}, one sequence per step over {} ranks, checkpoint_every {}\n",
                   context_model, world.size(), context.checkpoint_every);
      const MambaWeights weights = MambaWeights::random(model_size(context_model), *backend, context.seed);
      context_results = bench_context_parallel_steps(world, *backend, weights, host, *comm, context);
    }
    if (world.is_root()) {
      if (!context_results.empty()) print_context_step_table(context_results);
      if (!json.empty()) {
        write_json(json, device, world.size(), collectives, step_results);
        fmt::print("wrote {}\n", json);
      }
      if (!collectives.empty()) print_collective_table(collectives);
      if (!step_results.empty()) print_parallel_step_table(step_results);
    }
    for (const ParallelStepResult& s : step_results)
      if (!s.error.empty()) return 1;
    return 0;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    fmt::print(stderr, "ssmtune-bench-dist: error: rank {}: {}\n", world.rank(), e.what());
    if (world.size() > 1) world.abort(1);
    return 1;
  }
}
