// The architecture of a Mamba-1 model as Hugging Face's config.json describes it (REFERENCE.md §1).
// Absent keys take HF MambaConfig's defaults, except the sizes that have no sensible default
// (hidden_size, num_hidden_layers, vocab_size), which are required. The original mamba_ssm config
// (d_model, n_layer, ssm_cfg, no model_type) is accepted too and converted to the same fields.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>

namespace ssmtune {

struct MambaConfig {
  std::string model_type = "mamba";
  int64_t d_model = 0, n_layer = 0, d_state = 16, expand = 2, d_inner = 0, conv_kernel = 4, dt_rank = 0,
          vocab_size = 0;
  double layer_norm_epsilon = 1e-5;
  // The released checkpoints have no in_proj/out_proj bias; a config.json without "use_bias" still
  // means true, as HF's class default.
  bool use_bias = false, use_conv_bias = true, residual_in_fp32 = true, tie_word_embeddings = true;
  // Initialization of dt_proj for training from scratch.
  double time_step_min = 1e-3, time_step_max = 0.1, time_step_floor = 1e-4, time_step_scale = 1.0;
  std::string time_step_init_scheme = "random";  // "random" or "constant"
  nlohmann::json extra = nlohmann::json::object();  // keys we do not interpret, written back unchanged
};

// Errors (ssmtune::Error) name the file and, where one is at fault, the key: a missing file, malformed
// JSON (with the parser's position), a missing required key, a value of the wrong type or out of
// range, an unsupported model_type.
MambaConfig load_mamba_config(const std::filesystem::path& config_json);
MambaConfig parse_mamba_config(const nlohmann::json& j, const std::string& source_name);

// HF field names (hidden_size, num_hidden_layers, state_size, expand, intermediate_size, conv_kernel,
// time_step_rank, vocab_size, ...), architectures ["MambaForCausalLM"] and model_type, on top of
// `extra`. The result is checked as a loaded config would be, so a config that could not be loaded
// back (e.g. dt_rank or d_inner left at 0) is an Error here.
nlohmann::json mamba_config_to_json(const MambaConfig& config);

}  // namespace ssmtune
