// One micro-batch of QLoRA training: the forward through embeddings, layers, final norm and the sliced
// LM-head loss, then the hand-written backward, layer by layer in reverse, accumulating adapter
// gradients. Memory is planned once in the constructor (framework/arena.h): with recompute each layer
// keeps only its input (the residual stream) and re-runs its forward in the backward; without, every
// layer keeps its activations. The selective scan keeps only chunk-boundary states either way.
// falcon_mamba models (MambaConfig::has_mixer_norm) add the weightless norm of dt_r, B and C between
// x_proj and their uses, and its backward.
#pragma once
#include <array>
#include <cstdint>
#include <functional>
#include <vector>

#include "framework/arena.h"
#include "framework/lora.h"
#include "framework/mamba_model.h"

namespace ssmtune {

struct StepShape {
  int64_t batch = 1;
  int64_t seq_len = 128;
  int64_t scan_chunk = 256;       // tokens per selective-scan chunk
  bool recompute = true;          // layer-level recomputation
  int64_t loss_slice_rows = 1024; // tokens per LM-head slice
};

class TrainStep {
 public:
  TrainStep(Backend& backend, const MambaWeights& weights, LoraAdapters& adapters, const StepShape& shape);

  // Called on the host as soon as a layer's backward has been issued to the backend (layers in
  // decreasing order), so that its adapter gradients can be reduced while earlier layers still run;
  // a device-side consumer orders itself after the work issued so far (Backend::stream()).
  using LayerBackwardDone = std::function<void(int64_t layer)>;

  // tokens: host [batch, seq_len+1]; target_mask: host [batch, seq_len], mask of tokens[:, 1:].
  // Adds grad_scale * d(sum of masked token losses)/d(adapters) to the adapter gradients and returns
  // the sum of masked token losses. dropout_stream identifies this micro-batch (e.g. step and index).
  double forward_backward(const uint32_t* tokens, const uint8_t* target_mask, double grad_scale,
                          uint64_t dropout_seed, uint64_t dropout_stream,
                          const LayerBackwardDone& on_layer_backward_done = {});
  // The same loss without gradients (evaluation).
  double forward_loss(const uint32_t* tokens, const uint8_t* target_mask);
  // A test helper for comparisons with transformers, not a fast path: runs the forward without dropout
  // on tokens, host [batch, seq_len] (inputs only: no extra target column here), and returns the logits,
  // [batch * seq_len, vocab] row-major, computed on the host in double from the downloaded final normed
  // hidden states (converted from the act dtype) times the downloaded lm_head. Allocates host memory
  // for all of them (batch * seq_len * vocab doubles).
  std::vector<double> forward_logits(const uint32_t* tokens);

  const StepShape& shape() const { return shape_; }
  size_t activation_bytes() const { return arena_.bytes(); }

 private:
  struct LayerActivations {
    void* hn = nullptr;          // act [T, d_model]   normed layer input
    void* rstd = nullptr;        // master [T]
    void* xz = nullptr;          // act [T, 2*d_inner] in_proj output: x | z
    void* u = nullptr;           // act [T, d_inner]   conv + SiLU
    void* xdbl = nullptr;        // act [T, R + 2N]    dt_r | B | C as dt_proj and the scan read them
    void* xdbl_raw = nullptr;    // act [T, R + 2N]    with the mixer norm: x_proj output before it
    void* mixer_rstd = nullptr;  // master [3, T]      with the mixer norm: rstd of dt_r, B, C
    void* dt = nullptr;          // act [T, d_inner]   dt_proj output (before bias and softplus)
    void* y = nullptr;           // act [T, d_inner]   gated scan output
    void* states = nullptr;      // master [batch, chunks, d_inner, N]
    std::array<void*, 4> lora_h{};  // act [T, rank] per projection
  };

  // Row b of the inputs starts at tokens + b * row_stride.
  void upload_inputs(const uint32_t* tokens, int64_t row_stride);
  void upload_batch(const uint32_t* tokens, const uint8_t* target_mask);
  void forward_layers(uint64_t dropout_seed, uint64_t dropout_stream);
  bool dropout_enabled_ = true;  // off for evaluation
  // add_previous_mixer: form residual i from residual i-1 and mixer_out_ first (the first forward);
  // without it residual i is already there (layer 0, and recomputation in the backward).
  void layer_forward(int64_t i, LayerActivations& a, bool add_previous_mixer, uint64_t dropout_seed,
                     uint64_t dropout_stream);
  void layer_backward(int64_t i, LayerActivations& a, uint64_t dropout_seed, uint64_t dropout_stream);
  LinearOp linear(int64_t layer, Projection p, LoraPath& storage, uint64_t seed, uint64_t stream) const;
  LayerActivations& activations(int64_t layer);
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

  std::vector<void*> residual_;              // master [T, d_model], n_layer + 1 of them
  std::vector<LayerActivations> layer_acts_; // n_layer, or one shared when recomputing
  void* mixer_out_ = nullptr;                // act [T, d_model]
  void* final_normed_ = nullptr;             // act [T, d_model]
  void* final_rstd_ = nullptr;               // master [T]
  int32_t* inputs_ = nullptr;                // [T]
  int32_t* targets_ = nullptr;               // [T]
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
  // workspaces
  void* linear_workspace_ = nullptr;
  void* scan_workspace_ = nullptr;
  void* logits_workspace_ = nullptr;         // the LM head slices (Backend::cross_entropy_workspace_bytes)
  std::vector<int32_t> host_inputs_, host_targets_;
  std::vector<double> host_weights_;
  std::vector<std::byte> host_weights_encoded_;
};

}  // namespace ssmtune
