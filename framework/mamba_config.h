// The architecture of a Mamba-1 model as Hugging Face's config.json describes it (REFERENCE.md §1):
// model_type "mamba" (MambaConfig) or "falcon_mamba" (FalconMambaConfig: the same model plus a
// weightless RMSNorm of dt_r, B and C inside the mixer). Absent keys take the HF class's defaults,
// except the sizes that have no sensible default (hidden_size, num_hidden_layers, vocab_size), which
// are required. The original mamba_ssm config (d_model, n_layer, ssm_cfg, no model_type) is accepted
// too and converted to the same fields.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>

#include <nlohmann/json.hpp>

namespace ssmtune {

struct MambaConfig {
  std::string model_type = "mamba";  // or "falcon_mamba"
  int64_t d_model = 0, n_layer = 0, d_state = 16, expand = 2, d_inner = 0, conv_kernel = 4, dt_rank = 0,
          vocab_size = 0;
  // d_inner is intermediate_size when the file has it, whatever expand says: HF derives expand *
  // hidden_size and then lets the file's intermediate_size override it (falcon-mamba-7b's config.json
  // has expand 16 with intermediate_size 8192 = 2 * 4096); expand is kept only to be written back.
  double layer_norm_epsilon = 1e-5;
  // The released checkpoints have no in_proj/out_proj bias; a config.json without "use_bias" still
  // means true, as HF's class default.
  bool use_bias = false, use_conv_bias = true, residual_in_fp32 = true, tie_word_embeddings = true;
  // Initialization of dt_proj for training from scratch.
  double time_step_min = 1e-3, time_step_max = 0.1, time_step_floor = 1e-4, time_step_scale = 1.0;
  std::string time_step_init_scheme = "random";  // "random" or "constant"
  // falcon_mamba only: eps of the weightless RMSNorm applied to dt_r, B and C right after x_proj.
  double mixer_rms_eps = 1e-6;
  nlohmann::json extra = nlohmann::json::object();  // keys we do not interpret, written back unchanged

  bool has_mixer_norm() const { return model_type == "falcon_mamba"; }
};

// Errors (ssmtune::Error) name the file and, where one is at fault, the key: a missing file, malformed
// JSON (with the parser's position), a missing required key, a value of the wrong type or out of
// range, an unsupported model_type.
MambaConfig load_mamba_config(const std::filesystem::path& config_json);
MambaConfig parse_mamba_config(const nlohmann::json& j, const std::string& source_name);

// HF field names (hidden_size, num_hidden_layers, state_size, expand, intermediate_size, conv_kernel,
// time_step_rank, vocab_size, ..., mixer_rms_eps for falcon_mamba), model_type and architectures
// (["MambaForCausalLM"] or ["FalconMambaForCausalLM"]), on top of `extra`. The result is checked as a
// loaded config would be, so a config that could not be loaded back (e.g. dt_rank or d_inner left at 0)
// is an Error here.
nlohmann::json mamba_config_to_json(const MambaConfig& config);

}  // namespace ssmtune
