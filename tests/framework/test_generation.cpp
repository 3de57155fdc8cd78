// Recurrent decoding (framework/generation.h) on the CPU backend: token by token it gives the logits of
// the full-sequence forward (TrainStep::forward_logits) for the demo Mamba and falcon-mamba with non-zero adapters
// on every projection; the sampler's greedy, nucleus and seeded behaviour; generate's stop and length;
// and PEFT adapter import (framework/peft_import.h): the values come back exactly, and every malformed
// adapter is an Error naming the file and the key or tensor.
#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <map>
#include <random>

#include "framework/cpu_backend.h"
#include "framework/error.h"
#include "framework/generation.h"
#include "framework/lora.h"
#include "framework/mamba_model.h"
#include "framework/model_sizes.h"
#include "framework/peft_export.h"
#include "framework/peft_import.h"
#include "framework/safetensors.h"
#include "framework/train_step.h"
#include "tests/catch.h"
#include "tests/framework/error_message.h"
#include "tests/framework/scratch_dir.h"
#include "tests/kernels/finite_difference.h"

using namespace ssmtune;
namespace fs = std::filesystem;

namespace {

LoraConfig tiny_lora() {
  LoraConfig lora;
  lora.rank = 2;
  lora.alpha = 3;  // scale 1.5
  return lora;
}

// Random values for every adapter tensor (PEFT's init has B = 0, which would hide the adapters' effect).
std::vector<double> random_adapter_values(const LoraAdapters& adapters, uint64_t seed) {
  std::mt19937_64 rng(seed);
  return test::random_values(static_cast<size_t>(adapters.numel()), rng, -0.5, 0.5);
}

double relative_max_error(std::span<const double> a, std::span<const double> b) {
  double diff = 0, scale = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    diff = std::max(diff, std::abs(a[i] - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  return diff / scale;
}

// The model, its adapters and a prompt; the full-sequence logits from TrainStep, the recurrent ones from
// a Decoder fed the prompt token by token.
void check_recurrent_equals_full(const std::string& size, DType scalar, double tolerance) {
  INFO(size << ", " << dtype_name(scalar));
  test::ScratchDir dir("generation");
  const MambaConfig config = model_size(size);
  write_random_mamba(dir / "model", config, 5);
  const std::unique_ptr<Backend> backend = make_cpu_backend(scalar);
  const MambaWeights weights = MambaWeights::load(dir / "model", *backend);
  LoraAdapters adapters(*backend, config, tiny_lora());
  adapters.upload(adapters.params(), random_adapter_values(adapters, 9));

  const int64_t len = 10;
  std::mt19937_64 rng(4);
  std::vector<uint32_t> tokens(static_cast<size_t>(len));
  for (uint32_t& t : tokens) t = static_cast<uint32_t>(rng() % config.vocab_size);
  TrainStep step(*backend, weights, adapters, StepShape{1, len, 4, true, 5});  // chunks of 4 over 10 tokens
  const std::vector<double> full = step.forward_logits(tokens.data());

  Decoder decoder(*backend, weights, &adapters);
  for (int pass = 0; pass < 2; ++pass) {  // the second after reset(): nothing of the first remains
    for (int64_t t = 0; t < len; ++t) {
      decoder.feed(tokens[t]);
      const std::span<const double> row(full.data() + t * config.vocab_size, static_cast<size_t>(config.vocab_size));
      const double error = relative_max_error(decoder.next_logits(), row);
      INFO("pass " << pass << ", token " << t << ": relative error " << error);
      CHECK(error <= tolerance);
    }
    CHECK(decoder.position() == len);
    decoder.reset();
  }
}

// f throws an Error whose message contains every fragment.
template <typename F>
void require_error(F&& f, const std::vector<std::string>& fragments) {
  const std::string message = test::error_message(f);
  INFO("error: " << message);
  REQUIRE(!message.empty());
  for (const std::string& fragment : fragments) CHECK(test::contains(message, fragment));
}

// Logits whose softmax at temperature 1 is `probabilities`.
std::vector<double> logits_of(const std::vector<double>& probabilities) {
  std::vector<double> logits;
  for (double p : probabilities) logits.push_back(std::log(p) + 2.0);
  return logits;
}

std::map<uint32_t, int> draw_counts(Sampler& sampler, const std::vector<double>& logits, int draws) {
  std::map<uint32_t, int> counts;
  for (int i = 0; i < draws; ++i) ++counts[sampler.next(logits)];
  return counts;
}

}  // namespace

TEST_CASE("decoding token by token gives the full-sequence logits") {
  // fp64: the step ops evaluate the full-sequence expressions in the same order (kernels/cpu/
  // recurrent_step.h) and every other op works row by row, so only the order-independent parts could
  // differ: 1e-12 of the largest logit is ~1e4 ulps, far below any wrong term. fp32 the same at 1e-5.
  for (const std::string size : {"demo", "falcon-demo"}) {
    check_recurrent_equals_full(size, DType::F64, 1e-12);
    check_recurrent_equals_full(size, DType::F32, 1e-5);
  }
}

TEST_CASE("the sampler: greedy, seeded, nucleus and vocab limit") {
  const std::vector<double> probabilities{0.05, 0.5, 0.3, 0.15};
  const std::vector<double> logits = logits_of(probabilities);

  Sampler greedy({0.0, 1.0, 7, 0}, 4);
  for (int i = 0; i < 5; ++i) CHECK(greedy.next(logits) == 1);
  Sampler tie({0.0, 1.0, 7, 0}, 3);
  CHECK(tie.next(std::vector<double>{1.0, 3.0, 3.0}) == 1);  // the lowest id of equal maxima

  // The same seed draws the same tokens; another seed other ones.
  auto draws = [&](uint64_t seed) {
    Sampler s({1.0, 1.0, seed, 0}, 4);
    std::vector<uint32_t> out;
    for (int i = 0; i < 40; ++i) out.push_back(s.next(logits));
    return out;
  };
  CHECK(draws(3) == draws(3));
  CHECK(draws(3) != draws(4));

  // Temperature 1: frequencies follow the softmax. 20000 draws: the standard error of a frequency is at
  // most 0.0035, so 0.02 is over five of them.
  const int n = 20000;
  Sampler plain({1.0, 1.0, 11, 0}, 4);
  std::map<uint32_t, int> counts = draw_counts(plain, logits, n);
  for (uint32_t id = 0; id < 4; ++id) CHECK(std::abs(counts[id] / double(n) - probabilities[id]) < 0.02);

  // top_p 0.75: the nucleus is {1, 2} (0.5 + 0.3 >= 0.75), renormalised to 0.625 / 0.375.
  Sampler nucleus({1.0, 0.75, 11, 0}, 4);
  counts = draw_counts(nucleus, logits, n);
  CHECK(counts[0] == 0);
  CHECK(counts[3] == 0);
  CHECK(std::abs(counts[1] / double(n) - 0.625) < 0.02);
  // A nucleus smaller than the top token is the top token.
  Sampler narrow({1.0, 0.01, 11, 0}, 4);
  CHECK(draw_counts(narrow, logits, 100)[1] == 100);

  // Temperature T scales the logits by 1/T: at T = 0.25 token i has probability p_i^4 / sum p^4 (0.88 for id 1).
  Sampler sharp({0.25, 1.0, 11, 0}, 4);
  double sum_p4 = 0;
  for (double p : probabilities) sum_p4 += std::pow(p, 4);
  CHECK(std::abs(draw_counts(sharp, logits, n)[1] / double(n) - std::pow(0.5, 4) / sum_p4) < 0.02);

  // Ids at or past vocab_limit are never drawn, however likely.
  Sampler limited({1.0, 1.0, 11, 2}, 4);
  counts = draw_counts(limited, logits, 1000);
  CHECK(counts[0] + counts[1] == 1000);

  CHECK_THROWS_AS(Sampler({-1.0, 1.0, 0, 0}, 4), Error);
  CHECK_THROWS_AS(Sampler({1.0, 0.0, 0, 0}, 4), Error);
  CHECK_THROWS_AS(Sampler({1.0, 1.5, 0, 0}, 4), Error);
}

TEST_CASE("generate: the prompt, max_new_tokens, the stop token and seeds") {
  test::ScratchDir dir("generate");
  const MambaConfig config = model_size("demo");
  write_random_mamba(dir / "model", config, 5);
  const std::unique_ptr<Backend> backend = make_cpu_backend(DType::F32);
  const MambaWeights weights = MambaWeights::load(dir / "model", *backend);
  Decoder decoder(*backend, weights, nullptr);
  const std::vector<uint32_t> prompt{3, 1, 4};

  GenerationOptions greedy;
  greedy.max_new_tokens = 12;
  greedy.sampling.temperature = 0;
  std::vector<uint32_t> streamed;
  const std::vector<uint32_t> first = generate(decoder, prompt, greedy, [&](uint32_t t) { streamed.push_back(t); });
  CHECK(first.size() == 12);
  CHECK(streamed == first);
  CHECK(generate(decoder, prompt, greedy) == first);  // a new sequence each call: the same tokens

  // Greedy decoding is the argmax of the recurrent logits of prompt + the tokens so far.
  decoder.reset();
  for (uint32_t t : prompt) decoder.feed(t);
  for (uint32_t expected : first) {
    const std::span<const double> logits = decoder.next_logits();
    CHECK(static_cast<uint32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin()) == expected);
    decoder.feed(expected);
  }

  // The stop token ends generation and is not returned.
  GenerationOptions stopping = greedy;
  stopping.stop_token = first[4];
  const std::vector<uint32_t> stopped = generate(decoder, prompt, stopping);
  const size_t first_stop = std::find(first.begin(), first.end(), first[4]) - first.begin();
  CHECK(stopped == std::vector<uint32_t>(first.begin(), first.begin() + first_stop));

  GenerationOptions sampled;
  sampled.max_new_tokens = 30;
  sampled.sampling.seed = 5;
  CHECK(generate(decoder, prompt, sampled) == generate(decoder, prompt, sampled));
  GenerationOptions other_seed = sampled;
  other_seed.sampling.seed = 6;
  CHECK(generate(decoder, prompt, sampled) != generate(decoder, prompt, other_seed));

  GenerationOptions none = greedy;
  none.max_new_tokens = 0;
  CHECK(generate(decoder, prompt, none).empty());
  CHECK_THROWS_AS(generate(decoder, std::vector<uint32_t>{}, greedy), Error);
  require_error(
      [&] {
        generate(decoder, std::vector<uint32_t>{2, 64}, greedy);
      },
      {"token id 64", "position 1", "vocab_size 64"});
}

namespace {

// A PEFT adapter directory as PEFT's save_pretrained writes one: the config and the adapters' tensors
// under their PEFT keys, F32.
struct PeftDir {
  test::ScratchDir dir{"peft-import"};
  nlohmann::json config = {{"peft_type", "LORA"},
                           {"task_type", "CAUSAL_LM"},
                           {"r", 2},
                           {"lora_alpha", 3},
                           {"lora_dropout", 0.0},
                           {"bias", "none"},
                           {"use_rslora", false},
                           {"use_dora", false},
                           {"fan_in_fan_out", false},
                           {"target_modules", {"x_proj", "in_proj", "out_proj", "dt_proj"}}};
  void write_config() const { std::ofstream(dir / kPeftConfigFile) << config.dump(2); }
  // Writes the tensors of `adapters` with `values`; `edit` may change a name or shape, or add a tensor.
  template <typename Edit>
  void write_tensors(const LoraAdapters& adapters, const std::vector<double>& values, Edit edit) const {
    SafetensorsWriter writer;
    for (const AdapterTensor& t : adapters.tensors()) {
      std::string name = t.peft_key;
      std::vector<int64_t> shape{t.rows, t.cols};
      std::vector<float> data(values.begin() + t.offset, values.begin() + t.offset + t.numel());
      if (!edit(name, shape, data, writer)) writer.add_float_as(name, DType::F32, shape, data.data());
    }
    writer.write(dir / kPeftWeightsFile);
  }
};

bool unchanged(std::string&, std::vector<int64_t>&, std::vector<float>&, SafetensorsWriter&) { return false; }

}  // namespace

TEST_CASE("a PEFT adapter directory loads back into the adapters' layout") {
  const MambaConfig config = model_size("demo");
  const std::unique_ptr<Backend> backend = make_cpu_backend(DType::F64);
  PeftDir peft;
  peft.write_config();
  const LoraConfig lora = read_peft_adapter_config(peft.dir.path());
  CHECK(lora.rank == 2);
  CHECK(lora.alpha == 3);
  CHECK(lora.targets.size() == 4);
  LoraAdapters source(*backend, config, lora);
  std::vector<double> values = random_adapter_values(source, 2);
  for (double& v : values) v = static_cast<float>(v);  // stored as F32
  peft.write_tensors(source, values, unchanged);

  LoraAdapters loaded(*backend, config, lora);
  load_peft_adapter(peft.dir.path(), loaded);
  CHECK(loaded.download(loaded.params()) == values);

  // A subset of targets, given as a string.
  peft.config["target_modules"] = "x_proj";
  peft.write_config();
  CHECK(read_peft_adapter_config(peft.dir.path()).targets == std::vector<Projection>{Projection::x_proj});
}

TEST_CASE("a malformed PEFT adapter is an error naming the file and the key or tensor") {
  const MambaConfig config = model_size("demo");
  const std::unique_ptr<Backend> backend = make_cpu_backend(DType::F32);
  // The config with `key` set to `value`, or without it (a null value), must fail naming the file and fragments.
  auto config_error = [&](const std::string& key, const nlohmann::json& value,
                          std::initializer_list<std::string> fragments) {
    PeftDir peft;
    if (value.is_null())
      peft.config.erase(key);
    else
      peft.config[key] = value;
    peft.write_config();
    std::vector<std::string> all{kPeftConfigFile};
    all.insert(all.end(), fragments.begin(), fragments.end());
    require_error([&] { read_peft_adapter_config(peft.dir.path()); }, all);
  };
  const nlohmann::json absent;
  config_error("r", absent, {"'r'"});
  config_error("r", "four", {"'r'"});
  config_error("r", 0, {"'r'"});
  config_error("lora_alpha", absent, {"'lora_alpha'"});
  config_error("target_modules", {"in_proj", "embeddings"}, {"target_modules", "embeddings"});
  config_error("target_modules", absent, {"target_modules"});
  config_error("peft_type", "IA3", {"peft_type", "IA3"});
  config_error("use_dora", true, {"use_dora"});
  config_error("rank_pattern", {{"in_proj", 8}}, {"rank_pattern"});
  config_error("layers_to_transform", {0}, {"layers_to_transform"});
  {
    PeftDir peft;
    require_error([&] { read_peft_adapter_config(peft.dir.path()); }, {kPeftConfigFile});
    std::ofstream(peft.dir / kPeftConfigFile) << "{\"r\": 2,";
    require_error([&] { read_peft_adapter_config(peft.dir.path()); }, {kPeftConfigFile, "JSON"});
  }

  PeftDir peft;
  peft.write_config();
  const LoraConfig lora = read_peft_adapter_config(peft.dir.path());
  LoraAdapters adapters(*backend, config, lora);
  const std::vector<double> values = random_adapter_values(adapters, 3);
  const std::string key = "base_model.model.backbone.layers.1.mixer.dt_proj.lora_B.weight";
  // The weights file missing.
  require_error([&] { load_peft_adapter(peft.dir.path(), adapters); }, {kPeftWeightsFile});
  // A tensor missing, of another shape (another rank or another model), or one the layout lacks.
  peft.write_tensors(
      adapters, values,
      [&](std::string& name, std::vector<int64_t>&, std::vector<float>&, SafetensorsWriter&) { return name == key; });
  require_error([&] { load_peft_adapter(peft.dir.path(), adapters); }, {kPeftWeightsFile, key});
  peft.write_tensors(adapters, values,
                     [&](std::string& name, std::vector<int64_t>& shape, std::vector<float>& data, SafetensorsWriter&) {
                       if (name == key) {
                         shape[0] += 1;
                         data.resize(static_cast<size_t>(shape[0] * shape[1]));
                       }
                       return false;
                     });
  require_error([&] { load_peft_adapter(peft.dir.path(), adapters); }, {kPeftWeightsFile, key});
  peft.write_tensors(
      adapters, values,
      [&](std::string& name, std::vector<int64_t>& shape, std::vector<float>& data, SafetensorsWriter& writer) {
        if (name == key)
          writer.add_float_as("base_model.model.backbone.layers.2.mixer.dt_proj.lora_B.weight", DType::F32, shape,
                              data.data());
        return false;
      });
  require_error([&] { load_peft_adapter(peft.dir.path(), adapters); },
                {kPeftWeightsFile, "layers.2.mixer.dt_proj.lora_B.weight"});
}
