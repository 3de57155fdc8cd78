// The checks of sharded base weights (distributed.shard_base_weights), shared by the CPU program
// (test_sharded_base_weights.cpp, MPI) and the GPU one (test_sharded_base_weights_cuda.cpp, NCCL):
//  - each rank's shard of a layer's NF4 block is its piece of the whole block;
//  - the layers LayerWeights gathers, in the orders of a forward, a backward and the next forward, are
//    the whole weights' bytes, as the compute stream sees them right after acquire() (each layer is
//    copied on that stream before anything waits on the host, so a gather not ordered before compute
//    shows up as another layer's bytes);
//  - training with sharded base weights gives what training with whole ones gives (losses, gradient
//    norms, validation losses, adapters, moments), and what one process gives;
//  - under a memory budget between the peak of a sharded rank and that of one process, one process
//    stops with the budget's message while the ranks together train.
#pragma once
#include <mpi.h>

#include <cstring>

#include "distributed/communicator.h"
#include "distributed/mpi_communicator.h"
#include "framework/layer_weights.h"
#include "framework/model_sizes.h"
#include "tests/distributed/training_runs.h"
#include "tests/framework/error_message.h"

namespace ssmtune::test {

// The demo model with eight layers, so that 1/N of them plus the two gather buffers take less memory
// than all of them (N >= 2).
inline constexpr int64_t kShardedTestLayers = 8;
inline MambaConfig sharded_test_model() {
  MambaConfig c = model_size("demo");
  c.n_layer = kShardedTestLayers;
  return c;
}

inline std::vector<uint8_t> download_bytes(Backend& backend, const void* device, size_t bytes) {
  std::vector<uint8_t> host(bytes);
  backend.copy_to_host(host.data(), device, bytes);
  return host;
}

// Layer i's whole NF4 block of unsharded weights.
inline std::vector<uint8_t> whole_block(Backend& backend, const MambaWeights& whole, int64_t i) {
  return download_bytes(backend, whole.layer_nf4_shard(i), whole.nf4_layout().bytes);
}

// Every rank: its shard of each layer, built from the same random model, is bytes [r * s, (r + 1) * s)
// of the whole block (zeros in the padding), with the whole weights' second-level offsets; the whole
// layer is not handed out by MambaWeights::layer().
inline void check_shards_are_pieces_of_the_whole(Backend& backend, const MambaConfig& model) {
  const int ranks = world().size(), me = world().rank();
  const MambaWeights whole = MambaWeights::random(model, backend, 7);
  const MambaWeights mine = MambaWeights::random(model, backend, 7, {me, ranks});
  REQUIRE(mine.projections_sharded());
  const LayerNf4Layout& layout = mine.nf4_layout();
  CHECK(layout.bytes % (static_cast<size_t>(ranks) * 256) == 0);
  CHECK(layout.bytes >= whole.nf4_layout().bytes);
  for (size_t p = 0; p < kProjections.size(); ++p) {  // the offsets do not depend on the shard count
    CHECK(layout.proj[p].packed == whole.nf4_layout().proj[p].packed);
    CHECK(layout.proj[p].nested_absmax == whole.nf4_layout().proj[p].nested_absmax);
  }
  // The base weights of this rank: its shards, not the whole blocks (the dense tensors are the same).
  CHECK(whole.bytes() - mine.bytes() ==
        static_cast<size_t>(model.n_layer) * (whole.nf4_layout().bytes - layout.shard_bytes()));
  for (int64_t i = 0; i < model.n_layer; ++i) {
    std::vector<uint8_t> expected = whole_block(backend, whole, i);
    expected.resize(layout.bytes, 0);
    const std::vector<uint8_t> shard = download_bytes(backend, mine.layer_nf4_shard(i), layout.shard_bytes());
    INFO("rank " << me << " of " << ranks << ", layer " << i);
    CHECK(std::memcmp(shard.data(), expected.data() + static_cast<size_t>(me) * layout.shard_bytes(),
                      layout.shard_bytes()) == 0);
    const MambaLayerWeights gathered = mine.layer_at(i, whole.layer_nf4_shard(i));
    for (size_t p = 0; p < kProjections.size(); ++p) {
      CHECK(gathered.proj[p].nested_offset == whole.layer(i).proj[p].nested_offset);
      CHECK(gathered.proj[p].out_features == whole.layer(i).proj[p].out_features);
    }
  }
  CHECK(contains(error_message([&] { mine.layer(0); }), "sharded over"));
}

// Collective: LayerWeights over `comm` serves the forward's, the backward's and the next forward's
// layers, each copied on the backend's stream as soon as it is acquired; only then does the host wait.
inline void check_gathered_layers_are_whole(Backend& backend, Communicator& comm, const MambaConfig& model) {
  const int64_t L = model.n_layer;
  const MambaWeights whole = MambaWeights::random(model, backend, 11);
  const MambaWeights mine = MambaWeights::random(model, backend, 11, {comm.rank(), comm.size()});
  LayerWeights layers(backend, mine, &comm);
  REQUIRE(layers.sharded());
  CHECK(layers.buffer_bytes() >= 2 * mine.nf4_layout().bytes);
  std::vector<std::pair<int64_t, int64_t>> visits;  // (layer, next) as TrainStep acquires them
  for (int64_t i = 0; i < L; ++i) visits.emplace_back(i, i + 1 < L ? i + 1 : -1);
  for (int64_t i = L - 1; i >= 0; --i) visits.emplace_back(i, i - 1);
  for (int64_t i = 0; i < L; ++i) visits.emplace_back(i, i + 1 < L ? i + 1 : -1);
  const size_t block = whole.nf4_layout().bytes;
  Arena copies(backend, "test: the gathered layers as the compute stream saw them");
  std::vector<void*> copy(visits.size());
  for (void*& c : copy) copies.add(&c, block);
  copies.allocate();
  for (size_t v = 0; v < visits.size(); ++v) {
    layers.acquire(visits[v].first, visits[v].second);
    const uint8_t* start = layers.layer(visits[v].first).proj[0].packed - mine.nf4_layout().proj[0].packed;
    backend.copy(copy[v], start, block);
  }
  layers.complete();
  backend.synchronize();
  for (size_t v = 0; v < visits.size(); ++v) {
    const int64_t i = visits[v].first;
    INFO("rank " << comm.rank() << " of " << comm.size() << ", visit " << v << ": layer " << i);
    CHECK(download_bytes(backend, copy[v], block) == whole_block(backend, whole, i));
  }
  const int64_t last = visits.back().first;
  for (size_t p = 0; p < kProjections.size(); ++p) {
    CHECK(layers.layer(last).proj[p].nested_offset == whole.layer(last).proj[p].nested_offset);
    CHECK(layers.layer(last).proj[p].in_features == whole.layer(last).proj[p].in_features);
  }
}

inline size_t max_over_ranks(size_t value) {
  uint64_t v = value;
  MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_UINT64_T, MPI_MAX, world().comm());
  return static_cast<size_t>(v);
}

// Collective. `same_job_tolerance`: between the same job with sharded and with whole base weights (0 on
// the CPU: the gathered bytes are the same, and so is every operation); `tolerance`: against one process.
inline void check_sharded_training(const TrainingRuns& runs, double tolerance, double same_job_tolerance) {
  const int ranks = world().size();
  const std::vector<std::string> shard{"distributed.shard_base_weights=true"};
  const size_t alone_peak = max_over_ranks(runs.train_alone(runs.recipe("alone", 1, "ddp", 3)).peak_memory_bytes);
  const size_t sharded_peak =
      max_over_ranks(runs.train_together(runs.recipe("sharded", ranks, "zero2", 3, shard)).peak_memory_bytes);
  compare_runs(runs, "sharded", "alone", 3, tolerance);
  check_adapters_moved(runs, "sharded", 3, tolerance);

  // Without recomputation, and with an evaluation whose micro-batches do not divide among the ranks
  // (a rank with fewer runs masked-out passes, so that the gathers pair up).
  if (world().is_root()) write_token_dataset((runs.dir / "val.h5").string(), make_demo_dataset(6, 100));
  world_barrier();
  std::vector<std::string> more{"memory.recompute=false", "data.val_path=" + (runs.dir / "val.h5").string(),
                                "eval.every=1", "eval.batches=" + std::to_string(ranks + 1)};
  runs.train_together(runs.recipe("whole-ddp", ranks, "ddp", 2, more));
  more.push_back(shard[0]);
  runs.train_together(runs.recipe("sharded-ddp", ranks, "ddp", 2, more));
  compare_runs(runs, "sharded-ddp", "whole-ddp", 2, same_job_tolerance);
  if (world().is_root()) {
    std::vector<double> whole_val, sharded_val;
    for (const nlohmann::json& line : read_metrics(runs.dir / "whole-ddp/metrics.jsonl"))
      if (line.contains("val_loss")) whole_val.push_back(line["val_loss"].get<double>());
    for (const nlohmann::json& line : read_metrics(runs.dir / "sharded-ddp/metrics.jsonl"))
      if (line.contains("val_loss")) sharded_val.push_back(line["val_loss"].get<double>());
    REQUIRE(whole_val.size() == 2);  // steps 1 and 2
    CHECK(relative_difference(sharded_val, whole_val) <= same_job_tolerance);
  }

  // A budget that one process's plans exceed and a sharded rank's fit.
  INFO("peak memory: one process " << alone_peak << " bytes, a rank of " << ranks << " with sharded base weights "
                                   << sharded_peak);
  REQUIRE(sharded_peak < alone_peak);
  const double budget_mb = static_cast<double>(alone_peak + sharded_peak) / 2 / 1048576.0;
  std::vector<std::string> budget{"memory.budget_mb=" + fmt::format("{:.6f}", budget_mb), shard[0]};
  if (world().is_root()) {
    const std::string message = error_message([&] {
      ProcessGroup alone(nullptr, nullptr, ProcessGroup::Ranks::this_process);
      run_training(runs.recipe("alone-budget", 1, "ddp", 3, budget), alone);
    });
    INFO(message);
    CHECK(contains(message, "exceed the memory budget"));
    CHECK(contains(message, "memory.budget_mb"));
    CHECK(contains(message, "MiB in all)"));  // the Arena names the plan it was building
  }
  world_barrier();
  runs.train_together(runs.recipe("sharded-budget", ranks, "zero2", 3, budget));
  compare_runs(runs, "sharded-budget", "alone", 3, tolerance);
  compare_runs(runs, "sharded-budget", "sharded", 3, same_job_tolerance);
}

}  // namespace ssmtune::test
