// Fuzz target: framework/recipe_config on any YAML text and overrides. The input is the YAML text,
// then each override after a NUL byte. Parsing must give a recipe or throw ssmtune::Error; a
// recipe's resolved YAML must parse again to the same recipe (it is saved with checkpoints and
// read back on resume).
#include <cstdlib>

#include "framework/error.h"
#include "framework/recipe_config.h"
#include "tests/fuzz/fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace ssmtune;
  std::vector<std::string> parts = fuzz::split_at_nul(data, size, SIZE_MAX);
  const std::string yaml = parts.front();
  parts.erase(parts.begin());
  RecipeConfig recipe;
  try {
    recipe = parse_recipe(yaml, "fuzz.yaml", parts);
  } catch (const Error&) {
    return 0;
  }
  const RecipeConfig again = parse_recipe(recipe.resolved_yaml, "resolved.yaml", {});
  if (again.resolved_yaml != recipe.resolved_yaml) std::abort();
  return 0;
}
