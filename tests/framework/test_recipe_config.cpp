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
  CHECK(r.packing);  // data.packing defaults to true
  CHECK_FALSE(parse_recipe(kMinimal, "recipe.yaml", {"data.packing=false"}).packing);
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

TEST_CASE("values with control characters are errors naming the key; the resolved recipe parses back to itself") {
  // Found by fuzz_recipe: "output_dir: -1\r\r\n" kept one carriage return, which the resolved YAML wrote
  // unquoted and the next parse took as part of the line break, so a resumed run saw another output_dir.
  const std::string cr = error_of("model:\n  path: m\ndata:\n  path: d\ntrain:\n  output_dir: -1\r\r\n");
  CHECK(cr.find("recipe.yaml: key 'train.output_dir' contains the control character 0x0d") != std::string::npos);
  // A number that yaml-cpp reads through trailing whitespace, an escape in quotes, a list item, an override.
  CHECK(error_of(kMinimal + "lora:\n  alpha: 16\r\r\n").find("key 'lora.alpha' contains the control character 0x0d") !=
        std::string::npos);
  CHECK(error_of(kMinimal + "device: \"cu\\tda\"\n").find("key 'device' contains the control character 0x09") !=
        std::string::npos);
  CHECK(error_of(kMinimal + "lora:\n  targets: [\"x_proj\\x01\"]\n").find("key 'lora.targets' contains the control "
                                                                       "character 0x01") != std::string::npos);
  CHECK(error_of(kMinimal, {"data.path=\"d\\u007f\""}).find("key 'data.path' contains the control character 0x7f") !=
        std::string::npos);
  // Line breaks of every kind (LF, CRLF) between values are fine, and the resolved text is a fixed point.
  const RecipeConfig crlf = parse_recipe("model:\r\n  path: m\r\ndata:\r\n  path: d\r\ntrain:\r\n  output_dir: o\r\n",
                                         "recipe.yaml", {});
  CHECK(crlf.output_dir == "o");
  CHECK(parse_recipe(crlf.resolved_yaml, "resolved", {}).resolved_yaml == crlf.resolved_yaml);
}

TEST_CASE("keys that are not names, nested target lists and alias bombs are errors, not crashes or hangs") {
  // yaml-cpp's conversion exceptions used to escape these instead of an Error naming the file.
  CHECK(error_of(kMinimal + "? [a, b]\n: 1\n").find("recipe.yaml: line 8: a key must be a plain name") !=
        std::string::npos);
  CHECK(error_of(kMinimal + "~: 1\n").find("a key must be a plain name") != std::string::npos);
  CHECK(error_of(kMinimal, {"lora.targets=[[in_proj]]"}).find("'lora.targets' must be a list of projection names") !=
        std::string::npos);
  // Each level names the one before ten times: 10^6 dotted keys from 7 lines, unless the walk stops.
  std::string bomb = kMinimal + "l0: &l0 {x: 1}\n";
  for (int level = 1; level <= 6; ++level) {
    bomb += fmt::format("l{0}: &l{0} {{", level);
    for (int key = 0; key < 10; ++key) bomb += fmt::format("{}k{}: *l{}", key ? ", " : "", key, level - 1);
    bomb += "}\n";
  }
  CHECK(error_of(bomb).find("recipe.yaml: more than 10000 mappings and values") != std::string::npos);
  // Found by fuzz_recipe: a mapping that contains itself made the walk endless (until memory ran out).
  CHECK(error_of(kMinimal + "lora: &l\n  loop: *l\n").find("key 'lora.loop.loop.loop.loop.loop.loop.loop' is nested") !=
        std::string::npos);
}
