#include "framework/mamba_model.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <span>

#include <fmt/ranges.h>

#include "framework/atomic_file.h"
#include "framework/error.h"
#include "framework/safetensors.h"
#include "kernels/common/counter_rng.h"
#include "kernels/cpu/nf4.h"

namespace ssmtune {

class TensorSource {
 public:
  virtual ~TensorSource() = default;
  virtual bool contains(std::string_view name) const = 0;
  // Checks the shape (and the checkpoint's dtype) and converts the tensor into out[numel].
  virtual void read_float(std::string_view name, std::span<const int64_t> shape, float* out) const = 0;
  virtual void read_double(std::string_view name, std::span<const int64_t> shape, double* out) const = 0;
};

namespace {

class SafetensorsSource final : public TensorSource {
 public:
  explicit SafetensorsSource(const std::filesystem::path& path) : file_(SafetensorsFile::open(path)) {}
  bool contains(std::string_view name) const override { return file_.contains(name); }
  void read_float(std::string_view name, std::span<const int64_t> shape, float* out) const override {
    file_.read_float(name, shape, out);
  }
  void read_double(std::string_view name, std::span<const int64_t> shape, double* out) const override {
    file_.read_double(name, shape, out);
  }

 private:
  SafetensorsFile file_;
};

int64_t element_count(std::span<const int64_t> shape) {
  int64_t numel = 1;
  for (int64_t s : shape) numel *= s;
  return numel;
}

std::string layer_prefix(int64_t i) { return "backbone.layers." + std::to_string(i) + ".mixer."; }

// A randomly initialised base model the way HF's MambaPreTrainedModel initialises one, each tensor
// computed when it is read. Every random tensor draws from its own counter-RNG stream, numbered in
// the order names() lists the tensors (the order of the file write_random_mamba writes), so a tensor's
// values do not depend on which others are read or in what order.
class RandomSource final : public TensorSource {
 public:
  RandomSource(const MambaConfig& c, uint64_t seed) : config_(c), seed_(seed) {
    const double initializer_range = 0.1;  // HF MambaConfig default
    add("backbone.embeddings.weight", {c.vocab_size, c.d_model}, Init::normal, initializer_range);
    for (int64_t i = 0; i < c.n_layer; ++i) {
      const std::string p = layer_prefix(i);
      add("backbone.layers." + std::to_string(i) + ".norm.weight", {c.d_model}, Init::constant, 1.0);
      // nn.Linear / nn.Conv1d default init: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
      for (Projection proj : kProjections) {
        const auto [out, in] = projection_shape(c, proj);
        double bound = 1.0 / std::sqrt(static_cast<double>(in));
        if (proj == Projection::dt_proj) bound = std::pow(static_cast<double>(c.dt_rank), -0.5) * c.time_step_scale;
        // rescale_prenorm_residual
        if (proj == Projection::out_proj) bound /= std::sqrt(static_cast<double>(c.n_layer));
        add(p + std::string(projection_name(proj)) + ".weight", {out, in}, Init::uniform, bound);
      }
      const double conv_bound = 1.0 / std::sqrt(static_cast<double>(c.conv_kernel));
      add(p + "conv1d.weight", {c.d_inner, 1, c.conv_kernel}, Init::uniform, conv_bound);
      if (c.use_conv_bias) add(p + "conv1d.bias", {c.d_inner}, Init::uniform, conv_bound);
      add(p + "dt_proj.bias", {c.d_inner}, Init::dt_bias, 0.0);
      add(p + "A_log", {c.d_inner, c.d_state}, Init::A_log, 0.0);
      add(p + "D", {c.d_inner}, Init::constant, 1.0);
    }
    add("backbone.norm_f.weight", {c.d_model}, Init::constant, 1.0);
    if (!c.tie_word_embeddings)
      add("lm_head.weight", {c.vocab_size, c.d_model}, Init::normal, initializer_range);
  }

  const std::vector<std::string>& names() const { return names_; }
  const std::vector<int64_t>& shape(std::string_view name) const { return find(name).shape; }

  bool contains(std::string_view name) const override { return tensors_.contains(name); }
  void read_float(std::string_view name, std::span<const int64_t> shape, float* out) const override {
    generate(checked(name, shape), out);
  }
  void read_double(std::string_view name, std::span<const int64_t> shape, double* out) const override {
    generate(checked(name, shape), out);
  }

 private:
  enum class Init {
    constant,  // every element `param`
    uniform,   // U(-param, param)
    normal,    // N(0, param^2)
    dt_bias,   // inverse softplus of dt ~ exp(U(log dt_min, log dt_max)), floored
    A_log,     // log(n + 1) for state n: S4D-real
  };
  struct Tensor {
    std::vector<int64_t> shape;
    Init init;
    double param;
    uint64_t stream;
  };

  void add(std::string name, std::vector<int64_t> shape, Init init, double param) {
    const bool random = init == Init::uniform || init == Init::normal || init == Init::dt_bias;
    tensors_.emplace(name, Tensor{std::move(shape), init, param, random ? next_stream_++ : 0});
    names_.push_back(std::move(name));
  }
  const Tensor& find(std::string_view name) const {
    auto found = tensors_.find(name);
    if (found == tensors_.end()) fail("random base model: no tensor '{}'", name);
    return found->second;
  }
  const Tensor& checked(std::string_view name, std::span<const int64_t> shape) const {
    const Tensor& t = find(name);
    if (!std::equal(t.shape.begin(), t.shape.end(), shape.begin(), shape.end()))
      fail("random base model: tensor '{}' has shape {}, expected {}", name, t.shape, shape);
    return t;
  }

  // Computes each element in fp32, as the file stores it, then widens it to T.
  template <typename T>
  void generate(const Tensor& t, T* out) const {
    const int64_t numel = element_count(t.shape);
    const uint64_t seed = seed_, stream = t.stream;
    const double param = t.param;
    auto uniform = [=](int64_t i, double bound) {
      return static_cast<float>((2.0 * counter_random_uniform(seed, stream, i) - 1.0) * bound);
    };
    const MambaConfig& c = config_;
#pragma omp parallel for schedule(static) if (numel > (1 << 16))
    for (int64_t i = 0; i < numel; ++i) {
      float value = 0.0f;
      switch (t.init) {
        case Init::constant: value = static_cast<float>(param); break;
        case Init::uniform: value = uniform(i, param); break;
        case Init::normal: {  // Box-Muller on two uniforms from the counter RNG
          const double u1 = (counter_random_u64(seed, stream, 2 * i) >> 11) * 0x1.0p-53 + 0x1.0p-54;
          const double u2 = (counter_random_u64(seed, stream, 2 * i + 1) >> 11) * 0x1.0p-53;
          value = static_cast<float>(param * std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2));
          break;
        }
        case Init::dt_bias: {
          const double u = 0.5 * (uniform(i, 1.0) + 1.0);
          double dt = std::exp(u * (std::log(c.time_step_max) - std::log(c.time_step_min)) +
                               std::log(c.time_step_min));
          dt = std::max(dt, c.time_step_floor);
          value = static_cast<float>(dt + std::log(-std::expm1(-dt)));
          break;
        }
        case Init::A_log: value = static_cast<float>(std::log(i % c.d_state + 1.0)); break;
      }
      out[i] = static_cast<T>(value);
    }
  }

  MambaConfig config_;
  uint64_t seed_;
  uint64_t next_stream_ = 0;
  std::map<std::string, Tensor, std::less<>> tensors_;
  std::vector<std::string> names_;
};

// Host values encoded in a backend dtype, ready to copy to the device.
std::vector<std::byte> encode(const std::vector<double>& values, DType dtype) {
  std::vector<std::byte> bytes(values.size() * dtype_size(dtype));
  convert_from_double(values.data(), values.size(), dtype, bytes.data());
  return bytes;
}

void require_supported(const MambaConfig& c, const std::string& origin) {
  if (c.use_bias)
    fail("{}: use_bias=true (biases on in_proj/out_proj) is not supported; released Mamba checkpoints have none",
         origin);
}

// One buffer of the frozen model and the tensor that fills it.
struct Placement {
  std::string name;             // empty: no tensor; the buffer keeps the arena's zeros
  std::vector<int64_t> shape;   // as the checkpoint stores it
  const void** slot = nullptr;  // a dense buffer of `dtype`...
  DType dtype = DType::F32;
  bool minus_exp = false;       // stores -exp(x): A from A_log
  Nf4Weight* nf4 = nullptr;     // ...or an NF4 projection
};

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
  require_supported(config, (dir / "config.json").string());
  const SafetensorsSource source(dir / "model.safetensors");
  return from_source(std::move(config), source, backend);
}

MambaWeights MambaWeights::random(const MambaConfig& config, Backend& backend, uint64_t seed) {
  // The tensors from `config`, as write_random_mamba draws them; the weights keep the config that
  // load() would read back from config.json.
  MambaConfig loaded = parse_mamba_config(mamba_config_to_json(config), "random base model");
  require_supported(loaded, "random base model");
  const RandomSource source(config, seed);
  return from_source(std::move(loaded), source, backend);
}

MambaWeights MambaWeights::from_source(MambaConfig config, const TensorSource& source, Backend& backend) {
  MambaWeights w(backend, std::move(config));
  const MambaConfig& c = w.config_;
  const DType act = backend.act_dtype(), master = backend.master_dtype();

  // What goes where, in the order the tensors are read.
  std::vector<Placement> placements;
  std::string embedding_name = "backbone.embeddings.weight";
  if (!source.contains(embedding_name) && source.contains("backbone.embedding.weight"))
    embedding_name = "backbone.embedding.weight";  // original mamba_ssm name
  placements.push_back({embedding_name, {c.vocab_size, c.d_model}, &w.embedding_, act});
  const bool tied = !source.contains("lm_head.weight");
  if (!tied) placements.push_back({"lm_head.weight", {c.vocab_size, c.d_model}, &w.lm_head_, act});
  placements.push_back({"backbone.norm_f.weight", {c.d_model}, &w.norm_f_, master});
  w.layers_.resize(static_cast<size_t>(c.n_layer));
  for (int64_t i = 0; i < c.n_layer; ++i) {
    MambaLayerWeights& L = w.layers_[i];
    const std::string p = layer_prefix(i);
    placements.push_back(
        {"backbone.layers." + std::to_string(i) + ".norm.weight", {c.d_model}, &L.norm_weight, master});
    placements.push_back({p + "conv1d.weight", {c.d_inner, 1, c.conv_kernel}, &L.conv_weight, master});
    placements.push_back({c.use_conv_bias ? p + "conv1d.bias" : "", {c.d_inner}, &L.conv_bias, master});
    placements.push_back({p + "A_log", {c.d_inner, c.d_state}, &L.A, master, true});
    placements.push_back({p + "D", {c.d_inner}, &L.D, master});
    placements.push_back({p + "dt_proj.bias", {c.d_inner}, &L.dt_bias, master});
    for (Projection proj : kProjections) {
      const auto [out, in] = projection_shape(c, proj);
      Nf4Weight& q = L.proj[static_cast<size_t>(proj)];
      q.out_features = out;
      q.in_features = in;
      placements.push_back({p + std::string(projection_name(proj)) + ".weight", {out, in}, nullptr, DType::F32,
                            false, &q});
    }
  }

  // One allocation, sized from the config alone.
  for (const Placement& pl : placements) {
    const int64_t numel = element_count(pl.shape);
    if (!pl.nf4) {
      w.arena_.add(pl.slot, static_cast<size_t>(numel) * dtype_size(pl.dtype));
      continue;
    }
    const cpu::Nf4Sizes sizes = cpu::nf4_sizes(numel);
    w.arena_.add(&pl.nf4->packed, static_cast<size_t>(sizes.packed_bytes));
    w.arena_.add(&pl.nf4->absmax_codes, static_cast<size_t>(sizes.blocks));
    w.arena_.add(&pl.nf4->nested_absmax, static_cast<size_t>(sizes.nested_blocks) * sizeof(float));
  }
  w.arena_.allocate();

  // Then one tensor at a time: read, convert or quantize, copy, drop.
  for (const Placement& pl : placements) {
    if (pl.name.empty()) continue;
    const int64_t numel = element_count(pl.shape);
    if (Nf4Weight* q = pl.nf4) {
      std::vector<float> weight(static_cast<size_t>(numel));
      source.read_float(pl.name, pl.shape, weight.data());
      backend.nf4_quantize(weight.data(), numel, const_cast<uint8_t*>(q->packed),
                           const_cast<uint8_t*>(q->absmax_codes), const_cast<float*>(q->nested_absmax),
                           &q->nested_offset);
      continue;
    }
    std::vector<double> values(static_cast<size_t>(numel));
    source.read_double(pl.name, pl.shape, values.data());
    if (pl.minus_exp)
      for (double& v : values) v = -std::exp(v);
    const std::vector<std::byte> bytes = encode(values, pl.dtype);
    backend.copy_from_host(const_cast<void*>(*pl.slot), bytes.data(), bytes.size());
  }
  if (tied) w.lm_head_ = w.embedding_;
  return w;
}

void write_random_mamba(const std::filesystem::path& dir, const MambaConfig& c, uint64_t seed) {
  const RandomSource source(c, seed);
  SafetensorsWriter writer;
  for (const std::string& name : source.names()) {
    const std::vector<int64_t>& shape = source.shape(name);
    std::vector<float> values(static_cast<size_t>(element_count(shape)));
    source.read_float(name, shape, values.data());
    writer.add_float_as(name, DType::F32, shape, values.data());
  }
  std::filesystem::create_directories(dir);
  writer.write(dir / "model.safetensors");
  const std::string json = mamba_config_to_json(c).dump(2) + "\n";
  write_file_atomically(dir / "config.json", std::as_bytes(std::span(json.data(), json.size())));
}

}  // namespace ssmtune
