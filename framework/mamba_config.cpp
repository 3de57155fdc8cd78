#include "framework/mamba_config.h"

#include <cmath>
#include <optional>
#include <set>

#include "framework/atomic_file.h"
#include "framework/error.h"
#include "framework/untrusted_json.h"

namespace ssmtune {
namespace {

using nlohmann::json;

// Reads typed keys of one JSON object, remembering which ones it interpreted so that the rest can be
// kept verbatim. `prefix` qualifies nested keys in messages ("ssm_cfg.d_state").
class KeyReader {
 public:
  KeyReader(const json& object, const std::string& source, std::string prefix = "")
      : object_(object), source_(source), prefix_(std::move(prefix)) {}

  bool has(const std::string& key) const { return object_.contains(key); }

  // A missing key takes `default_value`, or is an error when there is none.
  int64_t integer(const std::string& key, std::optional<int64_t> default_value, int64_t minimum = 1) {
    const json* value = find(key);
    if (!value) return default_value ? *default_value : missing(key);
    if (!value->is_number_integer()) bad(key, "must be an integer", *value);
    if (value->is_number_unsigned() && value->get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
      bad(key, "is too large", *value);
    int64_t result = value->get<int64_t>();
    if (result < minimum) bad(key, fmt::format("must be >= {}", minimum), *value);
    return result;
  }

  // `positive`: > 0, otherwise >= 0; always finite.
  double number(const std::string& key, double default_value, bool positive) {
    const json* value = find(key);
    if (!value) return default_value;
    if (!value->is_number()) bad(key, "must be a number", *value);
    double result = value->get<double>();
    if (!std::isfinite(result) || (positive ? result <= 0 : result < 0))
      bad(key, positive ? "must be a finite number > 0" : "must be a finite number >= 0", *value);
    return result;
  }

  bool boolean(const std::string& key, bool default_value) {
    const json* value = find(key);
    if (!value) return default_value;
    if (!value->is_boolean()) bad(key, "must be true or false", *value);
    return value->get<bool>();
  }

  std::string string(const std::string& key, const std::string& default_value) {
    const json* value = find(key);
    if (!value) return default_value;
    if (!value->is_string()) bad(key, "must be a string", *value);
    return value->get<std::string>();
  }

  // "auto" (ceil(d_model/16), as HF and mamba_ssm resolve it) or a positive integer.
  int64_t rank(const std::string& key, int64_t d_model) {
    const json* value = find(key);
    if (!value || (value->is_string() && value->get<std::string>() == "auto")) return (d_model + 15) / 16;
    if (!value->is_number_integer()) bad(key, "must be \"auto\" or an integer", *value);
    return integer(key, std::nullopt);
  }

  const json* object(const std::string& key) {
    const json* value = find(key);
    if (value && !value->is_object()) bad(key, "must be a JSON object", *value);
    return value;
  }

  void mark_used(const std::string& key) { used_.insert(key); }

  json unused_keys() const {
    json rest = json::object();
    for (const auto& [key, value] : object_.items())
      if (!used_.contains(key)) rest[key] = value;
    return rest;
  }

  [[noreturn]] void bad(const std::string& key, std::string_view problem, const json& value) const {
    fail("{}: key '{}{}' {}, got {}", source_, prefix_, key, problem, value.dump());
  }

 private:
  const json* find(const std::string& key) {
    used_.insert(key);
    auto found = object_.find(key);
    return found == object_.end() ? nullptr : &*found;
  }
  [[noreturn]] int64_t missing(const std::string& key) const {
    fail("{}: missing required key '{}{}'", source_, prefix_, key);
  }

  const json& object_;
  const std::string& source_;
  std::string prefix_;
  std::set<std::string> used_;
};

void check_time_step_range(const MambaConfig& config, const std::string& source, const char* min_key,
                           const char* max_key) {
  if (config.time_step_max < config.time_step_min)
    fail("{}: key '{}' ({}) must be >= '{}' ({})", source, max_key, config.time_step_max, min_key,
         config.time_step_min);
}

void check_init_scheme(KeyReader& reader, const std::string& key, const std::string& scheme) {
  if (scheme != "random" && scheme != "constant") reader.bad(key, "must be \"random\" or \"constant\"", scheme);
}

MambaConfig parse_hf(KeyReader& reader, const std::string& source) {
  MambaConfig config;
  config.model_type = reader.string("model_type", "mamba");
  if (config.model_type != "mamba" && config.model_type != "falcon_mamba")
    fail("{}: model_type '{}' is not supported (supported: mamba, falcon_mamba)", source, config.model_type);
  reader.mark_used("architectures");  // always written from model_type
  config.d_model = reader.integer("hidden_size", std::nullopt);
  config.n_layer = reader.integer("num_hidden_layers", std::nullopt);
  config.vocab_size = reader.integer("vocab_size", std::nullopt);
  config.d_state = reader.integer("state_size", 16);
  config.expand = reader.integer("expand", 2);
  config.d_inner = reader.integer("intermediate_size", config.expand * config.d_model);
  config.conv_kernel = reader.integer("conv_kernel", 4);
  config.dt_rank = reader.rank("time_step_rank", config.d_model);
  config.layer_norm_epsilon = reader.number("layer_norm_epsilon", 1e-5, true);
  // The class defaults differ: MambaConfig has use_bias=True, FalconMambaConfig False.
  config.use_bias = reader.boolean("use_bias", !config.has_mixer_norm());
  if (config.has_mixer_norm()) config.mixer_rms_eps = reader.number("mixer_rms_eps", 1e-6, true);
  config.use_conv_bias = reader.boolean("use_conv_bias", true);
  config.residual_in_fp32 = reader.boolean("residual_in_fp32", true);
  config.tie_word_embeddings = reader.boolean("tie_word_embeddings", true);
  config.time_step_min = reader.number("time_step_min", 1e-3, true);
  config.time_step_max = reader.number("time_step_max", 0.1, true);
  config.time_step_floor = reader.number("time_step_floor", 1e-4, false);
  config.time_step_scale = reader.number("time_step_scale", 1.0, true);
  config.time_step_init_scheme = reader.string("time_step_init_scheme", "random");
  check_init_scheme(reader, "time_step_init_scheme", config.time_step_init_scheme);
  check_time_step_range(config, source, "time_step_min", "time_step_max");
  config.extra = reader.unused_keys();
  return config;
}

// mamba_ssm's MambaConfig dataclass: the vocabulary is padded up to pad_vocab_size_multiple as its
// model does, the mixer's settings live in ssm_cfg under the Mamba module's argument names, and there
// is no bias on in_proj/out_proj unless ssm_cfg says so.
MambaConfig parse_mamba_ssm(KeyReader& reader, const json& j, const std::string& source) {
  MambaConfig config;
  config.d_model = reader.integer("d_model", std::nullopt);
  config.n_layer = reader.integer("n_layer", std::nullopt);
  int64_t vocab = reader.integer("vocab_size", std::nullopt);
  int64_t multiple = reader.integer("pad_vocab_size_multiple", 8);
  config.vocab_size = (vocab + multiple - 1) / multiple * multiple;
  if (!reader.boolean("rms_norm", true)) fail("{}: rms_norm false (LayerNorm blocks) is not supported", source);
  reader.mark_used("fused_add_norm");  // a kernel choice, not the architecture
  config.residual_in_fp32 = reader.boolean("residual_in_fp32", true);
  config.tie_word_embeddings = reader.boolean("tie_embeddings", true);
  if (reader.has("attn_layer_idx") && !j["attn_layer_idx"].empty())
    fail("{}: attn_layer_idx: hybrid attention layers are not supported", source);
  reader.mark_used("attn_layer_idx");
  reader.mark_used("attn_cfg");

  static const json no_ssm_cfg = json::object();
  const json* ssm_cfg = reader.object("ssm_cfg");
  KeyReader ssm(ssm_cfg ? *ssm_cfg : no_ssm_cfg, source, "ssm_cfg.");
  std::string layer = ssm.string("layer", "Mamba1");
  if (layer != "Mamba1") fail("{}: ssm_cfg.layer '{}' is not supported (supported: Mamba1)", source, layer);
  config.d_state = ssm.integer("d_state", 16);
  config.conv_kernel = ssm.integer("d_conv", 4);
  config.expand = ssm.integer("expand", 2);
  config.d_inner = config.expand * config.d_model;
  config.dt_rank = ssm.rank("dt_rank", config.d_model);
  config.time_step_min = ssm.number("dt_min", 1e-3, true);
  config.time_step_max = ssm.number("dt_max", 0.1, true);
  config.time_step_init_scheme = ssm.string("dt_init", "random");
  check_init_scheme(ssm, "dt_init", config.time_step_init_scheme);
  config.time_step_scale = ssm.number("dt_scale", 1.0, true);
  config.time_step_floor = ssm.number("dt_init_floor", 1e-4, false);
  config.use_conv_bias = ssm.boolean("conv_bias", true);
  config.use_bias = ssm.boolean("bias", false);
  check_time_step_range(config, source, "ssm_cfg.dt_min", "ssm_cfg.dt_max");
  config.extra = reader.unused_keys();
  return config;
}

}  // namespace

MambaConfig parse_mamba_config(const json& j, const std::string& source_name) {
  if (!j.is_object()) fail("{}: expected a JSON object, got {}", source_name, j.type_name());
  KeyReader reader(j, source_name);
  bool is_mamba_ssm_format = !j.contains("model_type") && !j.contains("hidden_size") && j.contains("d_model");
  return is_mamba_ssm_format ? parse_mamba_ssm(reader, j, source_name) : parse_hf(reader, source_name);
}

MambaConfig load_mamba_config(const std::filesystem::path& config_json) {
  std::string text = read_text_file(config_json);
  json j;
  try {
    j = parse_untrusted_json(config_json.string(), text);
  } catch (const json::parse_error& e) {
    fail("{}: invalid JSON: {}", config_json.string(), e.what());
  }
  return parse_mamba_config(j, config_json.string());
}

json mamba_config_to_json(const MambaConfig& config) {
  if (!config.extra.is_null() && !config.extra.is_object())
    fail("MambaConfig to be written: extra must be a JSON object, got {}", config.extra.type_name());
  json j = config.extra.is_object() ? config.extra : json::object();
  j["architectures"] = {config.has_mixer_norm() ? "FalconMambaForCausalLM" : "MambaForCausalLM"};
  j["model_type"] = config.model_type;
  j["hidden_size"] = config.d_model;
  j["num_hidden_layers"] = config.n_layer;
  j["state_size"] = config.d_state;
  j["expand"] = config.expand;
  j["intermediate_size"] = config.d_inner;
  j["conv_kernel"] = config.conv_kernel;
  j["time_step_rank"] = config.dt_rank;
  j["vocab_size"] = config.vocab_size;
  j["layer_norm_epsilon"] = config.layer_norm_epsilon;
  j["use_bias"] = config.use_bias;
  j["use_conv_bias"] = config.use_conv_bias;
  j["residual_in_fp32"] = config.residual_in_fp32;
  j["tie_word_embeddings"] = config.tie_word_embeddings;
  j["time_step_min"] = config.time_step_min;
  j["time_step_max"] = config.time_step_max;
  j["time_step_floor"] = config.time_step_floor;
  j["time_step_scale"] = config.time_step_scale;
  j["time_step_init_scheme"] = config.time_step_init_scheme;
  if (config.has_mixer_norm()) j["mixer_rms_eps"] = config.mixer_rms_eps;
  parse_mamba_config(j, "MambaConfig to be written");
  return j;
}

}  // namespace ssmtune
