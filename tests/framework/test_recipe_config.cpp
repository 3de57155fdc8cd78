// Recipes: YAML plus dotted overrides; unknown keys, bad types and YAML errors name the key and file.
#include "framework/error.h"
#include "framework/recipe_config.h"
#include "tests/catch.h"
#include "tests/framework/error_message.h"

using namespace ssmtune;

namespace {

const std::string kMinimal = R"(
model:
  path: m
data:
  path: d.h5
train:
  output_dir: out
)";

std::string error_of(const std::string& yaml, std::vector<std::string> overrides = {}) {
  return test::error_message([&] { parse_recipe(yaml, "recipe.yaml", overrides); });
}

}  // namespace

TEST_CASE("defaults, values and overrides") {
  const RecipeConfig r = parse_recipe(kMinimal + "lora:\n  rank: 4\n  targets: [x_proj]\n", "recipe.yaml",
                                      {"train.lr=0.5", "lora.rslora=true", "memory.recompute=false"});
  CHECK(r.model_path == "m");
  CHECK(r.lora.rank == 4);
  CHECK(r.lora.targets == std::vector<Projection>{Projection::x_proj});
  CHECK(r.lora.rslora);
  CHECK(r.optimizer.lr == 0.5);
  CHECK_FALSE(r.step.recompute);
  CHECK(r.max_steps == 100);
  // The resolved recipe carries the overrides and parses back to the same values.
  const RecipeConfig again = parse_recipe(r.resolved_yaml, "resolved", {});
  CHECK(again.optimizer.lr == 0.5);
  CHECK(again.lora.targets == r.lora.targets);
}

TEST_CASE("unknown keys are errors naming the key and the file") {
  CHECK(error_of("model:\n  path: m\ndata:\n  path: d\ntrain:\n  output_dir: o\n  lrr: 1\n").find("unknown key 'train.lrr'") !=
        std::string::npos);
  const std::string nested = error_of(kMinimal + "optim:\n  lr: 1\n");
  CHECK(nested.find("recipe.yaml") != std::string::npos);
  CHECK(nested.find("unknown key 'optim.lr'") != std::string::npos);
  const std::string from_override = error_of(kMinimal, {"train.lrr=3"});
  CHECK(from_override.find("unknown key 'train.lrr'") != std::string::npos);
  CHECK(error_of(kMinimal, {"nonsense"}).find("dotted.key=value") != std::string::npos);
}

TEST_CASE("bad values and YAML syntax errors") {
  CHECK(error_of(kMinimal, {"train.max_steps=many"}).find("'train.max_steps' must be an integer") != std::string::npos);
  CHECK(error_of(kMinimal, {"lora.targets=[q_proj]"}).find("unknown projection 'q_proj'") != std::string::npos);
  CHECK(error_of(kMinimal, {"device=tpu"}).find("device must be auto, cpu or cuda") != std::string::npos);
  const std::string syntax = error_of("model:\n  path: [unclosed\n");
  CHECK(syntax.find("recipe.yaml: line") != std::string::npos);
  CHECK(error_of("model:\n  path: m\n").find("missing required key 'data.path'") != std::string::npos);
}
