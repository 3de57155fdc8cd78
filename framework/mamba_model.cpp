#include "framework/mamba_model.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <optional>
#include <span>

#include <fmt/ranges.h>

#include "framework/atomic_file.h"
#include "framework/error.h"
#include "framework/model_files.h"
#include "framework/safetensors.h"
#include "kernels/common/counter_rng.h"
#include "kernels/cpu/nf4.h"

namespace ssmtune {

// Where the weights come from: every read names a tensor of mamba_tensors() and gets exactly its shape.
class TensorSource {
 public:
  virtual ~TensorSource() = default;
  virtual bool has_lm_head() const = 0;
  // Checks the stored shape (and dtype) and converts the tensor into out[numel].
  virtual void read_float(const MambaTensor& t, float* out) const = 0;
  virtual void read_double(const MambaTensor& t, double* out) const = 0;
  // A projection the source holds already quantized, checked; nothing when it holds it in floating
  // point, to be read with read_float and quantized on load.
  virtual std::optional<Nf4HostWeight> read_stored_nf4(const MambaTensor&) const { return std::nullopt; }
};

namespace {

class ModelFilesSource final : public TensorSource {
 public:
  explicit ModelFilesSource(const ModelFiles& files) : files_(files) {}
  bool has_lm_head() const override { return files_.has_lm_head(); }
  void read_float(const MambaTensor& t, float* out) const override {
    files_.tensors().read_float(files_.stored_name(t), t.shape, out);
  }
  void read_double(const MambaTensor& t, double* out) const override {
    files_.tensors().read_double(files_.stored_name(t), t.shape, out);
  }
  std::optional<Nf4HostWeight> read_stored_nf4(const MambaTensor& t) const override { return files_.stored_nf4(t); }

 private:
  const ModelFiles& files_;
};

std::string layer_prefix(int64_t i) { return "backbone.layers." + std::to_string(i) + "."; }

// A randomly initialised base model the way HF's MambaPreTrainedModel initialises one, each tensor
// computed when it is read. Every random tensor draws from its own counter-RNG stream, numbered in
// the order of mamba_tensors() (the order of the file write_random_mamba writes), so a tensor's values
// do not depend on which others are read or in what order.
class RandomSource final : public TensorSource {
 public:
  RandomSource(const MambaConfig& c, uint64_t seed) : config_(c), seed_(seed) {
    const double initializer_range = 0.1;  // HF MambaConfig default
    const double conv_bound = 1.0 / std::sqrt(static_cast<double>(c.conv_kernel));
    for (MambaTensor& t : mamba_tensors(c, !c.tie_word_embeddings)) {
      switch (t.kind) {
        case MambaTensor::Kind::embedding:
        case MambaTensor::Kind::lm_head: add(std::move(t), Init::normal, initializer_range); break;
        case MambaTensor::Kind::norm:
        case MambaTensor::Kind::norm_f:
        case MambaTensor::Kind::D: add(std::move(t), Init::constant, 1.0); break;
        case MambaTensor::Kind::projection: {
          // nn.Linear default init: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
          double bound = 1.0 / std::sqrt(static_cast<double>(t.shape[1]));
          if (t.projection == Projection::dt_proj)
            bound = std::pow(static_cast<double>(c.dt_rank), -0.5) * c.time_step_scale;
          // rescale_prenorm_residual
          if (t.projection == Projection::out_proj) bound /= std::sqrt(static_cast<double>(c.n_layer));
          add(std::move(t), Init::uniform, bound);
          break;
        }
        // nn.Conv1d default init, the same kaiming_uniform over fan_in = conv_kernel.
        case MambaTensor::Kind::conv_weight:
        case MambaTensor::Kind::conv_bias: add(std::move(t), Init::uniform, conv_bound); break;
        case MambaTensor::Kind::dt_bias: add(std::move(t), Init::dt_bias, 0.0); break;
        case MambaTensor::Kind::A_log: add(std::move(t), Init::A_log, 0.0); break;
      }
    }
  }

  bool has_lm_head() const override { return !config_.tie_word_embeddings; }
  void read_float(const MambaTensor& t, float* out) const override { generate(find(t), t.numel(), out); }
  void read_double(const MambaTensor& t, double* out) const override { generate(find(t), t.numel(), out); }

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

  void add(MambaTensor t, Init init, double param) {
    const bool random = init == Init::uniform || init == Init::normal || init == Init::dt_bias;
    tensors_.emplace(t.name, Tensor{std::move(t.shape), init, param, random ? next_stream_++ : 0});
  }
  const Tensor& find(const MambaTensor& wanted) const {
    auto found = tensors_.find(wanted.name);
    if (found == tensors_.end()) fail("random base model: no tensor '{}'", wanted.name);
    if (found->second.shape != wanted.shape)
      fail("random base model: tensor '{}' has shape {}, expected {}", wanted.name, found->second.shape,
           wanted.shape);
    return found->second;
  }

  // Computes each element in fp32, as the file stores it, then widens it to T.
  template <typename T>
  void generate(const Tensor& t, int64_t numel, T* out) const {
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
  MambaTensor tensor;
  bool from_source = true;      // false: no tensor; the buffer keeps the arena's zeros
  const void** slot = nullptr;  // a dense buffer of `dtype`...
  DType dtype = DType::F32;
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

std::vector<MambaTensor> mamba_tensors(const MambaConfig& c, bool with_lm_head) {
  using Kind = MambaTensor::Kind;
  std::vector<MambaTensor> tensors;
  tensors.push_back({"backbone.embeddings.weight", {c.vocab_size, c.d_model}, Kind::embedding});
  for (int64_t i = 0; i < c.n_layer; ++i) {
    const std::string layer = layer_prefix(i), mixer = layer + "mixer.";
    tensors.push_back({layer + "norm.weight", {c.d_model}, Kind::norm, i});
    for (Projection p : kProjections) {
      const auto [out, in] = projection_shape(c, p);
      tensors.push_back({mixer + std::string(projection_name(p)) + ".weight", {out, in}, Kind::projection, i, p});
    }
    tensors.push_back({mixer + "conv1d.weight", {c.d_inner, 1, c.conv_kernel}, Kind::conv_weight, i});
    if (c.use_conv_bias) tensors.push_back({mixer + "conv1d.bias", {c.d_inner}, Kind::conv_bias, i});
    tensors.push_back({mixer + "dt_proj.bias", {c.d_inner}, Kind::dt_bias, i});
    tensors.push_back({mixer + "A_log", {c.d_inner, c.d_state}, Kind::A_log, i});
    tensors.push_back({mixer + "D", {c.d_inner}, Kind::D, i});
  }
  tensors.push_back({"backbone.norm_f.weight", {c.d_model}, Kind::norm_f});
  if (with_lm_head) tensors.push_back({"lm_head.weight", {c.vocab_size, c.d_model}, Kind::lm_head});
  return tensors;
}

LayerNf4Layout layer_nf4_layout(const MambaConfig& c, int shards) {
  if (shards < 1) fail("internal: NF4 layer layout for {} shards", shards);
  LayerNf4Layout layout;
  layout.shards = shards;
  size_t offset = 0;
  auto place = [&](int64_t bytes) {
    const size_t at = offset;
    offset += Arena::padded(static_cast<size_t>(bytes));
    return at;
  };
  for (Projection p : kProjections) {
    const auto [out, in] = projection_shape(c, p);
    const cpu::Nf4Sizes sizes = cpu::nf4_sizes(out * in);
    LayerNf4Layout::Buffers& b = layout.proj[static_cast<size_t>(p)];
    b.packed = place(sizes.packed_bytes);
    b.absmax_codes = place(sizes.blocks);
    b.nested_absmax = place(sizes.nested_blocks * static_cast<int64_t>(sizeof(float)));
  }
  const size_t piece = static_cast<size_t>(shards) * Arena::padded(1);
  layout.bytes = (offset + piece - 1) / piece * piece;
  return layout;
}

MambaWeights::MambaWeights(Backend& backend, MambaConfig config, ShardIndex projection_shard)
    : config_(std::move(config)),
      projection_shard_(projection_shard),
      nf4_layout_(layer_nf4_layout(config_, projection_shard.count)),
      arena_(backend, projection_shard.count > 1 ? "frozen base weights (this rank's shard of the NF4 projections)"
                                                 : "frozen base weights") {}

MambaWeights MambaWeights::load(const std::filesystem::path& dir, Backend& backend, ShardIndex projection_shard) {
  const ModelFiles files = ModelFiles::open(dir);
  require_supported(files.config(), files.config_path().string());
  const ModelFilesSource source(files);
  return from_source(files.config(), source, backend, projection_shard);
}

MambaWeights MambaWeights::random(const MambaConfig& config, Backend& backend, uint64_t seed,
                                  ShardIndex projection_shard) {
  // The tensors from `config`, as write_random_mamba draws them; the weights keep the config that
  // load() would read back from config.json.
  MambaConfig loaded = parse_mamba_config(mamba_config_to_json(config), "random base model");
  require_supported(loaded, "random base model");
  const RandomSource source(config, seed);
  return from_source(std::move(loaded), source, backend, projection_shard);
}

const MambaLayerWeights& MambaWeights::layer(int64_t i) const {
  if (projections_sharded())
    fail("internal: layer {}'s NF4 projections are sharded over {} ranks; framework/layer_weights.h gathers them", i,
         projection_shard_.count);
  return layers_[static_cast<size_t>(i)];
}

MambaLayerWeights MambaWeights::layer_at(int64_t i, const void* block) const {
  MambaLayerWeights w = layers_[static_cast<size_t>(i)];
  const auto* bytes = static_cast<const uint8_t*>(block);
  for (Projection p : kProjections) {
    const LayerNf4Layout::Buffers& at = nf4_layout_.proj[static_cast<size_t>(p)];
    Nf4Weight& q = w.proj[static_cast<size_t>(p)];
    q.packed = bytes + at.packed;
    q.absmax_codes = bytes + at.absmax_codes;
    q.nested_absmax = reinterpret_cast<const float*>(bytes + at.nested_absmax);
  }
  return w;
}

MambaWeights MambaWeights::from_source(MambaConfig config, const TensorSource& source, Backend& backend,
                                       ShardIndex shard) {
  using Kind = MambaTensor::Kind;
  if (shard.count < 1 || shard.index < 0 || shard.index >= shard.count)
    fail("internal: base weight shard {} of {}", shard.index, shard.count);
  MambaWeights w(backend, std::move(config), shard);
  const MambaConfig& c = w.config_;
  const DType act = backend.act_dtype(), master = backend.master_dtype();
  const bool sharded = shard.count > 1;
  const LayerNf4Layout& layout = w.nf4_layout_;
  w.layers_.resize(static_cast<size_t>(c.n_layer));
  w.layer_nf4_.resize(static_cast<size_t>(c.n_layer));

  // What goes where, in the order the tensors are read.
  std::vector<Placement> placements;
  const bool tied = !source.has_lm_head();
  for (MambaTensor& t : mamba_tensors(c, !tied)) {
    MambaLayerWeights* L = t.layer >= 0 ? &w.layers_[static_cast<size_t>(t.layer)] : nullptr;
    Placement pl{std::move(t)};
    pl.dtype = master;
    switch (pl.tensor.kind) {
      case Kind::embedding: pl.slot = &w.embedding_, pl.dtype = act; break;
      case Kind::lm_head: pl.slot = &w.lm_head_, pl.dtype = act; break;
      case Kind::norm_f: pl.slot = &w.norm_f_; break;
      case Kind::norm: pl.slot = &L->norm_weight; break;
      case Kind::conv_weight: pl.slot = &L->conv_weight; break;
      case Kind::conv_bias: pl.slot = &L->conv_bias; break;
      case Kind::dt_bias: pl.slot = &L->dt_bias; break;
      case Kind::A_log: pl.slot = &L->A; break;
      case Kind::D: pl.slot = &L->D; break;
      case Kind::projection: {
        Nf4Weight& q = L->proj[static_cast<size_t>(pl.tensor.projection)];
        q.out_features = pl.tensor.shape[0];
        q.in_features = pl.tensor.shape[1];
        pl.nf4 = &q;
        break;
      }
    }
    placements.push_back(std::move(pl));
  }
  if (!c.use_conv_bias)  // the conv kernels always add a bias: zeros
    for (int64_t i = 0; i < c.n_layer; ++i)
      placements.push_back({{"", {c.d_inner}, Kind::conv_bias, i}, false, &w.layers_[i].conv_bias, master});

  // One allocation, sized from the config alone: each layer's NF4 block (or this rank's shard of it),
  // and the dense tensors.
  for (const void*& block : w.layer_nf4_) w.arena_.add(&block, layout.shard_bytes());
  for (const Placement& pl : placements)
    if (!pl.nf4) w.arena_.add(pl.slot, static_cast<size_t>(pl.tensor.numel()) * dtype_size(pl.dtype));
  w.arena_.allocate();
  if (!sharded)
    for (int64_t i = 0; i < c.n_layer; ++i) w.layers_[i] = w.layer_at(i, w.layer_nf4_[i]);
  // Sharded, each layer's block is built whole in a staging block, and this rank keeps its shard.
  Arena staging(backend, "one layer's NF4 projections, while loading sharded base weights");
  const void* staging_block = nullptr;
  if (sharded) {
    staging.add(&staging_block, layout.bytes);
    staging.allocate();
  }
  std::vector<size_t> projections_loaded(static_cast<size_t>(c.n_layer));

  // Then one tensor at a time: read, convert or quantize, copy, drop.
  for (const Placement& pl : placements) {
    if (!pl.from_source) continue;
    const int64_t numel = pl.tensor.numel();
    if (Nf4Weight* q = pl.nf4) {
      const auto layer = static_cast<size_t>(pl.tensor.layer);
      auto* block = static_cast<uint8_t*>(const_cast<void*>(sharded ? staging_block : w.layer_nf4_[layer]));
      const LayerNf4Layout::Buffers& at = layout.proj[static_cast<size_t>(pl.tensor.projection)];
      uint8_t* packed = block + at.packed;
      uint8_t* absmax_codes = block + at.absmax_codes;
      auto* nested_absmax = reinterpret_cast<float*>(block + at.nested_absmax);
      if (const std::optional<Nf4HostWeight> stored = source.read_stored_nf4(pl.tensor)) {
        backend.copy_from_host(packed, stored->packed.data(), stored->packed.size());
        backend.copy_from_host(absmax_codes, stored->absmax_codes.data(), stored->absmax_codes.size());
        backend.copy_from_host(nested_absmax, stored->nested_absmax.data(),
                               stored->nested_absmax.size() * sizeof(float));
        q->nested_offset = stored->nested_offset;
      } else {
        std::vector<float> weight(static_cast<size_t>(numel));
        source.read_float(pl.tensor, weight.data());
        backend.nf4_quantize(weight.data(), numel, packed, absmax_codes, nested_absmax, &q->nested_offset);
      }
      if (sharded && ++projections_loaded[layer] == kProjections.size())
        backend.copy(const_cast<void*>(w.layer_nf4_[layer]), block + shard.index * layout.shard_bytes(),
                     layout.shard_bytes());
      continue;
    }
    std::vector<double> values(static_cast<size_t>(numel));
    source.read_double(pl.tensor, values.data());
    if (pl.tensor.kind == Kind::A_log)  // the model keeps A = -exp(A_log)
      for (double& v : values) v = -std::exp(v);
    const std::vector<std::byte> bytes = encode(values, pl.dtype);
    backend.copy_from_host(const_cast<void*>(*pl.slot), bytes.data(), bytes.size());
  }
  backend.synchronize();  // the shard copies have read the staging block before it goes
  if (tied) w.lm_head_ = w.embedding_;
  return w;
}

void write_random_mamba(const std::filesystem::path& dir, const MambaConfig& c, uint64_t seed) {
  const RandomSource source(c, seed);
  SafetensorsWriter writer;
  for (const MambaTensor& t : mamba_tensors(c, source.has_lm_head())) {
    std::vector<float> values(static_cast<size_t>(t.numel()));
    source.read_float(t, values.data());
    writer.add_float_as(t.name, DType::F32, t.shape, values.data());
  }
  std::filesystem::create_directories(dir);
  writer.write(dir / kSafetensorsName);
  const std::string json = mamba_config_to_json(c).dump(2) + "\n";
  write_file_atomically(dir / kConfigName, std::as_bytes(std::span(json.data(), json.size())));
}

}  // namespace ssmtune
