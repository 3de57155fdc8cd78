#include "framework/peft_import.h"

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "framework/atomic_file.h"
#include "framework/error.h"
#include "framework/peft_export.h"
#include "framework/safetensors.h"
#include "framework/untrusted_json.h"

namespace ssmtune {
namespace {

using nlohmann::json;

// A key of the config read as T; a value of another type is an Error naming the file and the key.
template <typename T>
T read_key(const json& config, const std::string& file, const char* key, const T& fallback) {
  if (!config.contains(key) || config.at(key).is_null()) return fallback;
  try {
    return config.at(key).get<T>();
  } catch (const json::exception&) {
    fail("{}: key '{}' is {} ({}), not what PEFT writes there", file, key, config.at(key).dump(),
         config.at(key).type_name());
  }
}

Projection target_projection(const std::string& name, const std::string& file) {
  for (Projection p : kProjections)
    if (projection_name(p) == name) return p;
  fail(
      "{}: target_modules names '{}', which is not one of ssmtune's LoRA targets (in_proj, x_proj, dt_proj, "
      "out_proj)",
      file, name);
}

std::vector<std::string_view> target_names(const LoraConfig& lora) {
  std::vector<std::string_view> names;
  for (Projection p : lora.targets) names.push_back(projection_name(p));
  return names;
}

}  // namespace

LoraConfig read_peft_adapter_config(const std::filesystem::path& dir) {
  const std::filesystem::path path = dir / kPeftConfigFile;
  const std::string file = path.string();
  json config;
  try {
    config = parse_untrusted_json(file, read_text_file(path));
  } catch (const json::exception& e) {
    fail("{}: not valid JSON: {}", file, e.what());
  }
  if (!config.is_object()) fail("{}: expected a JSON object, got {}", file, config.type_name());

  if (const std::string type = read_key<std::string>(config, file, "peft_type", "LORA"); type != "LORA")
    fail("{}: peft_type is '{}', only LORA adapters are supported", file, type);
  if (read_key<bool>(config, file, "use_dora", false))
    fail("{}: use_dora is true; DoRA adapters are not supported", file);
  if (read_key<bool>(config, file, "fan_in_fan_out", false))
    fail("{}: fan_in_fan_out is true; Mamba's projections are nn.Linear, stored [out, in]", file);
  if (const std::string bias = read_key<std::string>(config, file, "bias", "none"); bias != "none")
    fail("{}: bias is '{}'; ssmtune's adapters train no biases (expected \"none\")", file, bias);
  for (const char* key : {"rank_pattern", "alpha_pattern"})
    if (!read_key<json>(config, file, key, json::object()).empty())
      fail("{}: key '{}' gives some modules their own rank or alpha; ssmtune's adapters have one of each", file, key);
  for (const char* key : {"layers_to_transform", "modules_to_save"})
    if (!read_key<json>(config, file, key, json()).is_null())
      fail("{}: key '{}' is set; ssmtune's adapters cover every layer and no whole modules", file, key);

  LoraConfig lora;
  if (!config.contains("r")) fail("{}: no key 'r' (the LoRA rank)", file);
  lora.rank = read_key<int64_t>(config, file, "r", 0);
  if (lora.rank <= 0) fail("{}: key 'r' must be a positive rank, got {}", file, lora.rank);
  if (!config.contains("lora_alpha")) fail("{}: no key 'lora_alpha'", file);
  lora.alpha = read_key<double>(config, file, "lora_alpha", 0.0);
  lora.dropout = read_key<double>(config, file, "lora_dropout", 0.0);
  lora.rslora = read_key<bool>(config, file, "use_rslora", false);

  if (!config.contains("target_modules")) fail("{}: no key 'target_modules'", file);
  const json& targets = config.at("target_modules");
  std::set<Projection> projections;
  if (targets.is_string()) {
    // PEFT reads a string as a regular expression over module names; a bare projection name matches it alone.
    projections.insert(target_projection(targets.get<std::string>(), file));
  } else if (targets.is_array()) {
    for (const json& name : targets) {
      if (!name.is_string()) fail("{}: target_modules holds {}, expected module names", file, name.dump());
      projections.insert(target_projection(name.get<std::string>(), file));
    }
  } else {
    fail("{}: target_modules is {}, expected a list of module names", file, targets.type_name());
  }
  if (projections.empty()) fail("{}: target_modules is empty", file);
  lora.targets.assign(projections.begin(), projections.end());
  return lora;
}

void load_peft_adapter(const std::filesystem::path& dir, LoraAdapters& adapters) {
  const SafetensorsFile file = SafetensorsFile::open(dir / kPeftWeightsFile);
  std::set<std::string, std::less<>> expected;
  std::vector<double> values(static_cast<size_t>(adapters.numel()));
  for (const AdapterTensor& t : adapters.tensors()) {
    expected.insert(t.peft_key);
    if (!file.contains(t.peft_key))
      fail("{}: no tensor '{}', which target_modules [{}] call for on this base model", file.path().string(),
           t.peft_key, fmt::join(target_names(adapters.config()), ", "));
    const std::vector<int64_t> shape{t.rows, t.cols};
    file.read_double(t.peft_key, shape, values.data() + t.offset);
  }
  for (const std::string& name : file.names())
    if (!expected.contains(name))
      fail("{}: tensor '{}' is not one of the adapter's tensors for target_modules [{}] on this base model",
           file.path().string(), name, fmt::join(target_names(adapters.config()), ", "));
  adapters.upload(adapters.params(), values);
}

}  // namespace ssmtune
