// The distributed.* recipe keys (and memory.budget_mb) and the multi-GPU recipes: defaults, overrides,
// one clear error per bad value, and the 2- and 8-GPU configs load with the global batch their comments
// promise.
#include "framework/recipe_config.h"
#include "tests/catch.h"
#include "tests/framework/error_message.h"

using namespace ssmtune;

namespace {

const char* kMinimal = "model:\n  path: m\ndata:\n  path: d.h5\ntrain:\n  output_dir: out\n";

std::string error_of(const std::vector<std::string>& overrides) {
  return test::error_message([&] { parse_recipe(kMinimal, "recipe.yaml", overrides); });
}

RecipeConfig config(const std::string& name) {
  return load_recipe(std::filesystem::path(SSMTUNE_SOURCE_DIR) / "recipes/configs" / name, {});
}

}  // namespace

TEST_CASE("distributed keys: defaults, overrides and errors naming the key") {
  const RecipeConfig defaults = parse_recipe(kMinimal, "recipe.yaml", {});
  CHECK(defaults.distributed.strategy == ShardingStrategy::ddp);
  CHECK(defaults.distributed.bucket_mb == 25);
  CHECK(defaults.distributed.timeout_s == 600);
  const RecipeConfig set = parse_recipe(kMinimal, "recipe.yaml",
                                        {"distributed.strategy=zero2", "distributed.bucket_mb=0.5", "distributed.timeout_s=30"});
  CHECK(set.distributed.strategy == ShardingStrategy::zero2);
  CHECK(set.distributed.bucket_mb == 0.5);
  CHECK(set.distributed.timeout_s == 30);
  CHECK(error_of({"distributed.strategy=fsdp"}) ==
        "recipe.yaml: key 'distributed.strategy' must be ddp, zero1 or zero2, got 'fsdp'");
  CHECK(error_of({"distributed.bucket_mb=0"}) == "recipe.yaml: distributed.bucket_mb must be positive, got 0");
  CHECK(error_of({"distributed.timeout_s=-1"}) == "recipe.yaml: distributed.timeout_s must be positive, got -1");
  CHECK(error_of({"distributed.timeout_s=soon"}) == "recipe.yaml: key 'distributed.timeout_s' must be a number, got 'soon'");
}

TEST_CASE("sharded base weights and the memory budget: defaults, overrides and errors naming the key") {
  const RecipeConfig defaults = parse_recipe(kMinimal, "recipe.yaml", {});
  CHECK_FALSE(defaults.distributed.shard_base_weights);
  CHECK(defaults.memory_budget_mb == 0);
  const RecipeConfig set =
      parse_recipe(kMinimal, "recipe.yaml", {"distributed.shard_base_weights=true", "memory.budget_mb=40960"});
  CHECK(set.distributed.shard_base_weights);
  CHECK(set.memory_budget_mb == 40960);
  CHECK(error_of({"distributed.shard_base_weights=half"}) ==
        "recipe.yaml: key 'distributed.shard_base_weights' must be true or false, got 'half'");
  CHECK(error_of({"memory.budget_mb=-1"}) ==
        "recipe.yaml: memory.budget_mb must be 0 (no budget) or a number of MiB, got -1");
}

TEST_CASE("the 2- and 8-GPU recipes keep the global batch of their one-GPU counterparts") {
  const RecipeConfig two = config("mamba-1.4b-2gpu.yaml"), one = config("mamba-1.4b.yaml");
  CHECK(two.distributed.strategy == ShardingStrategy::ddp);
  CHECK(two.device == "cuda");
  CHECK(two.step.batch * two.grad_accum * 2 == one.step.batch * one.grad_accum);
  CHECK(two.step.seq_len == one.step.seq_len);

  const RecipeConfig eight = config("mamba-2.8b-8gpu.yaml"), single = config("mamba-2.8b.yaml");
  CHECK(eight.distributed.strategy == ShardingStrategy::zero2);
  CHECK_FALSE(eight.distributed.shard_base_weights);
  // Twice the one-GPU batch, in half the steps: the same tokens.
  CHECK(eight.step.batch * eight.grad_accum * 8 == 2 * single.step.batch * single.grad_accum);
  CHECK(2 * eight.max_steps == single.max_steps);
}
