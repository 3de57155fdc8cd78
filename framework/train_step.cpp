#include "framework/train_step.h"

#include <algorithm>

#include "framework/error.h"
#include "kernels/cpu/gemm.h"

namespace ssmtune {
namespace {

void check_token(uint32_t token, int64_t vocab, int64_t sequence, int64_t position) {
  if (token >= vocab)
    fail("token id {} at sequence {} position {} is not below the model's vocab_size {}", token, sequence, position,
         vocab);
}

}  // namespace

TrainStep::TrainStep(Backend& backend, const MambaWeights& weights, LoraAdapters& adapters,
                     const StepShape& shape)
    : backend_(backend),
      weights_(weights),
      adapters_(adapters),
      shape_(shape),
      rows_(shape.batch * shape.seq_len),
      arena_(backend, "activations and workspaces") {
  const MambaConfig& c = weights.config();
  if (shape.batch <= 0 || shape.seq_len <= 0) fail("batch size and sequence length must be positive");
  if (shape.scan_chunk <= 0) fail("memory.scan_chunk must be positive, got {}", shape.scan_chunk);
  if (shape.loss_slice_rows <= 0) fail("memory.loss_slice must be positive, got {}", shape.loss_slice_rows);
  const size_t act = dtype_size(backend.act_dtype()), master = dtype_size(backend.master_dtype());
  const int64_t T = rows_, D = c.d_inner, xdbl_cols = c.dt_rank + 2 * c.d_state;
  const ScanShape scan{shape.batch, shape.seq_len, D, c.d_state, shape.scan_chunk};

  residual_.resize(static_cast<size_t>(c.n_layer + 1));
  for (void*& r : residual_) arena_.add(&r, T * c.d_model * master);
  layer_acts_.resize(shape.recompute ? 1 : static_cast<size_t>(c.n_layer));
  for (LayerActivations& a : layer_acts_) {
    arena_.add(&a.hn, T * c.d_model * act);
    arena_.add(&a.rstd, T * master);
    arena_.add(&a.xz, T * 2 * D * act);
    arena_.add(&a.u, T * D * act);
    arena_.add(&a.xdbl, T * xdbl_cols * act);
    if (c.has_mixer_norm()) {
      arena_.add(&a.xdbl_raw, T * xdbl_cols * act);
      arena_.add(&a.mixer_rstd, 3 * T * master);
    }
    arena_.add(&a.dt, T * D * act);
    arena_.add(&a.y, T * D * act);
    arena_.add(&a.states, scan.batch * scan.num_chunks() * D * c.d_state * master);
    for (Projection p : kProjections)
      if (adapters.config().targets_projection(p))
        arena_.add(&a.lora_h[static_cast<size_t>(p)], T * adapters.config().rank * act);
  }
  arena_.add(&mixer_out_, T * c.d_model * act);
  arena_.add(&final_normed_, T * c.d_model * act);
  arena_.add(&final_rstd_, T * master);
  arena_.add(&inputs_, T * sizeof(int32_t));
  arena_.add(&targets_, T * sizeof(int32_t));
  arena_.add(&loss_weights_, T * act);
  arena_.add(&d_residual_, T * c.d_model * master);
  arena_.add(&d_act_model_, T * c.d_model * act);
  arena_.add(&d_xz_, T * 2 * D * act);
  arena_.add(&d_u_, T * D * act);
  arena_.add(&d_xdbl_, T * xdbl_cols * act);
  if (c.has_mixer_norm()) arena_.add(&d_xdbl_raw_, T * xdbl_cols * act);
  arena_.add(&d_dt_, T * D * act);
  arena_.add(&d_y_, T * D * act);
  std::vector<std::array<int64_t, 2>> weight_shapes;
  for (Projection p : kProjections) weight_shapes.push_back(projection_shape(c, p));
  arena_.add(&linear_workspace_, backend.linear_workspace_bytes(weight_shapes, T, adapters.config().rank));
  arena_.add(&scan_workspace_, backend.scan_workspace_bytes(scan));
  const int64_t slice = std::min(shape.loss_slice_rows, T);
  arena_.add(&logits_workspace_, backend.cross_entropy_workspace_bytes(T, slice, c.vocab_size));
  arena_.allocate();

  host_inputs_.resize(static_cast<size_t>(T));
  host_targets_.resize(static_cast<size_t>(T));
  host_weights_.resize(static_cast<size_t>(T));
  host_weights_encoded_.resize(T * act);
}

void* TrainStep::act_at(void* base, int64_t elements) const {
  return static_cast<std::byte*>(base) + elements * dtype_size(backend_.act_dtype());
}

void* TrainStep::master_at(void* base, int64_t elements) const {
  return static_cast<std::byte*>(base) + elements * dtype_size(backend_.master_dtype());
}

std::array<std::array<int64_t, 2>, 3> TrainStep::mixer_norm_segments() const {
  const MambaConfig& c = weights_.config();
  return {{{0, c.dt_rank}, {c.dt_rank, c.d_state}, {c.dt_rank + c.d_state, c.d_state}}};
}

TrainStep::LayerActivations& TrainStep::activations(int64_t layer) {
  return layer_acts_[shape_.recompute ? 0 : static_cast<size_t>(layer)];
}

LinearOp TrainStep::linear(int64_t layer, Projection p, LoraPath& storage, uint64_t seed, uint64_t stream) const {
  LinearOp op;
  op.base = &weights_.layer(layer).proj[static_cast<size_t>(p)];
  // Each (micro-batch, layer, projection) draws its own dropout mask.
  const uint64_t dropout_stream = (stream * weights_.config().n_layer + layer) * 4 + static_cast<uint64_t>(p);
  if (auto path = adapters_.path(layer, p, seed, dropout_stream)) {
    storage = *path;
    if (!dropout_enabled_) storage.dropout = 0;
    op.lora = &storage;
  }
  return op;
}

void TrainStep::upload_inputs(const uint32_t* tokens, int64_t row_stride) {
  const int64_t L = shape_.seq_len, vocab = weights_.config().vocab_size;
  for (int64_t b = 0; b < shape_.batch; ++b)
    for (int64_t t = 0; t < L; ++t) {
      const uint32_t input = tokens[b * row_stride + t];
      check_token(input, vocab, b, t);
      host_inputs_[b * L + t] = static_cast<int32_t>(input);
    }
  backend_.copy_from_host(inputs_, host_inputs_.data(), host_inputs_.size() * sizeof(int32_t));
}

void TrainStep::upload_batch(const uint32_t* tokens, const uint8_t* target_mask) {
  const int64_t L = shape_.seq_len, vocab = weights_.config().vocab_size;
  upload_inputs(tokens, L + 1);
  for (int64_t b = 0; b < shape_.batch; ++b)
    for (int64_t t = 0; t < L; ++t) {
      const uint32_t target = tokens[b * (L + 1) + t + 1];
      check_token(target, vocab, b, t + 1);
      host_targets_[b * L + t] = static_cast<int32_t>(target);
      host_weights_[b * L + t] = target_mask[b * L + t] ? 1.0 : 0.0;
    }
  backend_.copy_from_host(targets_, host_targets_.data(), host_targets_.size() * sizeof(int32_t));
  convert_from_double(host_weights_.data(), host_weights_.size(), backend_.act_dtype(), host_weights_encoded_.data());
  backend_.copy_from_host(loss_weights_, host_weights_encoded_.data(), host_weights_encoded_.size());
}

void TrainStep::layer_forward(int64_t i, LayerActivations& a, bool add_previous_mixer, uint64_t seed,
                              uint64_t stream) {
  const MambaConfig& c = weights_.config();
  const MambaLayerWeights& w = weights_.layer(i);
  const int64_t T = rows_, D = c.d_inner, R = c.dt_rank, N = c.d_state, xdbl_cols = R + 2 * N;
  const ScanShape scan{shape_.batch, shape_.seq_len, D, N, shape_.scan_chunk};
  LoraPath lora;
  auto h = [&](Projection p) { return a.lora_h[static_cast<size_t>(p)]; };

  // residual i = residual i-1 + mixer output of layer i-1, fused with this layer's norm.
  if (add_previous_mixer)
    backend_.rmsnorm_forward(residual_[i - 1], mixer_out_, residual_[i], w.norm_weight, a.hn, a.rstd, T, c.d_model,
                             c.layer_norm_epsilon);
  else
    backend_.rmsnorm_forward(residual_[i], nullptr, nullptr, w.norm_weight, a.hn, a.rstd, T, c.d_model,
                             c.layer_norm_epsilon);
  backend_.linear_forward(linear(i, Projection::in_proj, lora, seed, stream), a.hn, c.d_model, T, a.xz, 2 * D,
                          h(Projection::in_proj), linear_workspace_);
  backend_.conv1d_silu_forward(a.xz, 2 * D, w.conv_weight, w.conv_bias, a.u, shape_.batch, shape_.seq_len, D,
                               c.conv_kernel);
  // falcon-mamba normalises dt_r, B and C, each over its own width, between x_proj and their uses.
  const bool mixer_norm = c.has_mixer_norm();
  backend_.linear_forward(linear(i, Projection::x_proj, lora, seed, stream), a.u, D, T,
                          mixer_norm ? a.xdbl_raw : a.xdbl, xdbl_cols, h(Projection::x_proj), linear_workspace_);
  if (mixer_norm) {
    int64_t k = 0;
    for (const auto& [column, width] : mixer_norm_segments())
      backend_.weightless_rmsnorm_forward(act_at(a.xdbl_raw, column), xdbl_cols, act_at(a.xdbl, column), xdbl_cols,
                                          master_at(a.mixer_rstd, k++ * T), T, width, c.mixer_rms_eps);
  }
  backend_.linear_forward(linear(i, Projection::dt_proj, lora, seed, stream), a.xdbl, xdbl_cols, T, a.dt, D,
                          h(Projection::dt_proj), linear_workspace_);
  backend_.selective_scan_forward(scan, a.u, a.dt, w.dt_bias, w.A, act_at(a.xdbl, R), act_at(a.xdbl, R + N),
                                  xdbl_cols, w.D, act_at(a.xz, D), 2 * D, a.y, a.states, scan_workspace_);
  backend_.linear_forward(linear(i, Projection::out_proj, lora, seed, stream), a.y, D, T, mixer_out_, c.d_model,
                          h(Projection::out_proj), linear_workspace_);
}

// Reads as layer_forward read backwards. On entry d_residual_ holds d(residual i+1) and d_act_model_ the
// same in act precision (the gradient of this layer's mixer output); on exit both hold d(residual i).
void TrainStep::layer_backward(int64_t i, LayerActivations& a, uint64_t seed, uint64_t stream) {
  const MambaConfig& c = weights_.config();
  const MambaLayerWeights& w = weights_.layer(i);
  const int64_t T = rows_, D = c.d_inner, R = c.dt_rank, N = c.d_state, xdbl_cols = R + 2 * N;
  const ScanShape scan{shape_.batch, shape_.seq_len, D, N, shape_.scan_chunk};
  LoraPath lora;
  auto h = [&](Projection p) { return a.lora_h[static_cast<size_t>(p)]; };

  backend_.linear_backward(linear(i, Projection::out_proj, lora, seed, stream), a.y, D, T, d_act_model_,
                           c.d_model, h(Projection::out_proj), d_y_, D, false, linear_workspace_);
  backend_.selective_scan_backward(scan, a.u, a.dt, w.dt_bias, w.A, act_at(a.xdbl, R), act_at(a.xdbl, R + N),
                                   xdbl_cols, w.D, act_at(a.xz, D), 2 * D, a.states, d_y_, d_u_, d_dt_,
                                   act_at(d_xdbl_, R), act_at(d_xdbl_, R + N), act_at(d_xz_, D), scan_workspace_);
  backend_.linear_backward(linear(i, Projection::dt_proj, lora, seed, stream), a.xdbl, xdbl_cols, T, d_dt_, D,
                           h(Projection::dt_proj), d_xdbl_, xdbl_cols, false, linear_workspace_);
  // With the mixer norm, d_xdbl_ holds the gradients of the normed dt_r, B and C; x_proj's come through it.
  const bool mixer_norm = c.has_mixer_norm();
  if (mixer_norm) {
    int64_t k = 0;
    for (const auto& [column, width] : mixer_norm_segments())
      backend_.weightless_rmsnorm_backward(act_at(a.xdbl_raw, column), xdbl_cols, master_at(a.mixer_rstd, k++ * T),
                                           act_at(d_xdbl_, column), xdbl_cols, act_at(d_xdbl_raw_, column), xdbl_cols,
                                           T, width);
  }
  backend_.linear_backward(linear(i, Projection::x_proj, lora, seed, stream), a.u, D, T,
                           mixer_norm ? d_xdbl_raw_ : d_xdbl_, xdbl_cols, h(Projection::x_proj), d_u_, D, true,
                           linear_workspace_);
  backend_.conv1d_silu_backward(a.xz, 2 * D, w.conv_weight, w.conv_bias, d_u_, d_xz_, 2 * D, shape_.batch,
                                shape_.seq_len, D, c.conv_kernel);
  backend_.linear_backward(linear(i, Projection::in_proj, lora, seed, stream), a.hn, c.d_model, T, d_xz_, 2 * D,
                           h(Projection::in_proj), d_act_model_, c.d_model, false, linear_workspace_);
  backend_.rmsnorm_backward(residual_[i], w.norm_weight, a.rstd, d_act_model_, d_residual_, i > 0 ? d_act_model_ : nullptr,
                            T, c.d_model);
}

void TrainStep::forward_layers(uint64_t seed, uint64_t stream) {
  const MambaConfig& c = weights_.config();
  backend_.embedding_forward(inputs_, rows_, weights_.embedding(), c.d_model, residual_[0]);
  for (int64_t i = 0; i < c.n_layer; ++i) layer_forward(i, activations(i), i > 0, seed, stream);
  backend_.rmsnorm_forward(residual_[c.n_layer - 1], mixer_out_, residual_[c.n_layer], weights_.norm_f(),
                           final_normed_, final_rstd_, rows_, c.d_model, c.layer_norm_epsilon);
}

double TrainStep::forward_backward(const uint32_t* tokens, const uint8_t* target_mask, double grad_scale,
                                   uint64_t seed, uint64_t stream, const LayerBackwardDone& on_layer_backward_done) {
  const MambaConfig& c = weights_.config();
  upload_batch(tokens, target_mask);
  dropout_enabled_ = true;
  forward_layers(seed, stream);
  // The loss and its gradient come together, slice by slice; d_act_model_ receives d(final normed).
  const double loss = backend_.cross_entropy(final_normed_, weights_.lm_head(), rows_, c.d_model, c.vocab_size,
                                             targets_, loss_weights_, grad_scale, d_act_model_, logits_workspace_,
                                             std::min(shape_.loss_slice_rows, rows_));
  backend_.fill_zero(d_residual_, rows_ * c.d_model * dtype_size(backend_.master_dtype()));
  backend_.rmsnorm_backward(residual_[c.n_layer], weights_.norm_f(), final_rstd_, d_act_model_, d_residual_,
                            d_act_model_, rows_, c.d_model);
  for (int64_t i = c.n_layer - 1; i >= 0; --i) {
    if (shape_.recompute) layer_forward(i, activations(i), false, seed, stream);
    layer_backward(i, activations(i), seed, stream);
    if (on_layer_backward_done) on_layer_backward_done(i);
  }
  return loss;
}

double TrainStep::forward_loss(const uint32_t* tokens, const uint8_t* target_mask) {
  const MambaConfig& c = weights_.config();
  upload_batch(tokens, target_mask);
  dropout_enabled_ = false;
  forward_layers(0, 0);
  return backend_.cross_entropy(final_normed_, weights_.lm_head(), rows_, c.d_model, c.vocab_size, targets_,
                                loss_weights_, 0.0, nullptr, logits_workspace_, std::min(shape_.loss_slice_rows, rows_));
}

std::vector<double> TrainStep::forward_logits(const uint32_t* tokens) {
  const MambaConfig& c = weights_.config();
  upload_inputs(tokens, shape_.seq_len);
  dropout_enabled_ = false;
  forward_layers(0, 0);
  const DType act = backend_.act_dtype();
  auto download = [&](const void* src, int64_t n) {
    std::vector<std::byte> bytes(static_cast<size_t>(n) * dtype_size(act));
    backend_.copy_to_host(bytes.data(), src, bytes.size());
    std::vector<double> values(static_cast<size_t>(n));
    convert_to_double(act, bytes.data(), values.size(), values.data());
    return values;
  };
  const std::vector<double> hidden = download(final_normed_, rows_ * c.d_model);
  const std::vector<double> head = download(weights_.lm_head(), c.vocab_size * c.d_model);
  std::vector<double> logits(static_cast<size_t>(rows_ * c.vocab_size));
  cpu::gemm<double>(false, true, rows_, c.vocab_size, c.d_model, 1.0, hidden.data(), c.d_model, head.data(), c.d_model,
                    0.0, logits.data(), c.vocab_size);
  return logits;
}

}  // namespace ssmtune
