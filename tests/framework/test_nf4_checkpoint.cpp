// bitsandbytes NF4 checkpoints: `ssmtune quantize` writes the tensors and config that transformers +
// bitsandbytes write (REFERENCE.md §3), holding exactly what cpu::nf4_quantize computes, and every
// checkpoint outside what we support is refused with the file and tensor or key at fault. (That the
// output loads as the same weights as its source is in test_mamba_model.cpp.)
#include "framework/nf4_checkpoint.h"

#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "framework/cpu_backend.h"
#include "framework/mamba_model.h"
#include "framework/model_files.h"
#include "framework/model_sizes.h"
#include "framework/quantize_model.h"
#include "kernels/cpu/nf4.h"
#include "tests/catch.h"
#include "tests/framework/error_message.h"
#include "tests/framework/model_rewrite.h"
#include "tests/framework/scratch_dir.h"

using namespace ssmtune;
using test::contains;
using test::error_message;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const std::string kInProj = "backbone.layers.0.mixer.in_proj.weight";

template <typename T>
std::vector<T> values_of(std::span<const std::byte> bytes) {
  std::vector<T> values(bytes.size() / sizeof(T));
  std::memcpy(values.data(), bytes.data(), bytes.size());
  return values;
}

std::string text_of(std::span<const std::byte> bytes) {
  return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

// A U8 tensor holding `text`.
PlannedTensor text_tensor(const std::string& name, const std::string& text) {
  return {name, DType::U8, {static_cast<int64_t>(text.size())},
          [text](std::span<std::byte> to) { std::memcpy(to.data(), text.data(), text.size()); }};
}

// An F32 tensor holding `values` with `shape`.
PlannedTensor float_tensor(const std::string& name, std::vector<int64_t> shape, std::vector<float> values) {
  return {name, DType::F32, std::move(shape),
          [values](std::span<std::byte> to) { std::memcpy(to.data(), values.data(), to.size()); }};
}

// The demo model, its NF4 checkpoint, and the load error after editing that checkpoint.
struct Quantized {
  test::ScratchDir dir{"nf4-checkpoint"};
  Quantized() {
    write_random_mamba(dir / "source", model_size("demo"), 4);
    write_quantized_model(dir / "source", dir / "nf4");
  }
  // The error of loading the checkpoint after `edit`, or after replacing config.json.
  std::string load_error(const test::TensorEdit& edit, const std::string& config_text = "") const {
    fs::remove_all(dir / "edited");
    test::rewrite_model(dir / "nf4", dir / "edited", edit, kDefaultMaxShardBytes, config_text);
    const std::unique_ptr<Backend> backend = make_cpu_backend(DType::F32);
    return error_message([&] { MambaWeights::load(dir / "edited", *backend); });
  }
  // Replaces the one tensor `name` by `replacement` (several, or none).
  std::string load_error_replacing(const std::string& name, std::vector<PlannedTensor> replacement) const {
    return load_error([&](const std::string& n, const ShardedSafetensors& source) {
      return n == name ? replacement : test::keep(n, source);
    });
  }
  json config() const { return json::parse(read_text_file(dir / "nf4/config.json")); }
};

}  // namespace

TEST_CASE("ssmtune quantize writes bitsandbytes' tensors, holding what cpu::nf4_quantize computes") {
  for (const DType stored : {DType::F32, DType::BF16}) {
    INFO(dtype_name(stored));
    test::ScratchDir dir("nf4-checkpoint");
    const MambaConfig c = model_size("demo");
    write_random_mamba(dir / "f32", c, 1);
    test::rewrite_model(dir / "f32", dir / "source", test::convert_floats_to(stored));
    write_quantized_model(dir / "source", dir / "nf4");
    const ShardedSafetensors source = ShardedSafetensors::open_dir(dir / "source");
    const SafetensorsFile out = SafetensorsFile::open(dir / "nf4/model.safetensors");
    CHECK(out.metadata().at("format") == "pt");

    std::set<std::string> expected_names;
    for (const MambaTensor& t : mamba_tensors(c, false)) {
      INFO(t.name);
      expected_names.insert(t.name);
      if (t.kind != MambaTensor::Kind::projection) {  // copied as stored
        CHECK(out.info(t.name).dtype == stored);
        CHECK(out.info(t.name).shape == source.info(t.name).shape);
        const auto a = out.bytes(t.name), b = source.bytes(t.name);
        CHECK(std::equal(a.begin(), a.end(), b.begin(), b.end()));
        continue;
      }
      const int64_t n = t.numel();
      std::vector<float> w(static_cast<size_t>(n));
      source.read_float(t.name, t.shape, w.data());
      const cpu::Nf4Sizes sizes = cpu::nf4_sizes(n);
      std::vector<uint8_t> packed(sizes.packed_bytes), codes(sizes.blocks);
      std::vector<float> nested(sizes.nested_blocks);
      float offset = 0;
      cpu::nf4_quantize(w.data(), n, packed.data(), codes.data(), nested.data(), &offset);

      const std::string W = t.name;
      for (const std::string& part : {W + ".absmax", W + ".quant_map", W + ".nested_absmax", W + ".nested_quant_map",
                                      W + ".quant_state.bitsandbytes__nf4"})
        expected_names.insert(part);
      CHECK(out.info(W).dtype == DType::U8);
      CHECK(out.info(W).shape == std::vector<int64_t>{n / 2, 1});
      CHECK(values_of<uint8_t>(out.bytes(W)) == packed);
      CHECK(out.info(W + ".absmax").dtype == DType::U8);
      CHECK(out.info(W + ".absmax").shape == std::vector<int64_t>{sizes.blocks});
      CHECK(values_of<uint8_t>(out.bytes(W + ".absmax")) == codes);
      CHECK(out.info(W + ".quant_map").shape == std::vector<int64_t>{16});
      CHECK(values_of<float>(out.bytes(W + ".quant_map")) == std::vector<float>(cpu::kNf4Code, cpu::kNf4Code + 16));
      CHECK(out.info(W + ".nested_absmax").dtype == DType::F32);
      CHECK(values_of<float>(out.bytes(W + ".nested_absmax")) == nested);
      CHECK(out.info(W + ".nested_quant_map").shape == std::vector<int64_t>{256});
      CHECK(values_of<float>(out.bytes(W + ".nested_quant_map")) ==
            std::vector<float>(cpu::signed_dynamic_map(), cpu::signed_dynamic_map() + 256));
      // The JSON as Python's json.dumps writes bitsandbytes' dict, the offset as repr() of the fp32
      // value: parsing it gives the offset back exactly.
      const std::string state = text_of(out.bytes(W + ".quant_state.bitsandbytes__nf4"));
      const std::string prefix = fmt::format(
          R"({{"quant_type": "nf4", "blocksize": 64, "dtype": "{}", "shape": [{}, {}], "nested_blocksize": 256, )"
          R"("nested_dtype": "float32", "nested_offset": )",
          stored == DType::BF16 ? "bfloat16" : "float32", t.shape[0], t.shape[1]);
      CHECK(state.substr(0, prefix.size()) == prefix);
      CHECK(state.back() == '}');
      CHECK(static_cast<float>(json::parse(state)["nested_offset"].get<double>()) == offset);
    }
    const std::vector<std::string> names = out.names();
    CHECK(std::set<std::string>(names.begin(), names.end()) == expected_names);

    // config.json: the source's, plus quantization_config as BitsAndBytesConfig.to_dict() writes it.
    json config = json::parse(read_text_file(dir / "nf4/config.json"));
    CHECK(config["quantization_config"] == json::parse(R"({
      "quant_method": "bitsandbytes", "_load_in_4bit": true, "_load_in_8bit": false, "load_in_4bit": true,
      "load_in_8bit": false, "llm_int8_threshold": 6.0, "llm_int8_skip_modules": null,
      "llm_int8_enable_fp32_cpu_offload": false, "llm_int8_has_fp16_weight": false, "bnb_4bit_quant_type": "nf4",
      "bnb_4bit_use_double_quant": true, "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8"})"));
    config.erase("quantization_config");
    CHECK(config == json::parse(read_text_file(dir / "source/config.json")));
  }
}

TEST_CASE("quant_state's nested_offset is written as Python's repr of the fp32 value") {
  auto state_text = [](float offset) {
    const std::vector<PlannedTensor> parts = bnb_nf4_tensors("w", 2, 64, DType::F16, offset, [] {
      return std::make_shared<const Nf4HostWeight>();
    });
    std::string text(parts.back().byte_size(), ' ');
    parts.back().fill(std::as_writable_bytes(std::span(text)));
    return text;
  };
  // repr(float(numpy.float32(x))) for each.
  CHECK(state_text(1.0f) ==
        R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [2, 64], "nested_blocksize": 256, )"
        R"("nested_dtype": "float32", "nested_offset": 1.0})");
  CHECK(contains(state_text(0.1f), R"("nested_offset": 0.10000000149011612})"));
  CHECK(contains(state_text(1e-5f), R"("nested_offset": 9.999999747378752e-06})"));
  CHECK(contains(state_text(0.0f), R"("nested_offset": 0.0})"));
}

TEST_CASE("a projection a pre-quantized checkpoint stores in floating point is quantized on load") {
  // transformers leaves modules in llm_int8_skip_modules unquantized: their .weight stays floating point.
  Quantized q;
  // in_proj of layer 0 as the source stores it, every other projection in NF4.
  const ShardedSafetensors source_tensors = ShardedSafetensors::open_dir(q.dir / "source");
  test::rewrite_model(q.dir / "nf4", q.dir / "mixed", [&](const std::string& name, const ShardedSafetensors& nf4) {
    if (!name.starts_with(kInProj)) return test::keep(name, nf4);
    if (name != kInProj) return std::vector<PlannedTensor>{};
    return std::vector<PlannedTensor>{source_tensors.copy_as(kInProj, kInProj)};
  });
  const std::unique_ptr<Backend> backend = make_cpu_backend(DType::F32);
  const MambaWeights mixed = MambaWeights::load(q.dir / "mixed", *backend);
  const MambaWeights source = MambaWeights::load(q.dir / "source", *backend);
  const Nf4Weight &a = mixed.layer(0).proj[0], &b = source.layer(0).proj[0];
  const size_t bytes = static_cast<size_t>(cpu::nf4_sizes(a.out_features * a.in_features).packed_bytes);
  std::vector<std::byte> x(bytes), y(bytes);
  backend->copy_to_host(x.data(), a.packed, bytes);
  backend->copy_to_host(y.data(), b.packed, bytes);
  CHECK(x == y);
  CHECK(a.nested_offset == b.nested_offset);
}

TEST_CASE("stored NF4 tensors outside what we support are refused, naming the file and tensor") {
  Quantized q;
  const std::string shard = (q.dir / "edited/model.safetensors").string();
  const std::string state_name = kInProj + ".quant_state.bitsandbytes__nf4";
  const cpu::Nf4Sizes sizes = cpu::nf4_sizes(256 * 64);
  auto state_with = [&](const std::string& key, const json& value) {
    json state = json::parse(text_of(ShardedSafetensors::open_dir(q.dir / "nf4").bytes(state_name)));
    if (value.is_null()) state.erase(key);
    else state[key] = value;
    return std::vector<PlannedTensor>{text_tensor(state_name, state.dump())};
  };
  struct Case {
    std::string what;
    std::string message;
    std::vector<std::string> phrases;
  };
  std::vector<float> code(cpu::kNf4Code, cpu::kNf4Code + 16);
  code[3] += 1e-6f;
  std::vector<float> map(cpu::signed_dynamic_map(), cpu::signed_dynamic_map() + 256);
  map[200] = std::nextafter(map[200], 2.0f);  // one ulp off, as another torch build might make it
  const std::vector<Case> cases{
      {"another NF4 code", q.load_error_replacing(kInProj + ".quant_map", {float_tensor(kInProj + ".quant_map", {16}, code)}),
       {kInProj + ".quant_map", "NF4 code at index 3"}},
      {"another second-level map",
       q.load_error_replacing(kInProj + ".nested_quant_map", {float_tensor(kInProj + ".nested_quant_map", {256}, map)}),
       {kInProj + ".nested_quant_map", "signed dynamic map", "index 200"}},
      {"blocksize 128", q.load_error_replacing(state_name, state_with("blocksize", 128)),
       {state_name, R"("blocksize" is 128, expected 64)"}},
      {"fp4 in the state", q.load_error_replacing(state_name, state_with("quant_type", "fp4")),
       {state_name, R"("quant_type" is "fp4", expected "nf4")"}},
      {"another shape", q.load_error_replacing(state_name, state_with("shape", {64, 256})),
       {state_name, R"("shape" is [64,256], expected [256,64])"}},
      {"nested blocksize", q.load_error_replacing(state_name, state_with("nested_blocksize", 128)),
       {state_name, "nested_blocksize"}},
      {"no offset", q.load_error_replacing(state_name, state_with("nested_offset", nullptr)),
       {state_name, "nested_offset", "finite number"}},
      {"not JSON", q.load_error_replacing(state_name, {text_tensor(state_name, "{\"quant_type\": ")}),
       {state_name, "not UTF-8 JSON"}},
      {"an FP4 weight",
       q.load_error_replacing(state_name, {text_tensor(kInProj + ".quant_state.bitsandbytes__fp4", "{}")}),
       {kInProj, "FP4"}},
      {"no double quantization",
       q.load_error([&](const std::string& name, const ShardedSafetensors& nf4) -> std::vector<PlannedTensor> {
         if (name == kInProj + ".absmax")
           return {float_tensor(name, {sizes.blocks}, std::vector<float>(sizes.blocks, 1.0f))};
         if (name == kInProj + ".nested_absmax" || name == kInProj + ".nested_quant_map") return {};
         if (name != state_name) return test::keep(name, nf4);
         return {text_tensor(name, R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [256, 64]})")};
       }),
       {state_name, "is not double-quantized"}},
      {"absmax F32 beside a nested state",
       q.load_error_replacing(kInProj + ".absmax",
                              {float_tensor(kInProj + ".absmax", {sizes.blocks}, std::vector<float>(sizes.blocks))}),
       {kInProj + ".absmax", "is F32", "without double quantization"}},
      {"packed weight not [n/2, 1]",
       q.load_error_replacing(kInProj, {{kInProj, DType::U8, {sizes.packed_bytes}, [](std::span<std::byte>) {}}}),
       {kInProj, "U8 [8192]", "expected U8 [8192, 1]"}},
      {"a part missing", q.load_error_replacing(kInProj + ".nested_absmax", {}), {kInProj + ".nested_absmax"}},
      {"NF4 tensors but no quantization_config",
       q.load_error(test::keep, [&] {
         json config = q.config();
         config.erase("quantization_config");
         return config.dump();
       }()),
       {kInProj, "stored quantized by bitsandbytes", "config.json has no quantization_config"}},
  };
  for (const Case& c : cases) {
    INFO(c.what << ": " << c.message);
    CHECK(contains(c.message, shard));
    for (const std::string& phrase : c.phrases) CHECK(contains(c.message, phrase));
  }
}

TEST_CASE("a quantization_config we do not support is refused, naming config.json and the key") {
  Quantized q;
  struct Case {
    std::string key;
    json value;  // null: the key removed
    std::string phrase;
  };
  const std::vector<Case> cases{
      {"quant_method", "gptq", "not a bitsandbytes checkpoint"},
      {"load_in_8bit", true, "8-bit"},
      {"load_in_4bit", nullptr, "not a 4-bit checkpoint"},
      {"bnb_4bit_quant_type", "fp4", "only nf4"},
      {"bnb_4bit_quant_type", nullptr, "only nf4"},  // BitsAndBytesConfig's default is fp4
      {"bnb_4bit_use_double_quant", false, "without double quantization"},
      {"bnb_4bit_quant_storage", "bfloat16", "only uint8"},
  };
  for (const Case& c : cases) {
    INFO(c.key << " = " << c.value.dump());
    json config = q.config();
    if (c.value.is_null()) config["quantization_config"].erase(c.key);
    else config["quantization_config"][c.key] = c.value;
    const std::string message = q.load_error(test::keep, config.dump());
    CHECK(contains(message, (q.dir / "edited/config.json").string()));
    CHECK(contains(message, "quantization_config." + c.key));
    CHECK(contains(message, c.phrase));
  }
}

TEST_CASE("ssmtune quantize refuses what it cannot quantize, and writes nothing then") {
  Quantized q;
  auto quantize_error = [&](const fs::path& from) {
    fs::remove_all(q.dir / "out");
    const std::string message = error_message([&] { write_quantized_model(from, q.dir / "out"); });
    CHECK(!fs::exists(q.dir / "out"));
    return message;
  };
  CHECK(contains(quantize_error(q.dir / "nf4"), "already quantized"));

  json config = json::parse(read_text_file(q.dir / "source/config.json"));
  config["model_type"] = "mamba2";
  test::rewrite_model(q.dir / "source", q.dir / "mamba2", test::keep, kDefaultMaxShardBytes, config.dump());
  const std::string model_type = quantize_error(q.dir / "mamba2");
  CHECK(contains(model_type, (q.dir / "mamba2/config.json").string()));
  CHECK(contains(model_type, "model_type 'mamba2' is not supported"));

  const std::string x_proj = "backbone.layers.1.mixer.x_proj.weight";
  test::rewrite_model(q.dir / "source", q.dir / "bad_shape", [&](const std::string& name, const ShardedSafetensors& s) {
    if (name != x_proj) return test::keep(name, s);
    return std::vector<PlannedTensor>{float_tensor(name, {36, 64}, std::vector<float>(36 * 64, 0.5f))};
  });
  const std::string shape = quantize_error(q.dir / "bad_shape");
  CHECK(contains(shape, (q.dir / "bad_shape/model.safetensors").string()));
  CHECK(contains(shape, "'" + x_proj + "' has shape [36, 64], expected [36, 128]"));

  test::rewrite_model(q.dir / "source", q.dir / "nan", [&](const std::string& name, const ShardedSafetensors& s) {
    if (name != x_proj) return test::keep(name, s);
    std::vector<float> values(36 * 128, 0.5f);
    values[77] = std::numeric_limits<float>::infinity();
    return std::vector<PlannedTensor>{float_tensor(name, {36, 128}, values)};
  });
  CHECK(contains(quantize_error(q.dir / "nan"), "'" + x_proj + "' has values that are not finite"));

  // An output directory that holds something is left alone.
  fs::create_directories(q.dir / "taken");
  std::ofstream(q.dir / "taken/notes.txt") << "mine";
  const std::string taken = error_message([&] { write_quantized_model(q.dir / "source", q.dir / "taken"); });
  CHECK(contains(taken, "already exists and is not an empty directory"));
  CHECK(read_text_file(q.dir / "taken/notes.txt") == "mine");
  // An empty one is filled.
  fs::create_directories(q.dir / "empty");
  write_quantized_model(q.dir / "source", q.dir / "empty/");
  CHECK(fs::exists(q.dir / "empty/model.safetensors"));
}
