// One micro-batch of QLoRA training: the forward through embeddings, layers, final norm and the sliced
// LM-head loss, then the hand-written backward, layer by layer in reverse, accumulating adapter
// gradients. Memory is planned once in the constructor (framework/arena.h): with recompute each layer
// keeps only its input (the residual stream) and re-runs its forward in the backward; without, every
// layer keeps its activations. With recompute and memory.checkpoint_every = k > 1 only every k-th
// layer's input is kept, and the backward regenerates the others segment by segment (backward_layers):
// by re-running the segment's layers, or, with memory.keep_layer_outputs, from the layer outputs kept in
// act precision by the forward's own residual additions.
// The selective scan keeps only chunk-boundary states either way.
// falcon_mamba models (MambaConfig::has_mixer_norm) add the weightless norm of dt_r, B and C between
// x_proj and their uses, and its backward. Each layer's base weights come from LayerWeights
// (framework/layer_weights.h), which all-gathers them layer by layer when they are sharded over ranks.
#pragma once
#include <array>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "distributed/communicator.h"
#include "framework/arena.h"
#include "framework/context_parallel.h"
#include "framework/layer_weights.h"
#include "framework/lora.h"
#include "framework/mamba_model.h"

namespace ssmtune {

struct StepShape {
  int64_t batch = 1;
  int64_t seq_len = 128;
  int64_t scan_chunk = 256;       // tokens per selective-scan chunk
  bool recompute = true;          // layer-level recomputation
  int64_t loss_slice_rows = 1024; // tokens per LM-head slice
  // parallel.context: the ranks one sequence is split over (framework/context_parallel.h); seq_len is
  // then this rank's slice of it.
  int64_t context_ranks = 1;
  // memory.checkpoint_every (k, needs recompute when > 1): the residual stream is kept at the inputs of
  // layers 0, k, 2k, ... and of the final norm; the backward re-runs each segment of k layers from its
  // first input to regenerate the others. 1: every layer's input is kept.
  int64_t checkpoint_every = 1;
  // memory.keep_layer_outputs (needs checkpoint_every > 1): the forward keeps the output of each layer
  // whose sum with the residual is not a checkpoint, in act precision (half of a residual's bytes in
  // bf16), and the backward rebuilds a segment's residuals from its checkpoint by the forward's own fused
  // additions (bit for bit) instead of re-running its layers. The last segment keeps nothing: its
  // residuals are still in place when the backward starts.
  bool keep_layer_outputs = false;
};

// The bytes of a step's memory plan: activations (with their gradients and the inputs) and the ops'
// workspaces.
struct StepPlanBytes {
  size_t activations = 0, workspaces = 0;
  size_t total() const { return activations + workspaces; }
};

// The buffers of a step's memory plan, a base of TrainStep: declare() lists them once, both for the
// Arena that TrainStep allocates and for TrainStep::planned_bytes, which only sizes it.
struct TrainStepBuffers {
  struct LayerActivations {
    // in_proj, dt_proj and out_proj keep their LoRA h in spare columns of their inputs (hn, dt_in, y:
    // Backend h_in_x_columns, lora_h_columns(rank) wide when the projection has an adapter).
    void* hn = nullptr;          // act [T, hn_cols_]  normed layer input | in_proj's h
    void* dt_in = nullptr;       // act [T, dt_in_cols_] with dt_proj's adapter: dt_r | dt_proj's h
    void* rstd = nullptr;        // master [T]
    void* xz = nullptr;          // act [T, 2*d_inner] in_proj output: x | z
    void* u = nullptr;           // act [T, d_inner]   conv + SiLU
    void* xdbl = nullptr;        // act [T, R + 2N]    dt_r | B | C as dt_proj and the scan read them
    void* xdbl_raw = nullptr;    // act [T, R + 2N]    with the mixer norm: x_proj output before it
    void* mixer_rstd = nullptr;  // master [3, T]      with the mixer norm: rstd of dt_r, B, C
    void* dt = nullptr;          // act [T, d_inner]   dt_proj output (before bias and softplus)
    void* y = nullptr;           // act [T, y_cols_]   gated scan output | out_proj's h
    void* states = nullptr;      // master [batch, chunks, d_inner, N]
    std::array<void*, 4> lora_h{};  // act [T, rank] for x_proj, whose input u has no spare columns
  };
  // With context parallelism, what crossed into a layer's slice in the step's first forward: kept per
  // layer for its backward and for the forwards the backward runs again, which then exchange nothing.
  struct CarriedIn {
    void* conv_history = nullptr;  // act [batch, K-1, d_inner]  the previous slice's last conv inputs
    void* scan_initial = nullptr;  // master [batch, d_inner, N] the scan state entering the slice
    void* scan_decay = nullptr;    // master [batch, d_inner, N] how an entering state carries through it
  };

  // Row strides of the inputs that carry h: the width plus the h columns of that projection's adapter.
  int64_t hn_cols_ = 0, dt_in_cols_ = 0, y_cols_ = 0;

  // master [T, d_model] each: residual i is the input of layer i, residual n_layer the final norm's. With
  // checkpoint_every = k, residual i has a buffer of its own only at i % k == 0 and i == n_layer (the
  // checkpoints); the others share the min(k, n_layer) - 1 segment buffers, residual i the (i % k - 1)-th,
  // so that the layers of one segment never share one (share_segment_residuals() points them there).
  std::vector<void*> residual_;              // n_layer + 1
  std::vector<void*> segment_residuals_;
  // act [T, d_model] each, per layer: where the first forward leaves layer j's output. With
  // keep_layer_outputs a buffer of its own when the backward rebuilds residual j+1 from it, else (null)
  // mixer_out_, which the next layer's norm consumes at once.
  std::vector<void*> kept_layer_out_;        // n_layer
  std::vector<LayerActivations> layer_acts_; // n_layer, or one shared when recomputing
  std::vector<CarriedIn> carried_in_;        // n_layer under context parallelism, else empty
  void* mixer_out_ = nullptr;                // act [T, d_model]
  void* final_normed_ = nullptr;             // act [T, d_model]
  void* final_rstd_ = nullptr;               // master [T]
  int32_t* inputs_ = nullptr;                // [T]
  int32_t* targets_ = nullptr;               // [T]
  int32_t* doc_start_ = nullptr;             // [T] where each token's document starts (packed documents)
  void* loss_weights_ = nullptr;             // act [T]
  // gradients (shared by all layers)
  void* d_residual_ = nullptr;               // master [T, d_model]
  void* d_act_model_ = nullptr;              // act [T, d_model]: d mixer output, then d normed input
  void* d_xz_ = nullptr;                     // act [T, 2*d_inner]
  void* d_u_ = nullptr;                      // act [T, d_inner]
  void* d_xdbl_ = nullptr;                   // act [T, R + 2N]
  void* d_xdbl_raw_ = nullptr;               // act [T, R + 2N]: with the mixer norm, d(x_proj output)
  void* d_dt_ = nullptr;                     // act [T, d_inner]
  void* d_y_ = nullptr;                      // act [T, d_inner]
  // context parallelism's scratch: this slice's scan final state from zero, the scan's gradient w.r.t.
  // its first state without an incoming one, the conv's gradient w.r.t. its history
  void* context_final_ = nullptr;            // master [batch, d_inner, N]
  void* context_d_initial_ = nullptr;        // master [batch, d_inner, N]
  void* context_d_history_ = nullptr;        // act [batch, K-1, d_inner]
  // workspaces
  void* linear_workspace_ = nullptr;
  void* scan_workspace_ = nullptr;
  void* logits_workspace_ = nullptr;         // the LM head slices (Backend::cross_entropy_workspace_bytes)

  // Declares every buffer in `plan` (an Arena, or a byte count): `backend` gives the element and
  // scratch sizes. Errors name the recipe key of a bad shape.
  template <typename Plan>
  StepPlanBytes declare(Plan& plan, const BackendSizes& backend, const MambaConfig& c, const LoraConfig& lora,
                        const StepShape& shape);
  // Whether residual i is a checkpoint, with a buffer of its own (see residual_).
  static bool residual_is_checkpoint(int64_t i, int64_t n_layer, int64_t checkpoint_every);
  // The first layer of the last segment, whose inputs the backward finds in place.
  static int64_t last_segment_first(int64_t n_layer, int64_t checkpoint_every);
  // After the plan is allocated: the other residuals into the segment buffers.
  void share_segment_residuals(int64_t checkpoint_every);
};

class TrainStep : private TrainStepBuffers {
 public:
  // base_weight_comm gathers the layers of sharded base weights (framework/layer_weights.h); unused
  // (may be null) when the weights are whole.
  // context: the exchanges with the other slices when shape.context_ranks > 1 (its slice shape must be
  // shape's), else null.
  TrainStep(Backend& backend, const MambaWeights& weights, LoraAdapters& adapters, const StepShape& shape,
            Communicator* base_weight_comm = nullptr, ContextExchange* context = nullptr);

  // Called on the host as soon as a layer's backward has been issued to the backend (layers in
  // decreasing order), so that its adapter gradients can be reduced while earlier layers still run;
  // a device-side consumer orders itself after the work issued so far (Backend::stream()).
  using LayerBackwardDone = std::function<void(int64_t layer)>;

  // tokens: host [batch, seq_len+1]; target_mask: host [batch, seq_len], mask of tokens[:, 1:].
  // Adds grad_scale * d(sum of masked token losses)/d(adapters) to the adapter gradients and returns
  // the sum of masked token losses. dropout_stream identifies this micro-batch (e.g. step and index).
  // doc_start: host [batch, seq_len] or null (one document per row), SequenceSampler::next's: for each
  // input token, the position in its row of its document's first token; the conv and the scan restart
  // there, so each document runs as if it were alone in its row.
  double forward_backward(const uint32_t* tokens, const uint8_t* target_mask, double grad_scale,
                          uint64_t dropout_seed, uint64_t dropout_stream, const int32_t* doc_start = nullptr,
                          const LayerBackwardDone& on_layer_backward_done = {});
  // The same loss without gradients (evaluation).
  double forward_loss(const uint32_t* tokens, const uint8_t* target_mask, const int32_t* doc_start = nullptr);
  // A test helper for comparisons with transformers, not a fast path: runs the forward without dropout
  // on tokens, host [batch, seq_len] (inputs only: no extra target column here), and returns the logits,
  // [batch * seq_len, vocab] row-major, computed on the host in double from the downloaded final normed
  // hidden states (converted from the act dtype) times the downloaded lm_head. Allocates host memory
  // for all of them (batch * seq_len * vocab doubles).
  std::vector<double> forward_logits(const uint32_t* tokens);

  const StepShape& shape() const { return shape_; }
  size_t activation_bytes() const { return arena_.bytes(); }
  size_t gathered_weight_bytes() const { return base_.buffer_bytes(); }  // 0 unless the base is sharded
  // What activation_bytes() is for this model, adapters and shape on a backend of these sizes, in
  // activations and workspaces, without allocating (ssmtune info).
  static StepPlanBytes planned_bytes(const BackendSizes& backend, const MambaConfig& model, const LoraConfig& lora,
                                     const StepShape& shape);
  // How many layer forwards the backward runs besides layer recomputation with memory.checkpoint_every =
  // k to regenerate the layer inputs between checkpoints (backward_layers): none for k = 1, nor with
  // memory.keep_layer_outputs, which regenerates them by additions.
  static int64_t regenerated_layer_forwards(int64_t n_layer, int64_t checkpoint_every, bool keep_layer_outputs);

 private:
  // Row b of the inputs starts at tokens + b * row_stride.
  void upload_inputs(const uint32_t* tokens, int64_t row_stride);
  void upload_batch(const uint32_t* tokens, const uint8_t* target_mask, const int32_t* doc_start);
  // Checks doc_start and uploads it when a document starts after some row's first token; sets boundaries_.
  void upload_doc_start(const int32_t* doc_start);
  const int32_t* boundaries_ = nullptr;  // what the conv and scan get: doc_start_, or null (no boundaries)
  void forward_layers(uint64_t dropout_seed, uint64_t dropout_stream);
  // From d_residual_ = d(residual n_layer) down to d(residual 0), calling on_layer_backward_done per layer.
  void backward_layers(uint64_t dropout_seed, uint64_t dropout_stream, const LayerBackwardDone& on_layer_backward_done);
  bool dropout_enabled_ = true;  // off for evaluation
  // add_previous_mixer: form residual i from residual i-1 and layer i-1's output first (the first
  // forward, and re-running a segment); without it residual i is already there (layer 0, and
  // recomputation in the backward). first_forward: the step's forward, which leaves the layer's output
  // where the backward may need it again (layer_output) and under context parallelism exchanges what
  // crosses into the slice (the backward's forwards read it back from carried_in_). output_needed: the
  // layer's output forms the next residual (the first forward, and re-running a segment below its last
  // layer); without it, in a recomputation for the layer's own backward, out_proj's frozen GEMM is skipped
  // (its backward needs y and the adapter's h, not the output) and only the adapter's h is formed.
  void layer_forward(int64_t i, LayerActivations& a, bool add_previous_mixer, bool first_forward, bool output_needed,
                     uint64_t dropout_seed, uint64_t dropout_stream);
  void layer_backward(int64_t i, LayerActivations& a, uint64_t dropout_seed, uint64_t dropout_stream);
  // Where layer j's output is in the first forward: kept_layer_out_[j], or mixer_out_.
  void* layer_output(int64_t j) const;
  // residual i = residual i-1 + previous_output (layer i-1's), fused with layer i's norm into a.hn and
  // a.rstd: the one op that forms every residual, in the forward and when the backward rebuilds one from a
  // kept output (whose normed result is then only scratch), so that both give the same bits.
  void add_residual_and_norm(int64_t i, const void* previous_output, LayerActivations& a);
  LinearOp linear(int64_t layer, Projection p, LoraPath& storage, uint64_t seed, uint64_t stream) const;
  LayerActivations& activations(int64_t layer);
  // dt_proj's input and its row stride: dt_in when dt_proj has an adapter, else dt_r in place in xdbl.
  std::pair<void*, int64_t> dt_proj_input(const LayerActivations& a) const;
  void* act_at(void* base, int64_t elements) const;
  void* master_at(void* base, int64_t elements) const;
  // The mixer norm's segments of an x_proj output row: dt_r, B, C as {first column, width}.
  std::array<std::array<int64_t, 2>, 3> mixer_norm_segments() const;

  Backend& backend_;
  const MambaWeights& weights_;
  LoraAdapters& adapters_;
  StepShape shape_;
  int64_t rows_;  // T = batch * seq_len
  Arena arena_;
  LayerWeights base_;  // the layer weights the ops read
  ContextExchange* context_ = nullptr;  // the other slices of the sequences, under context parallelism

  std::vector<int32_t> host_inputs_, host_targets_;
  std::vector<double> host_weights_;
  std::vector<std::byte> host_weights_encoded_;
};

}  // namespace ssmtune
