#include "framework/nf4_checkpoint.h"

#include <cmath>
#include <cstring>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "framework/error.h"
#include "framework/sharded_safetensors.h"
#include "framework/untrusted_json.h"
#include "kernels/cpu/nf4.h"

namespace ssmtune {
namespace {

using nlohmann::json;

constexpr const char* kSupported =
    "ssmtune reads only bitsandbytes NF4 with blocksize 64 and double quantization (nested blocksize 256, "
    "float32), stored as uint8";

// The bnb quant_state JSON, byte for byte as bitsandbytes writes it with Python's json.dumps (", " and
// ": " separators, the offset as Python's repr of the fp32 value widened to double).
std::string quant_state_json(int64_t out, int64_t in, DType original_dtype, float nested_offset) {
  std::string offset = fmt::format("{}", static_cast<double>(nested_offset));
  if (offset.find_first_of(".e") == std::string::npos) offset += ".0";  // repr(1.0) is "1.0", not "1"
  return fmt::format(
      R"({{"quant_type": "nf4", "blocksize": {}, "dtype": "{}", "shape": [{}, {}], "nested_blocksize": {}, )"
      R"("nested_dtype": "float32", "nested_offset": {}}})",
      cpu::kNf4BlockSize, torch_dtype_name(original_dtype), out, in, cpu::kNf4NestedBlockSize, offset);
}

// Reads and checks one stored weight; every message names the shard and the tensor.
class StoredNf4Reader {
 public:
  StoredNf4Reader(const ShardedSafetensors& tensors, const std::string& weight_name, int64_t out, int64_t in)
      : tensors_(tensors), weight_(weight_name), out_(out), in_(in), sizes_(cpu::nf4_sizes(out * in)) {}

  Nf4HostWeight read() const {
    Nf4HostWeight w;
    w.nested_offset = read_quant_state();
    const std::string absmax = weight_ + ".absmax";
    if (tensors_.contains(absmax) && tensors_.info(absmax).dtype == DType::F32)
      fail("{}: tensor '{}' is F32: '{}' was quantized without double quantization "
           "(bnb_4bit_use_double_quant false); {}",
           where(absmax), absmax, weight_, kSupported);
    w.packed = read_bytes(weight_, {sizes_.packed_bytes, 1});
    w.absmax_codes = read_bytes(absmax, {sizes_.blocks});
    check_code(weight_ + ".quant_map", cpu::kNf4Code, 16, "the NF4 code");
    check_code(weight_ + ".nested_quant_map", cpu::signed_dynamic_map(), 256,
               "bitsandbytes' signed dynamic map (create_dynamic_map(signed=True))");
    const std::string nested = weight_ + ".nested_absmax";
    require(nested, DType::F32, {sizes_.nested_blocks});
    w.nested_absmax.resize(static_cast<size_t>(sizes_.nested_blocks));
    tensors_.read_float(nested, tensors_.info(nested).shape, w.nested_absmax.data());
    return w;
  }

 private:
  std::string where(const std::string& name) const { return tensors_.file_of(name).path().string(); }

  void require(const std::string& name, DType dtype, const std::vector<int64_t>& shape) const {
    const TensorInfo& info = tensors_.info(name);
    if (info.dtype != dtype || info.shape != shape)
      fail("{}: tensor '{}' is {} {}, expected {} {} for the NF4 weight [{}, {}]; {}", where(name), name,
           dtype_name(info.dtype), info.shape, dtype_name(dtype), shape, out_, in_, kSupported);
  }

  std::vector<uint8_t> read_bytes(const std::string& name, const std::vector<int64_t>& shape) const {
    require(name, DType::U8, shape);
    const std::span<const std::byte> bytes = tensors_.bytes(name);
    std::vector<uint8_t> values(bytes.size());
    std::memcpy(values.data(), bytes.data(), bytes.size());
    return values;
  }

  void check_code(const std::string& name, const float* expected, int64_t n, const char* what) const {
    require(name, DType::F32, {n});
    std::vector<float> values(static_cast<size_t>(n));
    tensors_.read_float(name, std::vector<int64_t>{n}, values.data());
    for (int64_t i = 0; i < n; ++i)
      if (values[i] != expected[i])
        fail("{}: tensor '{}' differs from {} at index {}: {} instead of {}; {}", where(name), name, what, i,
             values[i], expected[i], kSupported);
  }

  // The quant_state JSON, checked key by key; returns the nested offset.
  float read_quant_state() const {
    const std::string name = bnb_nf4_state_name(weight_);
    const std::string fp4 = weight_ + ".quant_state.bitsandbytes__fp4";
    if (!tensors_.contains(name) && tensors_.contains(fp4))
      fail("{}: '{}' is quantized to FP4 (tensor '{}'); {}", where(fp4), weight_, fp4, kSupported);
    const TensorInfo& info = tensors_.info(name);
    if (info.dtype != DType::U8 || info.shape.size() != 1)
      fail("{}: tensor '{}' is {} {}, expected U8 bytes of JSON", where(name), name, dtype_name(info.dtype),
           info.shape);
    const std::span<const std::byte> bytes = tensors_.bytes(name);
    json state;
    try {
      state = parse_untrusted_json(fmt::format("{}: tensor '{}'", where(name), name),
                                   reinterpret_cast<const char*>(bytes.data()),
                                   reinterpret_cast<const char*>(bytes.data()) + bytes.size());
    } catch (const json::parse_error& e) {
      fail("{}: tensor '{}' is not UTF-8 JSON: {}", where(name), name, e.what());
    }
    if (!state.is_object()) fail("{}: tensor '{}' is not a JSON object", where(name), name);
    auto expect = [&](const char* key, const json& expected) {
      if (!state.contains(key))
        fail("{}: tensor '{}' has no \"{}\"{}; {}", where(name), name, key,
             std::string_view(key).starts_with("nested") ? " ('" + weight_ + "' is not double-quantized)" : "",
             kSupported);
      if (state[key] != expected)
        fail("{}: tensor '{}': \"{}\" is {}, expected {}; {}", where(name), name, key, state[key].dump(),
             expected.dump(), kSupported);
    };
    expect("quant_type", "nf4");
    expect("blocksize", cpu::kNf4BlockSize);
    expect("shape", {out_, in_});
    expect("nested_blocksize", cpu::kNf4NestedBlockSize);
    expect("nested_dtype", "float32");
    const json& offset = state.contains("nested_offset") ? state["nested_offset"] : json();
    if (!offset.is_number() || !std::isfinite(offset.get<double>()))
      fail("{}: tensor '{}': \"nested_offset\" is {}, expected a finite number", where(name), name, offset.dump());
    return static_cast<float>(offset.get<double>());
  }

  const ShardedSafetensors& tensors_;
  const std::string& weight_;
  int64_t out_, in_;
  cpu::Nf4Sizes sizes_;
};

}  // namespace

Nf4HostWeight nf4_quantize_host(const float* w, int64_t numel) {
  const cpu::Nf4Sizes sizes = cpu::nf4_sizes(numel);
  Nf4HostWeight q;
  q.packed.resize(static_cast<size_t>(sizes.packed_bytes));
  q.absmax_codes.resize(static_cast<size_t>(sizes.blocks));
  q.nested_absmax.resize(static_cast<size_t>(sizes.nested_blocks));
  cpu::nf4_quantize(w, numel, q.packed.data(), q.absmax_codes.data(), q.nested_absmax.data(), &q.nested_offset);
  return q;
}

void check_bnb_nf4_config(const json& config, const std::string& source) {
  if (!config.is_object()) fail("{}: quantization_config is {}, not a JSON object", source, config.dump());
  auto unsupported = [&](const std::string& key, const json& value, std::string_view why) {
    fail("{}: quantization_config.{} is {}: {}; {}", source, key, value.dump(), why, kSupported);
  };
  // A missing key means BitsAndBytesConfig's default, as transformers reads it.
  auto value = [&](const char* key, json default_value) { return config.contains(key) ? config[key] : default_value; };
  if (const json method = value("quant_method", nullptr); method != "bitsandbytes")
    unsupported("quant_method", method, "not a bitsandbytes checkpoint");
  if (const json eight = value("load_in_8bit", false); eight != false)
    unsupported("load_in_8bit", eight, "8-bit (LLM.int8) checkpoints are not supported");
  if (const json four = value("load_in_4bit", false); four != true)
    unsupported("load_in_4bit", four, "not a 4-bit checkpoint");
  if (const json type = value("bnb_4bit_quant_type", "fp4"); type != "nf4")
    unsupported("bnb_4bit_quant_type", type, "only nf4 is supported");
  if (const json nested = value("bnb_4bit_use_double_quant", false); nested != true)
    unsupported("bnb_4bit_use_double_quant", nested, "without double quantization the absmax is one fp32 per block");
  if (const json storage = value("bnb_4bit_quant_storage", "uint8"); storage != "uint8")
    unsupported("bnb_4bit_quant_storage", storage, "only uint8 storage is supported");
}

json bnb_nf4_config() {
  return {
      {"quant_method", "bitsandbytes"},
      {"_load_in_4bit", true},
      {"_load_in_8bit", false},
      {"load_in_4bit", true},
      {"load_in_8bit", false},
      {"llm_int8_threshold", 6.0},
      {"llm_int8_skip_modules", nullptr},
      {"llm_int8_enable_fp32_cpu_offload", false},
      {"llm_int8_has_fp16_weight", false},
      {"bnb_4bit_quant_type", "nf4"},
      {"bnb_4bit_use_double_quant", true},
      {"bnb_4bit_compute_dtype", "bfloat16"},
      {"bnb_4bit_quant_storage", "uint8"},
  };
}

std::string bnb_nf4_state_name(const std::string& weight_name) {
  return weight_name + ".quant_state.bitsandbytes__nf4";
}

bool is_bnb_4bit(const ShardedSafetensors& tensors, const std::string& weight_name) {
  return tensors.contains(bnb_nf4_state_name(weight_name)) ||
         tensors.contains(weight_name + ".quant_state.bitsandbytes__fp4");
}

std::vector<std::string> bnb_nf4_component_names(const std::string& weight_name) {
  return {weight_name + ".absmax", weight_name + ".quant_map", weight_name + ".nested_absmax",
          weight_name + ".nested_quant_map", bnb_nf4_state_name(weight_name)};
}

Nf4HostWeight read_bnb_nf4(const ShardedSafetensors& tensors, const std::string& weight_name, int64_t out,
                           int64_t in) {
  return StoredNf4Reader(tensors, weight_name, out, in).read();
}

std::vector<PlannedTensor> bnb_nf4_tensors(const std::string& weight_name, int64_t out, int64_t in,
                                           DType original_dtype, float nested_offset,
                                           std::function<std::shared_ptr<const Nf4HostWeight>()> get) {
  const cpu::Nf4Sizes sizes = cpu::nf4_sizes(out * in);
  auto copy = [](std::span<std::byte> to, const void* from) { std::memcpy(to.data(), from, to.size()); };
  const std::string state = quant_state_json(out, in, original_dtype, nested_offset);
  const std::vector<std::string> parts = bnb_nf4_component_names(weight_name);
  return {
      {weight_name, DType::U8, {sizes.packed_bytes, 1}, [=](std::span<std::byte> to) { copy(to, get()->packed.data()); }},
      {parts[0], DType::U8, {sizes.blocks}, [=](std::span<std::byte> to) { copy(to, get()->absmax_codes.data()); }},
      {parts[1], DType::F32, {16}, [=](std::span<std::byte> to) { copy(to, cpu::kNf4Code); }},
      {parts[2], DType::F32, {sizes.nested_blocks},
       [=](std::span<std::byte> to) { copy(to, get()->nested_absmax.data()); }},
      {parts[3], DType::F32, {256}, [=](std::span<std::byte> to) { copy(to, cpu::signed_dynamic_map()); }},
      {parts[4], DType::U8, {static_cast<int64_t>(state.size())},
       [=](std::span<std::byte> to) { copy(to, state.data()); }},
  };
}

}  // namespace ssmtune
