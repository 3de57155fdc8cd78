#include "framework/generation.h"

#include <algorithm>
#include <cmath>

#include "framework/error.h"
#include "kernels/common/counter_rng.h"

namespace ssmtune {

Decoder::Decoder(Backend& backend, const MambaWeights& weights, const LoraAdapters* adapters)
    : backend_(backend), weights_(weights), adapters_(adapters), arena_(backend, "decoding buffers and states") {
  const MambaConfig& c = weights.config();
  const size_t act = dtype_size(backend.act_dtype()), master = dtype_size(backend.master_dtype());
  const int64_t D = c.d_inner, xdbl_cols = c.dt_rank + 2 * c.d_state;
  const int64_t rank = adapters ? adapters->config().rank : 0;
  for (void*& r : residual_) arena_.add(&r, c.d_model * master);
  arena_.add(&normed_, c.d_model * act);
  arena_.add(&rstd_, 3 * master);
  arena_.add(&xz_, 2 * D * act);
  arena_.add(&u_, D * act);
  arena_.add(&xdbl_, xdbl_cols * act);
  if (c.has_mixer_norm()) arena_.add(&xdbl_raw_, xdbl_cols * act);
  arena_.add(&dt_, D * act);
  arena_.add(&y_, D * act);
  arena_.add(&mixer_out_, c.d_model * act);
  if (rank > 0) arena_.add(&lora_h_, rank * act);
  arena_.add(&conv_windows_, c.n_layer * D * (c.conv_kernel - 1) * master);
  arena_.add(&ssm_states_, c.n_layer * D * c.d_state * master);
  arena_.add(&logits_, c.vocab_size * master);
  arena_.add(&token_, sizeof(int32_t));
  std::vector<std::array<int64_t, 2>> weight_shapes;
  for (Projection p : kProjections) weight_shapes.push_back(projection_shape(c, p));
  arena_.add(&linear_workspace_, backend.linear_workspace_bytes(weight_shapes, 1, rank, false));
  arena_.allocate();  // zero-filled: the states start empty
  host_logits_bytes_.resize(static_cast<size_t>(c.vocab_size) * master);
  host_logits_.resize(static_cast<size_t>(c.vocab_size));
  if (adapters_) adapters_->refresh_act_params();
}

void Decoder::reset() {
  const MambaConfig& c = weights_.config();
  const size_t master = dtype_size(backend_.master_dtype());
  backend_.fill_zero(conv_windows_, c.n_layer * c.d_inner * (c.conv_kernel - 1) * master);
  backend_.fill_zero(ssm_states_, c.n_layer * c.d_inner * c.d_state * master);
  position_ = 0;
  if (adapters_) adapters_->refresh_act_params();
}

LinearOp Decoder::linear(int64_t layer, Projection p, LoraPath& storage) const {
  LinearOp op;
  op.base = &weights_.layer(layer).proj[static_cast<size_t>(p)];
  if (adapters_) {
    if (auto path = adapters_->path(layer, p, 0, 0)) {
      storage = *path;
      storage.dropout = 0;  // inference
      op.lora = &storage;
    }
  }
  return op;
}

// layer_forward of TrainStep for one row, with the conv and the scan stepped from the carried state.
void Decoder::layer_step(int64_t i) {
  const MambaConfig& c = weights_.config();
  const MambaLayerWeights& w = weights_.layer(i);
  const int64_t D = c.d_inner, R = c.dt_rank, N = c.d_state, K = c.conv_kernel, xdbl_cols = R + 2 * N;
  const size_t act = dtype_size(backend_.act_dtype()), master = dtype_size(backend_.master_dtype());
  auto act_at = [act](void* base, int64_t elements) { return static_cast<std::byte*>(base) + elements * act; };
  auto master_at = [master](void* base, int64_t elements) { return static_cast<std::byte*>(base) + elements * master; };
  LoraPath lora;

  // residual i = residual i-1 + mixer output of layer i-1, fused with this layer's norm.
  if (i == 0) {
    backend_.rmsnorm_forward(residual_[current_], nullptr, nullptr, w.norm_weight, normed_, c.d_model, rstd_, 1,
                             c.d_model, c.layer_norm_epsilon);
  } else {
    backend_.rmsnorm_forward(residual_[current_], mixer_out_, residual_[1 - current_], w.norm_weight, normed_,
                             c.d_model, rstd_, 1, c.d_model, c.layer_norm_epsilon);
    current_ = 1 - current_;
  }
  backend_.linear_forward(linear(i, Projection::in_proj, lora), normed_, c.d_model, 1, xz_, 2 * D, lora_h_,
                          linear_workspace_);
  backend_.conv1d_silu_step(xz_, 2 * D, w.conv_weight, w.conv_bias, master_at(conv_windows_, i * D * (K - 1)), u_, 1, D,
                            K);
  const bool mixer_norm = c.has_mixer_norm();
  backend_.linear_forward(linear(i, Projection::x_proj, lora), u_, D, 1, mixer_norm ? xdbl_raw_ : xdbl_, xdbl_cols,
                          lora_h_, linear_workspace_);
  if (mixer_norm) {
    // falcon-mamba normalises dt_r, B and C, each over its own width (TrainStep::mixer_norm_segments).
    const std::array<std::array<int64_t, 2>, 3> segments{{{0, R}, {R, N}, {R + N, N}}};
    int64_t k = 0;
    for (const auto& [column, width] : segments)
      backend_.weightless_rmsnorm_forward(act_at(xdbl_raw_, column), xdbl_cols, act_at(xdbl_, column), xdbl_cols,
                                          master_at(rstd_, k++), 1, width, c.mixer_rms_eps);
  }
  backend_.linear_forward(linear(i, Projection::dt_proj, lora), xdbl_, xdbl_cols, 1, dt_, D, lora_h_,
                          linear_workspace_);
  backend_.selective_scan_step(u_, dt_, w.dt_bias, w.A, act_at(xdbl_, R), act_at(xdbl_, R + N), xdbl_cols, w.D,
                               act_at(xz_, D), 2 * D, master_at(ssm_states_, i * D * N), y_, 1, D, N);
  backend_.linear_forward(linear(i, Projection::out_proj, lora), y_, D, 1, mixer_out_, c.d_model, lora_h_,
                          linear_workspace_);
}

void Decoder::feed(uint32_t token) {
  const MambaConfig& c = weights_.config();
  if (token >= c.vocab_size)
    fail("token id {} at position {} is not below the model's vocab_size {}", token, position_, c.vocab_size);
  const int32_t id = static_cast<int32_t>(token);
  backend_.copy_from_host(token_, &id, sizeof id);
  current_ = 0;
  backend_.embedding_forward(token_, 1, weights_.embedding(), c.d_model, residual_[current_]);
  for (int64_t i = 0; i < c.n_layer; ++i) layer_step(i);
  backend_.rmsnorm_forward(residual_[current_], mixer_out_, residual_[1 - current_], weights_.norm_f(), normed_,
                           c.d_model, rstd_, 1, c.d_model, c.layer_norm_epsilon);
  ++position_;
}

std::span<const double> Decoder::next_logits() {
  if (position_ == 0) fail("internal: Decoder::next_logits before any token was fed");
  const MambaConfig& c = weights_.config();
  backend_.lm_head_logits(normed_, weights_.lm_head(), 1, c.d_model, c.vocab_size, logits_);
  backend_.copy_to_host(host_logits_bytes_.data(), logits_, host_logits_bytes_.size());
  convert_to_double(backend_.master_dtype(), host_logits_bytes_.data(), host_logits_.size(), host_logits_.data());
  return host_logits_;
}

namespace {

void check_sampling_options(const SamplingOptions& options) {
  if (!(options.temperature >= 0) || !std::isfinite(options.temperature))
    fail("temperature must be a finite number >= 0 (0: greedy), got {}", options.temperature);
  if (!(options.top_p > 0 && options.top_p <= 1)) fail("top-p must be in (0, 1], got {}", options.top_p);
  if (options.vocab_limit < 0) fail("internal: negative vocab_limit {}", options.vocab_limit);
}

}  // namespace

void check_generation_options(const GenerationOptions& options) {
  if (options.max_new_tokens < 0) fail("max-new-tokens must be >= 0, got {}", options.max_new_tokens);
  check_sampling_options(options.sampling);
}

Sampler::Sampler(const SamplingOptions& options, int64_t vocab) : options_(options), vocab_(vocab) {
  check_sampling_options(options);
  if (options.vocab_limit > 0) vocab_ = std::min(vocab_, options.vocab_limit);
  weights_.resize(static_cast<size_t>(vocab_));
  order_.resize(static_cast<size_t>(vocab_));
}

uint32_t Sampler::next(std::span<const double> logits) {
  if (static_cast<int64_t>(logits.size()) < vocab_)
    fail("internal: {} logits for a sampler over {} ids", logits.size(), vocab_);
  const auto candidates = logits.first(static_cast<size_t>(vocab_));
  for (const double l : candidates)
    if (!std::isfinite(l)) fail("the model produced a non-finite logit ({}): its weights or adapter are broken", l);
  const uint32_t best = static_cast<uint32_t>(std::max_element(candidates.begin(), candidates.end()) -
                                              candidates.begin());  // the first of equal maxima
  const uint64_t draw = draws_++;
  if (options_.temperature == 0) return best;

  // Probabilities up to normalisation, exp((l - max) / T) in (0, 1]; the most likely first when top_p < 1.
  const double max_logit = candidates[best];
  for (size_t i = 0; i < candidates.size(); ++i)
    weights_[i] = std::exp((candidates[i] - max_logit) / options_.temperature);
  for (size_t i = 0; i < order_.size(); ++i) order_[i] = static_cast<uint32_t>(i);
  size_t kept = order_.size();
  double kept_mass = 0;
  if (options_.top_p < 1) {
    // Descending probability, ties by id, so the nucleus is the same set on every platform.
    std::sort(order_.begin(), order_.end(), [this](uint32_t a, uint32_t b) {
      return weights_[a] != weights_[b] ? weights_[a] > weights_[b] : a < b;
    });
    double total = 0;
    for (const double w : weights_) total += w;
    for (kept = 0; kept < order_.size() && kept_mass < options_.top_p * total; ++kept)
      kept_mass += weights_[order_[kept]];
  } else {
    for (const double w : weights_) kept_mass += w;
  }
  // u uniform in [0, 1) with 53 random bits, then the first token whose cumulative weight passes u * mass.
  const double u = static_cast<double>(counter_random_u64(options_.seed, 0, draw) >> 11) * 0x1.0p-53;
  const double target = u * kept_mass;
  double cumulative = 0;
  for (size_t k = 0; k < kept; ++k) {
    cumulative += weights_[order_[k]];
    if (cumulative > target) return order_[k];
  }
  return order_[kept - 1];  // u * mass rounded up to the total
}

std::vector<uint32_t> generate(Decoder& decoder, std::span<const uint32_t> prompt, const GenerationOptions& options,
                               const std::function<void(uint32_t)>& on_token) {
  if (prompt.empty()) fail("the prompt is empty: generation needs at least one token to start from");
  check_generation_options(options);
  Sampler sampler(options.sampling, decoder.vocab_size());
  decoder.reset();
  for (const uint32_t token : prompt) decoder.feed(token);
  std::vector<uint32_t> generated;
  generated.reserve(static_cast<size_t>(std::min<int64_t>(options.max_new_tokens, 1 << 16)));
  for (int64_t n = 0; n < options.max_new_tokens; ++n) {
    const uint32_t token = sampler.next(decoder.next_logits());
    if (options.stop_token && token == *options.stop_token) break;
    generated.push_back(token);
    if (on_token) on_token(token);
    if (n + 1 < options.max_new_tokens) decoder.feed(token);
  }
  return generated;
}

}  // namespace ssmtune
