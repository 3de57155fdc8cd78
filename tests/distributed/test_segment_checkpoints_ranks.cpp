// Segment checkpoints (memory.checkpoint_every) in MPI jobs of 2 and 3 ranks on the CPU backend, with the
// two features whose collectives run inside the layers' forwards: context parallelism (every layer
// forward exchanges the conv history and the scan state with the neighbouring slices, the regenerated
// ones too) and sharded base weights (every acquired layer is all-gathered; the regeneration acquires
// them in another order), each by re-running layers and by rebuilding the residuals from the kept layer
// outputs (memory.keep_layer_outputs). Each job trains exactly as the same job keeping every layer's
// input: the same losses, gradient norms, adapters and moments, bit for bit (tolerance 0), since every
// rank runs the same schedule and each layer the same ops on the same values.
// Time: twenty runs of three steps of a five-layer demo model; a few seconds per job.
#include <string>
#include <vector>

#include "tests/distributed/training_runs.h"

using namespace ssmtune;
using namespace ssmtune::test;

TEST_CASE("segment checkpoints train bit for bit as every layer's input kept, split over context ranks and with "
          "sharded base weights") {
  const TrainingRuns runs("cpu", 5);  // segments [0,2) [2,4) [4,5) at k = 2, [0,3) [3,5) at k = 3
  const int ranks = world().size();
  REQUIRE(24 % ranks == 0);  // data.seq_len 24 splits over the whole job as context ranks
  const std::vector<std::pair<std::string, std::string>> settings{
      {"context", "parallel.context=" + std::to_string(ranks)},
      {"sharded", "distributed.shard_base_weights=true"}};
  for (const auto& [name, setting] : settings) {
    // With the recipes' dropout 0.1: the regenerated forwards draw the same masks again.
    const std::vector<std::string> base{setting};
    const int replicas = name == "context" ? 1 : ranks;
    runs.train_together(runs.recipe(name + "-k1", replicas, "zero2", 3, base));
    for (const int k : {2, 3})
      for (const bool keep : {false, true}) {
        std::vector<std::string> segmented = base;
        segmented.push_back("memory.checkpoint_every=" + std::to_string(k));
        segmented.push_back(std::string("memory.keep_layer_outputs=") + (keep ? "true" : "false"));
        const std::string run = name + "-k" + std::to_string(k) + (keep ? "-kept" : "");
        runs.train_together(runs.recipe(run, replicas, "zero2", 3, segmented));
        INFO(name << ", memory.checkpoint_every=" << k << ", keep_layer_outputs " << keep << ", " << ranks << " ranks");
        compare_runs(runs, run, name + "-k1", 3, 0.0);
      }
    check_adapters_moved(runs, name + "-k1", 3, 1e-6);
  }
}
