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

void check_checkpoint_every(int64_t k) {
  if (k <= 0) fail("memory.checkpoint_every must be positive (1: every layer's input kept), got {}", k);
}

// The Arena's arithmetic without its allocation: what TrainStep::planned_bytes sums.
class PlanSize {
 public:
  template <typename P>
  void add(P**, size_t bytes) {
    bytes_ += Arena::padded(bytes);
  }
  size_t bytes() const { return bytes_; }

 private:
  size_t bytes_ = 0;
};

}  // namespace

template <typename Plan>
StepPlanBytes TrainStepBuffers::declare(Plan& plan, const BackendSizes& backend, const MambaConfig& c,
                                        const LoraConfig& lora, const StepShape& shape) {
  if (shape.batch <= 0 || shape.seq_len <= 0) fail("batch size and sequence length must be positive");
  if (shape.scan_chunk <= 0) fail("memory.scan_chunk must be positive, got {}", shape.scan_chunk);
  if (shape.loss_slice_rows <= 0) fail("memory.loss_slice must be positive, got {}", shape.loss_slice_rows);
  const int64_t k = shape.checkpoint_every;
  check_checkpoint_every(k);
  if (k > 1 && !shape.recompute)
    fail("memory.checkpoint_every={} needs memory.recompute=true: without recomputation every layer's activations "
         "are kept, and the layer inputs with them (set memory.checkpoint_every=1)", k);
  if (shape.keep_layer_outputs && k == 1)
    fail("memory.keep_layer_outputs=true needs memory.checkpoint_every > 1: with 1 every layer's input is kept "
         "and no residual is rebuilt from the layer outputs");
  const size_t act = dtype_size(backend.act_dtype()), master = dtype_size(backend.master_dtype());
  const int64_t T = shape.batch * shape.seq_len, D = c.d_inner, xdbl_cols = c.dt_rank + 2 * c.d_state;
  const ScanShape scan{shape.batch, shape.seq_len, D, c.d_state, shape.scan_chunk};

  // x_proj's input u comes from the conv, which writes it densely: its h keeps a buffer of its own.
  auto h_columns = [&](Projection p) {
    return p != Projection::x_proj && lora.targets_projection(p) ? lora_h_columns(lora.rank) : 0;
  };
  hn_cols_ = c.d_model + h_columns(Projection::in_proj);
  dt_in_cols_ = c.dt_rank + h_columns(Projection::dt_proj);
  y_cols_ = D + h_columns(Projection::out_proj);

  const size_t carried_history = shape.batch * (c.conv_kernel - 1) * D * act;
  const size_t carried_state = shape.batch * D * c.d_state * master;

  residual_.assign(static_cast<size_t>(c.n_layer + 1), nullptr);
  for (int64_t i = 0; i <= c.n_layer; ++i)
    if (residual_is_checkpoint(i, c.n_layer, k)) plan.add(&residual_[i], T * c.d_model * master);
  segment_residuals_.resize(static_cast<size_t>(std::min(k, c.n_layer) - 1));
  for (void*& r : segment_residuals_) plan.add(&r, T * c.d_model * master);
  kept_layer_out_.assign(static_cast<size_t>(c.n_layer), nullptr);
  // The outputs that add up to the residuals between checkpoints, below the last segment.
  if (shape.keep_layer_outputs)
    for (int64_t j = 0; j + 1 < last_segment_first(c.n_layer, k); ++j)
      if (!residual_is_checkpoint(j + 1, c.n_layer, k))
        plan.add(&kept_layer_out_[static_cast<size_t>(j)], T * c.d_model * act);
  layer_acts_.resize(shape.recompute ? 1 : static_cast<size_t>(c.n_layer));
  for (LayerActivations& a : layer_acts_) {
    plan.add(&a.hn, T * hn_cols_ * act);
    plan.add(&a.rstd, T * master);
    plan.add(&a.xz, T * 2 * D * act);
    plan.add(&a.u, T * D * act);
    plan.add(&a.xdbl, T * xdbl_cols * act);
    if (c.has_mixer_norm()) {
      plan.add(&a.xdbl_raw, T * xdbl_cols * act);
      plan.add(&a.mixer_rstd, 3 * T * master);
    }
    plan.add(&a.dt, T * D * act);
    if (h_columns(Projection::dt_proj) > 0) plan.add(&a.dt_in, T * dt_in_cols_ * act);
    plan.add(&a.y, T * y_cols_ * act);
    plan.add(&a.states, scan.batch * scan.num_chunks() * D * c.d_state * master);
    if (lora.targets_projection(Projection::x_proj))
      plan.add(&a.lora_h[static_cast<size_t>(Projection::x_proj)], T * lora.rank * act);
  }
  carried_in_.resize(shape.context_ranks > 1 ? static_cast<size_t>(c.n_layer) : 0);
  for (CarriedIn& carried : carried_in_) {
    plan.add(&carried.conv_history, carried_history);
    plan.add(&carried.scan_initial, carried_state);
    plan.add(&carried.scan_decay, carried_state);
  }
  plan.add(&mixer_out_, T * c.d_model * act);
  plan.add(&final_normed_, T * c.d_model * act);
  plan.add(&final_rstd_, T * master);
  plan.add(&inputs_, T * sizeof(int32_t));
  plan.add(&targets_, T * sizeof(int32_t));
  plan.add(&doc_start_, T * sizeof(int32_t));
  plan.add(&loss_weights_, T * act);
  plan.add(&d_residual_, T * c.d_model * master);
  plan.add(&d_act_model_, T * c.d_model * act);
  plan.add(&d_xz_, T * 2 * D * act);
  plan.add(&d_u_, T * D * act);
  plan.add(&d_xdbl_, T * xdbl_cols * act);
  if (c.has_mixer_norm()) plan.add(&d_xdbl_raw_, T * xdbl_cols * act);
  plan.add(&d_dt_, T * D * act);
  plan.add(&d_y_, T * D * act);
  if (shape.context_ranks > 1) {
    plan.add(&context_final_, carried_state);
    plan.add(&context_d_initial_, carried_state);
    plan.add(&context_d_history_, carried_history);
  }
  const size_t activation_bytes = plan.bytes();
  std::vector<std::array<int64_t, 2>> weight_shapes;
  for (Projection p : kProjections) weight_shapes.push_back(projection_shape(c, p));
  plan.add(&linear_workspace_, backend.linear_workspace_bytes(weight_shapes, T, lora.rank, lora.dropout > 0));
  plan.add(&scan_workspace_, backend.scan_workspace_bytes(scan));
  const int64_t slice = std::min(shape.loss_slice_rows, T);
  plan.add(&logits_workspace_, backend.cross_entropy_workspace_bytes(T, slice, c.vocab_size));
  return {activation_bytes, plan.bytes() - activation_bytes};
}

bool TrainStepBuffers::residual_is_checkpoint(int64_t i, int64_t n_layer, int64_t checkpoint_every) {
  return i % checkpoint_every == 0 || i == n_layer;
}

int64_t TrainStepBuffers::last_segment_first(int64_t n_layer, int64_t checkpoint_every) {
  return (n_layer - 1) / checkpoint_every * checkpoint_every;
}

void TrainStepBuffers::share_segment_residuals(int64_t checkpoint_every) {
  const auto n_layer = static_cast<int64_t>(residual_.size()) - 1;
  for (int64_t i = 0; i < n_layer; ++i)
    if (!residual_is_checkpoint(i, n_layer, checkpoint_every))
      residual_[i] = segment_residuals_[static_cast<size_t>(i % checkpoint_every - 1)];
}

TrainStep::TrainStep(Backend& backend, const MambaWeights& weights, LoraAdapters& adapters,
                     const StepShape& shape, Communicator* base_weight_comm, ContextExchange* context)
    : backend_(backend),
      weights_(weights),
      adapters_(adapters),
      shape_(shape),
      rows_(shape.batch * shape.seq_len),
      arena_(backend, "activations and workspaces"),
      base_(backend, weights, base_weight_comm),
      context_(context) {
  if ((shape.context_ranks > 1) != (context != nullptr) || (context && context->size() != shape.context_ranks))
    fail("a step split over {} context ranks needs the exchange with as many", shape.context_ranks);
  declare(arena_, backend, weights.config(), adapters.config(), shape);
  arena_.allocate();
  share_segment_residuals(shape.checkpoint_every);

  host_inputs_.resize(static_cast<size_t>(rows_));
  host_targets_.resize(static_cast<size_t>(rows_));
  host_weights_.resize(static_cast<size_t>(rows_));
  host_weights_encoded_.resize(rows_ * dtype_size(backend.act_dtype()));
}

StepPlanBytes TrainStep::planned_bytes(const BackendSizes& backend, const MambaConfig& model, const LoraConfig& lora,
                                       const StepShape& shape) {
  PlanSize plan;
  TrainStepBuffers unallocated;
  return unallocated.declare(plan, backend, model, lora, shape);
}

int64_t TrainStep::regenerated_layer_forwards(int64_t n_layer, int64_t checkpoint_every, bool keep_layer_outputs) {
  check_checkpoint_every(checkpoint_every);
  if (keep_layer_outputs) return 0;
  // Every segment below the last, each of checkpoint_every layers, runs all but its last layer once more.
  const int64_t below_last = last_segment_first(n_layer, checkpoint_every);
  return below_last - below_last / checkpoint_every;
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

std::pair<void*, int64_t> TrainStep::dt_proj_input(const LayerActivations& a) const {
  const MambaConfig& c = weights_.config();
  if (a.dt_in) return {a.dt_in, dt_in_cols_};
  return {a.xdbl, c.dt_rank + 2 * c.d_state};
}

TrainStep::LayerActivations& TrainStep::activations(int64_t layer) {
  return layer_acts_[shape_.recompute ? 0 : static_cast<size_t>(layer)];
}

LinearOp TrainStep::linear(int64_t layer, Projection p, LoraPath& storage, uint64_t seed, uint64_t stream) const {
  LinearOp op;
  op.base = &base_.layer(layer).proj[static_cast<size_t>(p)];
  // Each (micro-batch, layer, projection) draws its own dropout mask.
  const uint64_t dropout_stream = (stream * weights_.config().n_layer + layer) * 4 + static_cast<uint64_t>(p);
  if (auto path = adapters_.path(layer, p, seed, dropout_stream)) {
    storage = *path;
    if (!dropout_enabled_) storage.dropout = 0;
    op.lora = &storage;
    op.h_in_x_columns = p != Projection::x_proj;  // hn, dt_in and y have its columns (declare())
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

void TrainStep::upload_doc_start(const int32_t* doc_start) {
  const int64_t L = shape_.seq_len;
  // A slice after the first continues its rows' documents from the previous slice (doc_start < 0 at its
  // first token) unless one starts right there: its doc_start always goes to the ops.
  const bool continues = context_ && !context_->first();
  bool boundaries = continues && doc_start;
  for (int64_t b = 0; doc_start && b < shape_.batch; ++b)
    for (int64_t t = 0; t < L; ++t) {
      // A token starts a document (its own position) or continues the previous token's.
      const int32_t start = doc_start[b * L + t];
      if (start != t && (t == 0 ? !(continues && start < 0) : start != doc_start[b * L + t - 1]))
        fail("doc_start of sequence {} position {} is {}: expected {} (a document starts there){}", b, t, start, t,
             t == 0 ? "" : fmt::format(" or {} (the previous token's document)", doc_start[b * L + t - 1]));
      boundaries = boundaries || start != 0;
    }
  // Rows without a document start after their first token are plain sequences: the ops' plain path.
  if (boundaries) backend_.copy_from_host(doc_start_, doc_start, static_cast<size_t>(rows_) * sizeof(int32_t));
  boundaries_ = boundaries ? doc_start_ : nullptr;
}

void TrainStep::upload_batch(const uint32_t* tokens, const uint8_t* target_mask, const int32_t* doc_start) {
  const int64_t L = shape_.seq_len, vocab = weights_.config().vocab_size;
  upload_inputs(tokens, L + 1);
  upload_doc_start(doc_start);
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

void TrainStep::layer_forward(int64_t i, LayerActivations& a, bool add_previous_mixer, bool first_forward,
                              bool output_needed, uint64_t seed, uint64_t stream) {
  const MambaConfig& c = weights_.config();
  const MambaLayerWeights& w = base_.layer(i);
  const int64_t T = rows_, D = c.d_inner, R = c.dt_rank, N = c.d_state, xdbl_cols = R + 2 * N;
  const ScanShape scan{shape_.batch, shape_.seq_len, D, N, shape_.scan_chunk};
  LoraPath lora;
  auto h = [&](Projection p) { return a.lora_h[static_cast<size_t>(p)]; };

  // The backward's forwards leave their outputs in mixer_out_: kept ones are the first forward's.
  if (add_previous_mixer)
    add_residual_and_norm(i, first_forward ? layer_output(i - 1) : mixer_out_, a);
  else
    backend_.rmsnorm_forward(residual_[i], nullptr, nullptr, w.norm_weight, a.hn, hn_cols_, a.rstd, T, c.d_model,
                             c.layer_norm_epsilon);
  backend_.linear_forward(linear(i, Projection::in_proj, lora, seed, stream), a.hn, hn_cols_, T, a.xz, 2 * D,
                          h(Projection::in_proj), linear_workspace_);
  // What crosses into this slice: exchanged in the first forward, read back in the backward's.
  const bool exchange = context_ && first_forward;
  const bool carried_in = context_ && !context_->first();
  CarriedIn* carried = context_ ? &carried_in_[static_cast<size_t>(i)] : nullptr;
  const void* history = exchange     ? context_->conv_history(a.xz, 2 * D, carried->conv_history)
                        : carried_in ? carried->conv_history
                                     : nullptr;
  backend_.conv1d_silu_forward(a.xz, 2 * D, w.conv_weight, w.conv_bias, a.u, shape_.batch, shape_.seq_len, D,
                               c.conv_kernel, boundaries_, history);
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
  const auto [dt_input, dt_input_cols] = dt_proj_input(a);
  if (a.dt_in) {  // dt_r into rows with room for dt_proj's h: a narrow [T, R] copy
    const size_t act = dtype_size(backend_.act_dtype());
    backend_.copy_rows(a.dt_in, dt_in_cols_ * act, a.xdbl, xdbl_cols * act, R * act, T);
  }
  backend_.linear_forward(linear(i, Projection::dt_proj, lora, seed, stream), dt_input, dt_input_cols, T, a.dt, D,
                          h(Projection::dt_proj), linear_workspace_);
  if (exchange) {  // this slice from a zero state, then from the state the slices before it hand over
    backend_.selective_scan_forward_begin(scan, a.u, a.dt, w.dt_bias, w.A, act_at(a.xdbl, R), xdbl_cols, a.states,
                                          scan_workspace_, boundaries_, context_final_, carried->scan_decay);
    const void* initial_state = context_->scan_initial_state(context_final_, carried->scan_decay, carried->scan_initial);
    backend_.selective_scan_forward_end(scan, a.u, a.dt, w.dt_bias, w.A, act_at(a.xdbl, R), act_at(a.xdbl, R + N),
                                        xdbl_cols, w.D, act_at(a.xz, D), 2 * D, a.y, y_cols_, a.states,
                                        scan_workspace_, boundaries_, initial_state);
  } else {
    backend_.selective_scan_forward(scan, a.u, a.dt, w.dt_bias, w.A, act_at(a.xdbl, R), act_at(a.xdbl, R + N),
                                    xdbl_cols, w.D, act_at(a.xz, D), 2 * D, a.y, y_cols_, a.states, scan_workspace_,
                                    boundaries_, carried_in ? carried->scan_initial : nullptr);
  }
  const LinearOp out_proj = linear(i, Projection::out_proj, lora, seed, stream);
  if (output_needed)
    backend_.linear_forward(out_proj, a.y, y_cols_, T, first_forward ? layer_output(i) : mixer_out_, c.d_model,
                            h(Projection::out_proj), linear_workspace_);
  else if (out_proj.lora)
    backend_.lora_down_projection(out_proj, a.y, y_cols_, T, h(Projection::out_proj), linear_workspace_);
}

void* TrainStep::layer_output(int64_t j) const {
  void* kept = kept_layer_out_[static_cast<size_t>(j)];
  return kept ? kept : mixer_out_;
}

void TrainStep::add_residual_and_norm(int64_t i, const void* previous_output, LayerActivations& a) {
  const MambaConfig& c = weights_.config();
  backend_.rmsnorm_forward(residual_[i - 1], previous_output, residual_[i], base_.layer(i).norm_weight, a.hn, hn_cols_,
                           a.rstd, rows_, c.d_model, c.layer_norm_epsilon);
}

// Reads as layer_forward read backwards. On entry d_residual_ holds d(residual i+1) and d_act_model_ the
// same in act precision (the gradient of this layer's mixer output); on exit both hold d(residual i).
void TrainStep::layer_backward(int64_t i, LayerActivations& a, uint64_t seed, uint64_t stream) {
  const MambaConfig& c = weights_.config();
  const MambaLayerWeights& w = base_.layer(i);
  const int64_t T = rows_, D = c.d_inner, R = c.dt_rank, N = c.d_state, xdbl_cols = R + 2 * N;
  const ScanShape scan{shape_.batch, shape_.seq_len, D, N, shape_.scan_chunk};
  LoraPath lora;
  auto h = [&](Projection p) { return a.lora_h[static_cast<size_t>(p)]; };

  backend_.linear_backward(linear(i, Projection::out_proj, lora, seed, stream), a.y, y_cols_, T, d_act_model_,
                           c.d_model, h(Projection::out_proj), d_y_, D, false, linear_workspace_);
  // What crossed into this slice in the forward, and the scan state's gradient from the slices after it.
  const bool carried_in = context_ && !context_->first();
  const CarriedIn* carried = context_ ? &carried_in_[static_cast<size_t>(i)] : nullptr;
  const void* history = carried_in ? carried->conv_history : nullptr;
  const void* initial_state = carried_in ? carried->scan_initial : nullptr;
  if (context_) {  // the gradient w.r.t. this slice's first state with none arriving, then with what arrives
    backend_.selective_scan_backward_begin(scan, a.u, a.dt, w.dt_bias, w.A, act_at(a.xdbl, R), act_at(a.xdbl, R + N),
                                           xdbl_cols, act_at(a.xz, D), 2 * D, a.states, d_y_, scan_workspace_,
                                           boundaries_, initial_state, context_d_initial_);
    const void* d_final_state = context_->scan_final_state_grad(context_d_initial_, carried->scan_decay);
    backend_.selective_scan_backward_end(scan, a.u, a.dt, w.dt_bias, w.A, act_at(a.xdbl, R), act_at(a.xdbl, R + N),
                                         xdbl_cols, w.D, act_at(a.xz, D), 2 * D, a.states, d_y_, d_u_, d_dt_,
                                         act_at(d_xdbl_, R), act_at(d_xdbl_, R + N), act_at(d_xz_, D),
                                         scan_workspace_, boundaries_, initial_state, d_final_state);
  } else {
    backend_.selective_scan_backward(scan, a.u, a.dt, w.dt_bias, w.A, act_at(a.xdbl, R), act_at(a.xdbl, R + N),
                                     xdbl_cols, w.D, act_at(a.xz, D), 2 * D, a.states, d_y_, d_u_, d_dt_,
                                     act_at(d_xdbl_, R), act_at(d_xdbl_, R + N), act_at(d_xz_, D), scan_workspace_,
                                     boundaries_, nullptr, nullptr, nullptr);
  }
  const auto [dt_input, dt_input_cols] = dt_proj_input(a);
  backend_.linear_backward(linear(i, Projection::dt_proj, lora, seed, stream), dt_input, dt_input_cols, T, d_dt_, D,
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
  const void* d_tail = nullptr;  // the next slice's gradient w.r.t. this slice's last conv inputs
  if (context_) {
    backend_.conv1d_silu_history_grad(a.xz, 2 * D, w.conv_weight, w.conv_bias, d_u_, shape_.batch, shape_.seq_len, D,
                                      c.conv_kernel, boundaries_, history, context_d_history_);
    d_tail = context_->conv_tail_gradient(context_d_history_);
  }
  backend_.conv1d_silu_backward(a.xz, 2 * D, w.conv_weight, w.conv_bias, d_u_, d_xz_, 2 * D, shape_.batch,
                                shape_.seq_len, D, c.conv_kernel, boundaries_, history, d_tail);
  backend_.linear_backward(linear(i, Projection::in_proj, lora, seed, stream), a.hn, hn_cols_, T, d_xz_, 2 * D,
                           h(Projection::in_proj), d_act_model_, c.d_model, false, linear_workspace_);
  backend_.rmsnorm_backward(residual_[i], w.norm_weight, a.rstd, d_act_model_, d_residual_, i > 0 ? d_act_model_ : nullptr,
                            T, c.d_model);
}

void TrainStep::forward_layers(uint64_t seed, uint64_t stream) {
  const MambaConfig& c = weights_.config();
  adapters_.refresh_act_params();  // the optimizer has written the parameters since the last pass
  backend_.embedding_forward(inputs_, rows_, weights_.embedding(), c.d_model, residual_[0]);
  for (int64_t i = 0; i < c.n_layer; ++i) {
    base_.acquire(i, i + 1 < c.n_layer ? i + 1 : -1);
    layer_forward(i, activations(i), i > 0, true, true, seed, stream);
  }
  base_.complete();
  backend_.rmsnorm_forward(residual_[c.n_layer - 1], layer_output(c.n_layer - 1), residual_[c.n_layer],
                           weights_.norm_f(), final_normed_, c.d_model, final_rstd_, rows_, c.d_model,
                           c.layer_norm_epsilon);
}

// forward_layers read backwards, one segment of layers [first, top) at a time from the last: segments of
// checkpoint_every layers from layer 0 (one layer each when k = 1). A segment's inputs above its first
// are gone (their buffers serve every segment), so the backward regenerates them upwards from its
// checkpoint: by re-running its forward, residual first, whose run of its last layer leaves the
// activations that layer's backward reads; or, with keep_layer_outputs, by adding the kept layer outputs
// (add_residual_and_norm, the forward's own op), after which its last layer too recomputes. Then each
// layer, downwards, re-runs its own forward from its input (layer recomputation) and runs its backward.
// The last segment's inputs are still in place after forward_layers: there only the layer recomputation
// runs. Base weights are acquired in that order, each acquire naming the layer acquired after it.
void TrainStep::backward_layers(uint64_t seed, uint64_t stream, const LayerBackwardDone& on_layer_backward_done) {
  const int64_t n_layer = weights_.config().n_layer, k = shape_.checkpoint_every;
  for (int64_t top = n_layer; top > 0;) {
    const int64_t first = (top - 1) / k * k;
    const int64_t next_segment = first > 0 ? (first - 1) / k * k : -1;  // the first layer it acquires
    const int64_t after_top = top - 2 >= first ? top - 2 : next_segment;  // acquired after layer top-1
    // The last segment, and every segment of one layer (k = 1, and always without recompute), has its
    // inputs in place: there the pass up only acquires (and recomputes) its last layer.
    const bool in_place = top == n_layer || first == top - 1;
    const bool rebuilt = shape_.keep_layer_outputs && !in_place;
    const int64_t up_from = rebuilt ? first + 1 : in_place ? top - 1 : first;
    for (int64_t j = up_from; j < top; ++j) {
      base_.acquire(j, j + 1 < top ? j + 1 : after_top);
      if (rebuilt) add_residual_and_norm(j, kept_layer_out_[static_cast<size_t>(j - 1)], activations(j));
      else if (shape_.recompute) layer_forward(j, activations(j), j > up_from, false, j + 1 < top, seed, stream);
    }
    for (int64_t i = top - 1; i >= first; --i) {
      if (i < top - 1) base_.acquire(i, i > first ? i - 1 : next_segment);
      // Below the segment's last layer (only k > 1, with recompute, has such), and the last one itself
      // when the pass up only added.
      if (i < top - 1 || rebuilt) layer_forward(i, activations(i), false, false, false, seed, stream);
      layer_backward(i, activations(i), seed, stream);
      if (on_layer_backward_done) on_layer_backward_done(i);
    }
    top = first;
  }
  base_.complete();
}

double TrainStep::forward_backward(const uint32_t* tokens, const uint8_t* target_mask, double grad_scale,
                                   uint64_t seed, uint64_t stream, const int32_t* doc_start,
                                   const LayerBackwardDone& on_layer_backward_done) {
  const MambaConfig& c = weights_.config();
  upload_batch(tokens, target_mask, doc_start);
  dropout_enabled_ = true;
  forward_layers(seed, stream);
  // The loss and its gradient come together, slice by slice; d_act_model_ receives d(final normed).
  const double loss = backend_.cross_entropy(final_normed_, weights_.lm_head(), rows_, c.d_model, c.vocab_size,
                                             targets_, loss_weights_, grad_scale, d_act_model_, logits_workspace_,
                                             std::min(shape_.loss_slice_rows, rows_));
  backend_.fill_zero(d_residual_, rows_ * c.d_model * dtype_size(backend_.master_dtype()));
  backend_.rmsnorm_backward(residual_[c.n_layer], weights_.norm_f(), final_rstd_, d_act_model_, d_residual_,
                            d_act_model_, rows_, c.d_model);
  backward_layers(seed, stream, on_layer_backward_done);
  if (context_) context_->wait();
  return loss;
}

double TrainStep::forward_loss(const uint32_t* tokens, const uint8_t* target_mask, const int32_t* doc_start) {
  const MambaConfig& c = weights_.config();
  upload_batch(tokens, target_mask, doc_start);
  dropout_enabled_ = false;
  forward_layers(0, 0);
  if (context_) context_->wait();
  return backend_.cross_entropy(final_normed_, weights_.lm_head(), rows_, c.d_model, c.vocab_size, targets_,
                                loss_weights_, 0.0, nullptr, logits_workspace_, std::min(shape_.loss_slice_rows, rows_));
}

std::vector<double> TrainStep::forward_logits(const uint32_t* tokens) {
  const MambaConfig& c = weights_.config();
  upload_inputs(tokens, shape_.seq_len);
  upload_doc_start(nullptr);
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
