#include "framework/mamba_model.h"

#include <cmath>
#include <cstring>
#include <fstream>

#include "framework/atomic_file.h"
#include "framework/error.h"
#include "framework/safetensors.h"
#include "kernels/common/counter_rng.h"
#include "kernels/cpu/nf4.h"

namespace ssmtune {
namespace {

// Host values encoded in a backend dtype, ready to copy to the device.
std::vector<std::byte> encode(const std::vector<double>& values, DType dtype) {
  std::vector<std::byte> bytes(values.size() * dtype_size(dtype));
  convert_from_double(values.data(), values.size(), dtype, bytes.data());
  return bytes;
}

std::string layer_prefix(int64_t i) { return "backbone.layers." + std::to_string(i) + ".mixer."; }

}  // namespace

std::string_view projection_name(Projection p) {
  static constexpr std::array<std::string_view, 4> names{"in_proj", "x_proj", "dt_proj", "out_proj"};
  return names[static_cast<size_t>(p)];
}

std::array<int64_t, 2> projection_shape(const MambaConfig& c, Projection p) {
  switch (p) {
    case Projection::in_proj: return {2 * c.d_inner, c.d_model};
    case Projection::x_proj: return {c.dt_rank + 2 * c.d_state, c.d_inner};
    case Projection::dt_proj: return {c.d_inner, c.dt_rank};
    case Projection::out_proj: return {c.d_model, c.d_inner};
  }
  return {0, 0};
}

MambaWeights::MambaWeights(Backend& backend, MambaConfig config)
    : config_(std::move(config)), arena_(backend, "frozen base weights") {}

MambaWeights MambaWeights::load(const std::filesystem::path& dir, Backend& backend) {
  MambaConfig config = load_mamba_config(dir / "config.json");
  if (config.use_bias)
    fail("{}: use_bias=true (biases on in_proj/out_proj) is not supported; released Mamba checkpoints have none",
         (dir / "config.json").string());
  const std::filesystem::path weights_path = dir / "model.safetensors";
  SafetensorsFile file = SafetensorsFile::open(weights_path);
  MambaWeights w(backend, config);
  const MambaConfig& c = w.config_;
  const DType act = backend.act_dtype(), master = backend.master_dtype();
  const int64_t n_layer = c.n_layer;

  // Reads a floating tensor checked against its expected shape, as doubles.
  auto read = [&](const std::string& name, std::vector<int64_t> shape) {
    int64_t numel = 1;
    for (int64_t s : shape) numel *= s;
    std::vector<double> values(static_cast<size_t>(numel));
    file.read_double(name, shape, values.data());
    return values;
  };

  // Phase 1: read and convert on the host, recording what each device buffer will hold.
  struct Upload {
    const void** slot;
    std::vector<std::byte> bytes;
  };
  std::vector<Upload> uploads;
  auto stage = [&](const void** slot, std::vector<std::byte> bytes) {
    w.arena_.add(slot, bytes.size());
    uploads.push_back({slot, std::move(bytes)});
  };

  std::string embedding_name = "backbone.embeddings.weight";
  if (!file.contains(embedding_name) && file.contains("backbone.embedding.weight"))
    embedding_name = "backbone.embedding.weight";  // original mamba_ssm name
  stage(&w.embedding_, encode(read(embedding_name, {c.vocab_size, c.d_model}), act));
  const bool tied = !file.contains("lm_head.weight");
  if (!tied) stage(&w.lm_head_, encode(read("lm_head.weight", {c.vocab_size, c.d_model}), act));
  stage(&w.norm_f_, encode(read("backbone.norm_f.weight", {c.d_model}), master));

  w.layers_.resize(static_cast<size_t>(n_layer));
  for (int64_t i = 0; i < n_layer; ++i) {
    MambaLayerWeights& L = w.layers_[i];
    const std::string p = layer_prefix(i);
    stage(&L.norm_weight, encode(read("backbone.layers." + std::to_string(i) + ".norm.weight", {c.d_model}), master));
    stage(&L.conv_weight, encode(read(p + "conv1d.weight", {c.d_inner, 1, c.conv_kernel}), master));
    std::vector<double> conv_bias(static_cast<size_t>(c.d_inner), 0.0);
    if (c.use_conv_bias) conv_bias = read(p + "conv1d.bias", {c.d_inner});
    stage(&L.conv_bias, encode(conv_bias, master));
    std::vector<double> A = read(p + "A_log", {c.d_inner, c.d_state});
    for (double& a : A) a = -std::exp(a);
    stage(&L.A, encode(A, master));
    stage(&L.D, encode(read(p + "D", {c.d_inner}), master));
    stage(&L.dt_bias, encode(read(p + "dt_proj.bias", {c.d_inner}), master));
    for (Projection proj : kProjections) {
      const auto [out, in] = projection_shape(c, proj);
      const std::string name = p + std::string(projection_name(proj)) + ".weight";
      std::vector<float> weight(static_cast<size_t>(out * in));
      const std::vector<int64_t> shape{out, in};
      file.read_float(name, shape, weight.data());
      const cpu::Nf4Sizes sizes = cpu::nf4_sizes(out * in);
      std::vector<std::byte> packed(sizes.packed_bytes), codes(sizes.blocks),
          nested(sizes.nested_blocks * sizeof(float));
      Nf4Weight& q = L.proj[static_cast<size_t>(proj)];
      q.out_features = out;
      q.in_features = in;
      cpu::nf4_quantize(weight.data(), out * in, reinterpret_cast<uint8_t*>(packed.data()),
                        reinterpret_cast<uint8_t*>(codes.data()), reinterpret_cast<float*>(nested.data()),
                        &q.nested_offset);
      stage(reinterpret_cast<const void**>(&q.packed), std::move(packed));
      stage(reinterpret_cast<const void**>(&q.absmax_codes), std::move(codes));
      stage(reinterpret_cast<const void**>(&q.nested_absmax), std::move(nested));
    }
  }

  // Phase 2: one allocation, then the copies.
  w.arena_.allocate();
  for (const Upload& u : uploads) backend.copy_from_host(const_cast<void*>(*u.slot), u.bytes.data(), u.bytes.size());
  if (tied) w.lm_head_ = w.embedding_;
  return w;
}

void write_random_mamba(const std::filesystem::path& dir, const MambaConfig& c, uint64_t seed) {
  uint64_t stream = 0;
  // Each tensor draws from its own stream so that adding one does not change the others.
  auto uniform = [&](std::vector<int64_t> shape, double bound) {
    int64_t numel = 1;
    for (int64_t s : shape) numel *= s;
    std::vector<float> v(static_cast<size_t>(numel));
    const uint64_t s = stream++;
    for (int64_t i = 0; i < numel; ++i)
      v[i] = static_cast<float>((2.0 * counter_random_uniform(seed, s, i) - 1.0) * bound);
    return v;
  };
  auto normal = [&](std::vector<int64_t> shape, double stddev) {
    int64_t numel = 1;
    for (int64_t s : shape) numel *= s;
    std::vector<float> v(static_cast<size_t>(numel));
    const uint64_t s = stream++;
    for (int64_t i = 0; i < numel; ++i) {  // Box-Muller on two uniforms from the counter RNG
      const double u1 = (counter_random_u64(seed, s, 2 * i) >> 11) * 0x1.0p-53 + 0x1.0p-54;
      const double u2 = (counter_random_u64(seed, s, 2 * i + 1) >> 11) * 0x1.0p-53;
      v[i] = static_cast<float>(stddev * std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2));
    }
    return v;
  };
  auto constant = [](int64_t n, float value) { return std::vector<float>(static_cast<size_t>(n), value); };

  SafetensorsWriter writer;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, const std::vector<float>& v) {
    writer.add_float_as(name, DType::F32, std::move(shape), v.data());
  };
  const double initializer_range = 0.1;  // HF MambaConfig default
  add("backbone.embeddings.weight", {c.vocab_size, c.d_model}, normal({c.vocab_size, c.d_model}, initializer_range));
  for (int64_t i = 0; i < c.n_layer; ++i) {
    const std::string p = layer_prefix(i);
    add("backbone.layers." + std::to_string(i) + ".norm.weight", {c.d_model}, constant(c.d_model, 1.0f));
    // nn.Linear / nn.Conv1d default init: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    for (Projection proj : kProjections) {
      const auto [out, in] = projection_shape(c, proj);
      double bound = 1.0 / std::sqrt(static_cast<double>(in));
      if (proj == Projection::dt_proj) bound = std::pow(static_cast<double>(c.dt_rank), -0.5) * c.time_step_scale;
      if (proj == Projection::out_proj) bound /= std::sqrt(static_cast<double>(c.n_layer));  // rescale_prenorm_residual
      add(p + std::string(projection_name(proj)) + ".weight", {out, in}, uniform({out, in}, bound));
    }
    add(p + "conv1d.weight", {c.d_inner, 1, c.conv_kernel},
        uniform({c.d_inner, 1, c.conv_kernel}, 1.0 / std::sqrt(static_cast<double>(c.conv_kernel))));
    if (c.use_conv_bias)
      add(p + "conv1d.bias", {c.d_inner}, uniform({c.d_inner}, 1.0 / std::sqrt(static_cast<double>(c.conv_kernel))));
    // dt bias: inverse softplus of dt ~ exp(U(log dt_min, log dt_max)), floored.
    std::vector<float> dt_bias = uniform({c.d_inner}, 1.0);
    for (float& b : dt_bias) {
      const double u = 0.5 * (b + 1.0);
      double dt = std::exp(u * (std::log(c.time_step_max) - std::log(c.time_step_min)) + std::log(c.time_step_min));
      dt = std::max(dt, c.time_step_floor);
      b = static_cast<float>(dt + std::log(-std::expm1(-dt)));
    }
    add(p + "dt_proj.bias", {c.d_inner}, dt_bias);
    std::vector<float> A_log(static_cast<size_t>(c.d_inner * c.d_state));
    for (int64_t d = 0; d < c.d_inner; ++d)
      for (int64_t n = 0; n < c.d_state; ++n) A_log[d * c.d_state + n] = static_cast<float>(std::log(n + 1.0));
    add(p + "A_log", {c.d_inner, c.d_state}, A_log);
    add(p + "D", {c.d_inner}, constant(c.d_inner, 1.0f));
  }
  add("backbone.norm_f.weight", {c.d_model}, constant(c.d_model, 1.0f));
  if (!c.tie_word_embeddings)
    add("lm_head.weight", {c.vocab_size, c.d_model}, normal({c.vocab_size, c.d_model}, initializer_range));

  std::filesystem::create_directories(dir);
  writer.write(dir / "model.safetensors");
  const std::string json = mamba_config_to_json(c).dump(2) + "\n";
  write_file_atomically(dir / "config.json", std::as_bytes(std::span(json.data(), json.size())));
}

}  // namespace ssmtune
