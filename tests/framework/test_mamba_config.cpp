#include "framework/mamba_config.h"

#include <fstream>
#include <string>

#include "framework/error.h"
#include "framework/model_sizes.h"
#include "tests/catch.h"
#include "tests/framework/error_message.h"
#include "tests/framework/scratch_dir.h"

using namespace ssmtune;
using nlohmann::json;
using ssmtune::test::ScratchDir;

namespace {

using test::contains;
using test::error_message;

// state-spaces/mamba-130m-hf's config.json as published (transformers 4.39).
const char* kMamba130mHf = R"({
  "architectures": ["MambaForCausalLM"], "bos_token_id": 0, "conv_kernel": 4, "d_inner": 1536,
  "d_model": 768, "eos_token_id": 0, "expand": 2, "fused_add_norm": true, "hidden_act": "silu",
  "hidden_size": 768, "initializer_range": 0.1, "intermediate_size": 1536, "layer_norm_epsilon": 1e-05,
  "model_type": "mamba", "n_layer": 24, "num_hidden_layers": 24, "pad_token_id": 0,
  "pad_vocab_size_multiple": 8, "rescale_prenorm_residual": false, "residual_in_fp32": true,
  "rms_norm": true, "ssm_cfg": {}, "state_size": 16, "time_step_floor": 0.0001,
  "time_step_init_scheme": "random", "time_step_max": 0.1, "time_step_min": 0.001, "time_step_rank": 48,
  "time_step_scale": 1.0, "torch_dtype": "float32", "transformers_version": "4.39.0.dev0",
  "use_bias": false, "use_cache": true, "use_conv_bias": true, "vocab_size": 50280
})";

// tiiuae/falcon-mamba-7b's config.json as published (transformers 4.43): expand 16 is inconsistent with
// intermediate_size 8192 = 2 * 4096, and HF takes intermediate_size; no mixer_rms_eps (default 1e-6).
const char* kFalconMamba7b = R"({
  "_name_or_path": "./", "architectures": ["FalconMambaForCausalLM"], "bos_token_id": 0, "conv_kernel": 4,
  "eos_token_id": 11, "expand": 16, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.1,
  "intermediate_size": 8192, "layer_norm_epsilon": 1e-05, "model_type": "falcon_mamba", "num_hidden_layers": 64,
  "pad_token_id": 11, "rescale_prenorm_residual": false, "residual_in_fp32": true, "state_size": 16,
  "tie_word_embeddings": false, "time_step_floor": 0.0001, "time_step_init_scheme": "random",
  "time_step_max": 0.1, "time_step_min": 0.001, "time_step_rank": 256, "time_step_scale": 1.0,
  "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0", "use_bias": false, "use_cache": true,
  "use_conv_bias": true, "vocab_size": 65024
})";

json minimal() { return {{"model_type", "mamba"}, {"hidden_size", 64}, {"num_hidden_layers", 2}, {"vocab_size", 100}}; }


}  // namespace

TEST_CASE("mamba-130m-hf's config.json") {
  ScratchDir dir("mamba_config");
  const auto path = dir / "config.json";
  std::ofstream(path) << kMamba130mHf;
  MambaConfig config = load_mamba_config(path);
  CHECK(config.model_type == "mamba");
  CHECK(config.d_model == 768);
  CHECK(config.n_layer == 24);
  CHECK(config.d_state == 16);
  CHECK(config.expand == 2);
  CHECK(config.d_inner == 1536);
  CHECK(config.conv_kernel == 4);
  CHECK(config.dt_rank == 48);
  CHECK(config.vocab_size == 50280);
  CHECK(config.layer_norm_epsilon == 1e-5);
  CHECK(!config.use_bias);
  CHECK(config.use_conv_bias);
  CHECK(config.residual_in_fp32);
  CHECK(config.tie_word_embeddings);
  CHECK(config.time_step_min == 1e-3);
  CHECK(config.time_step_max == 0.1);
  CHECK(config.time_step_floor == 1e-4);
  CHECK(config.time_step_scale == 1.0);
  CHECK(config.time_step_init_scheme == "random");
  CHECK(config.extra.at("pad_vocab_size_multiple") == 8);
  CHECK(config.extra.at("torch_dtype") == "float32");
  CHECK(!config.extra.contains("hidden_size"));
  CHECK(!config.extra.contains("architectures"));

  // Writing it back gives the same keys and values, plus tie_word_embeddings, which the file leaves
  // to its default.
  json expected = json::parse(kMamba130mHf);
  expected["tie_word_embeddings"] = true;
  CHECK(mamba_config_to_json(config) == expected);
}

TEST_CASE("absent keys take HF MambaConfig's defaults") {
  MambaConfig config = parse_mamba_config(minimal(), "test");
  CHECK(config.d_state == 16);
  CHECK(config.expand == 2);
  CHECK(config.d_inner == 128);
  CHECK(config.conv_kernel == 4);
  CHECK(config.dt_rank == 4);  // "auto": ceil(64 / 16)
  CHECK(config.layer_norm_epsilon == 1e-5);
  CHECK(config.use_bias);  // HF's class default, unlike the released checkpoints
  CHECK(config.use_conv_bias);
  CHECK(config.residual_in_fp32);
  CHECK(config.tie_word_embeddings);
  CHECK(config.time_step_min == 1e-3);
  CHECK(config.time_step_max == 0.1);
  CHECK(config.time_step_floor == 1e-4);
  CHECK(config.time_step_scale == 1.0);
  CHECK(config.time_step_init_scheme == "random");
  CHECK(!config.has_mixer_norm());
  CHECK(config.extra == json::object());

  json no_model_type = minimal();
  no_model_type.erase("model_type");
  CHECK(parse_mamba_config(no_model_type, "test").model_type == "mamba");
}

TEST_CASE("falcon-mamba-7b's config.json") {
  ScratchDir dir("mamba_config");
  const auto path = dir / "config.json";
  std::ofstream(path) << kFalconMamba7b;
  MambaConfig config = load_mamba_config(path);
  CHECK(config.model_type == "falcon_mamba");
  CHECK(config.has_mixer_norm());
  CHECK(config.mixer_rms_eps == 1e-6);
  CHECK(config.d_model == 4096);
  CHECK(config.n_layer == 64);
  CHECK(config.expand == 16);
  CHECK(config.d_inner == 8192);  // intermediate_size, not expand * hidden_size
  CHECK(config.dt_rank == 256);
  CHECK(config.vocab_size == 65024);
  CHECK(!config.use_bias);
  CHECK(!config.tie_word_embeddings);
  CHECK(config.extra.at("torch_dtype") == "bfloat16");
  CHECK(!config.extra.contains("architectures"));

  // Written back: the same keys and values, plus mixer_rms_eps, which the file leaves to its default.
  json expected = json::parse(kFalconMamba7b);
  expected["mixer_rms_eps"] = 1e-6;
  CHECK(mamba_config_to_json(config) == expected);
}

TEST_CASE("falcon_mamba takes FalconMambaConfig's defaults and its mixer_rms_eps") {
  json j = minimal();
  j["model_type"] = "falcon_mamba";
  MambaConfig config = parse_mamba_config(j, "test");
  CHECK(config.has_mixer_norm());
  CHECK(config.mixer_rms_eps == 1e-6);
  CHECK(!config.use_bias);  // FalconMambaConfig's class default, unlike MambaConfig's
  CHECK(config.tie_word_embeddings);
  CHECK(config.d_inner == 128);
  CHECK(mamba_config_to_json(config).at("architectures") == json{"FalconMambaForCausalLM"});

  j["mixer_rms_eps"] = 1e-5;
  config = parse_mamba_config(j, "test");
  CHECK(config.mixer_rms_eps == 1e-5);
  CHECK(mamba_config_to_json(config).at("mixer_rms_eps") == 1e-5);
  j["mixer_rms_eps"] = 0.0;
  CHECK(contains(error_message([&] { parse_mamba_config(j, "test"); }),
                 "test: key 'mixer_rms_eps' must be a finite number > 0, got 0.0"));
  j["mixer_rms_eps"] = "small";
  CHECK(contains(error_message([&] { parse_mamba_config(j, "test"); }), "key 'mixer_rms_eps' must be a number"));

  // A plain Mamba model has no mixer norm: the key is kept as an unknown one, not interpreted.
  json plain = minimal();
  plain["mixer_rms_eps"] = 1e-5;
  config = parse_mamba_config(plain, "test");
  CHECK(!config.has_mixer_norm());
  CHECK(config.extra.at("mixer_rms_eps") == 1e-5);
  CHECK(mamba_config_to_json(config).at("architectures") == json{"MambaForCausalLM"});
}

TEST_CASE("intermediate_size, when present, is d_inner whatever expand says, as in HF") {
  json j = minimal();
  j["intermediate_size"] = 96;
  MambaConfig config = parse_mamba_config(j, "test");
  CHECK(config.d_inner == 96);
  CHECK(config.expand == 2);
  const json written = mamba_config_to_json(config);
  CHECK(written.at("intermediate_size") == 96);
  CHECK(written.at("expand") == 2);
}

TEST_CASE("the falcon-mamba sizes write falcon_mamba configs that load back") {
  for (const char* size : {"falcon-demo", "falcon-mamba-7b"}) {
    INFO(size);
    const MambaConfig config = parse_mamba_config(mamba_config_to_json(model_size(size)), size);
    CHECK(config.has_mixer_norm());
    CHECK(!config.tie_word_embeddings);
    CHECK(!config.use_bias);
  }
  const MambaConfig falcon7b = model_size("falcon-mamba-7b");
  CHECK(falcon7b.d_model == 4096);
  CHECK(falcon7b.n_layer == 64);
  CHECK(falcon7b.d_inner == 8192);
  CHECK(falcon7b.dt_rank == 256);
  CHECK(falcon7b.vocab_size == 65024);
  CHECK(!model_size("demo").has_mixer_norm());
}

TEST_CASE("time_step_rank \"auto\" rounds up and an integer is taken as is") {
  json j = minimal();
  j["hidden_size"] = 100;
  j["time_step_rank"] = "auto";
  CHECK(parse_mamba_config(j, "test").dt_rank == 7);  // ceil(100 / 16)
  j["hidden_size"] = 2560;
  CHECK(parse_mamba_config(j, "test").dt_rank == 160);
  j["time_step_rank"] = 5;
  CHECK(parse_mamba_config(j, "test").dt_rank == 5);
}

TEST_CASE("a config survives writing and reading, extra keys included") {
  MambaConfig config = parse_mamba_config(minimal(), "test");
  config.n_layer = 3;
  config.use_bias = false;
  config.tie_word_embeddings = false;
  config.time_step_init_scheme = "constant";
  config.extra["quantization_config"] = {{"quant_method", "bitsandbytes"}};
  json written = mamba_config_to_json(config);
  CHECK(written.at("architectures") == json{"MambaForCausalLM"});
  CHECK(written.at("num_hidden_layers") == 3);
  CHECK(written.at("intermediate_size") == 128);
  CHECK(written.at("time_step_rank") == 4);
  CHECK(written.at("quantization_config").at("quant_method") == "bitsandbytes");
  MambaConfig back = parse_mamba_config(written, "written");
  CHECK(back.n_layer == 3);
  CHECK(!back.use_bias);
  CHECK(!back.tie_word_embeddings);
  CHECK(back.time_step_init_scheme == "constant");
  CHECK(back.extra == config.extra);
  CHECK(mamba_config_to_json(back) == written);

  MambaConfig unresolved;  // dt_rank and d_inner left at 0
  unresolved.d_model = 64;
  unresolved.n_layer = 2;
  unresolved.vocab_size = 100;
  CHECK(contains(error_message([&] { mamba_config_to_json(unresolved); }), "intermediate_size"));
}

TEST_CASE("the original mamba_ssm config.json is converted") {
  // state-spaces/mamba-130m's config.json: vocabulary padded from 50277 to a multiple of 8.
  json j = json::parse(R"({"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {}, "rms_norm": true,
                           "residual_in_fp32": true, "fused_add_norm": true, "pad_vocab_size_multiple": 8})");
  MambaConfig config = parse_mamba_config(j, "mamba-130m");
  CHECK(config.d_model == 768);
  CHECK(config.n_layer == 24);
  CHECK(config.vocab_size == 50280);
  CHECK(config.dt_rank == 48);
  CHECK(config.d_inner == 1536);
  CHECK(!config.use_bias);
  CHECK(config.use_conv_bias);
  CHECK(config.tie_word_embeddings);
  CHECK(config.extra == json::object());

  j["ssm_cfg"] = {{"d_state", 8}, {"dt_rank", 10}, {"bias", true}, {"dt_init", "constant"}};
  config = parse_mamba_config(j, "custom");
  CHECK(config.d_state == 8);
  CHECK(config.dt_rank == 10);
  CHECK(config.use_bias);
  CHECK(config.time_step_init_scheme == "constant");

  j["ssm_cfg"] = {{"d_state", 0}};
  CHECK(contains(error_message([&] { parse_mamba_config(j, "custom"); }), "key 'ssm_cfg.d_state' must be >= 1"));
  j["ssm_cfg"] = {{"layer", "Mamba2"}};
  CHECK(contains(error_message([&] { parse_mamba_config(j, "custom"); }), "ssm_cfg.layer 'Mamba2' is not supported"));
}

TEST_CASE("config errors name the file and the key") {
  ScratchDir dir("mamba_config");
  const auto missing = dir / "missing.json";
  std::string message = error_message([&] { load_mamba_config(missing); });
  CHECK(contains(message, missing.string()));
  CHECK(contains(message, "No such file or directory"));

  const auto malformed = dir / "malformed.json";
  std::ofstream(malformed) << "{\n  \"hidden_size\": 768,\n  \"num_hidden_layers\": ,\n}";
  message = error_message([&] { load_mamba_config(malformed); });
  INFO(message);
  CHECK(contains(message, malformed.string() + ": invalid JSON"));
  CHECK(contains(message, "line 3"));

  const auto array = dir / "array.json";
  std::ofstream(array) << "[1, 2]";
  CHECK(contains(error_message([&] { load_mamba_config(array); }), array.string() + ": expected a JSON object"));

  // A key we do not read, kept in MambaConfig::extra, nested 200 levels deep: copying or printing it
  // would recurse once per level, so the reader refuses it with the limit of untrusted_json.h.
  const auto deep = dir / "deep.json";
  std::string text = minimal().dump();
  text.insert(text.size() - 1, R"(, "notes": )" + std::string(200, '[') + std::string(200, ']'));
  std::ofstream(deep) << text;
  CHECK(error_message([&] { load_mamba_config(deep); }) == deep.string() + ": JSON nested deeper than 128 levels");
  const auto overflow = dir / "overflow.json";
  std::ofstream(overflow) << R"({"model_type": "mamba", "hidden_size": 1e999, "num_hidden_layers": 2})";
  message = error_message([&] { load_mamba_config(overflow); });
  CHECK(contains(message, overflow.string() + ": "));
  CHECK(contains(message, "number overflow parsing '1e999'"));

  struct BadKey {
    const char* key;
    json value;  // null: remove the key
    const char* phrase;
  };
  const std::vector<BadKey> cases{
      {"hidden_size", nullptr, "missing required key 'hidden_size'"},
      {"num_hidden_layers", nullptr, "missing required key 'num_hidden_layers'"},
      {"vocab_size", nullptr, "missing required key 'vocab_size'"},
      {"hidden_size", 0, "key 'hidden_size' must be >= 1, got 0"},
      {"hidden_size", "768", "key 'hidden_size' must be an integer, got \"768\""},
      {"hidden_size", 76.8, "key 'hidden_size' must be an integer"},
      {"state_size", -16, "key 'state_size' must be >= 1"},
      {"expand", true, "key 'expand' must be an integer"},
      {"time_step_rank", "big", "key 'time_step_rank' must be \"auto\" or an integer"},
      {"time_step_rank", 0, "key 'time_step_rank' must be >= 1"},
      {"intermediate_size", 0, "key 'intermediate_size' must be >= 1, got 0"},
      {"layer_norm_epsilon", 0.0, "key 'layer_norm_epsilon' must be a finite number > 0"},
      {"layer_norm_epsilon", "1e-5", "key 'layer_norm_epsilon' must be a number"},
      {"time_step_floor", -1.0, "key 'time_step_floor' must be a finite number >= 0"},
      {"time_step_max", 1e-4, "key 'time_step_max' (0.0001) must be >= 'time_step_min' (0.001)"},
      {"time_step_init_scheme", "uniform", "key 'time_step_init_scheme' must be \"random\" or \"constant\""},
      {"use_bias", "false", "key 'use_bias' must be true or false"},
      {"tie_word_embeddings", 1, "key 'tie_word_embeddings' must be true or false"},
      {"model_type", "gpt2", "model_type 'gpt2' is not supported (supported: mamba, falcon_mamba)"},
      {"model_type", 7, "key 'model_type' must be a string"},
  };
  for (const BadKey& bad : cases) {
    json j = minimal();
    if (bad.value.is_null()) j.erase(bad.key);
    else j[bad.key] = bad.value;
    const auto path = dir / "config.json";
    std::ofstream(path) << j.dump();
    message = error_message([&] { load_mamba_config(path); });
    INFO("key " << bad.key << "\nmessage: " << message);
    CHECK(contains(message, path.string() + ": "));
    CHECK(contains(message, bad.phrase));
  }
}
