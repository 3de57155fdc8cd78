// Text generation with the base model and, optionally, its LoRA adapters: recurrent decoding, one token
// at a time, carrying per layer the conv window (the last conv_kernel-1 inputs of the conv) and the
// selective-scan state instead of re-reading the sequence. The prompt goes through the same step, token
// by token, so there is one path; it gives the logits the full-sequence forward gives (TrainStep::
// forward_logits; tests/framework/test_generation.cpp). Then the sampler picks each next token: greedy
// at temperature 0, else nucleus (top-p) sampling with a counter RNG, so a seed gives the same tokens
// every run on a backend.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <vector>

#include "framework/arena.h"
#include "framework/lora.h"
#include "framework/mamba_model.h"

namespace ssmtune {

// One sequence decoded on a backend. All device and host buffers are planned in the constructor
// (framework/arena.h); a step allocates nothing.
class Decoder {
 public:
  // adapters: null for the base model alone; otherwise applied without dropout, as they are at
  // construction and at each reset(). Both must outlive this.
  Decoder(Backend& backend, const MambaWeights& weights, const LoraAdapters* adapters);

  // Forgets the sequence: zero conv windows and scan states. Takes the adapters as they are now.
  void reset();
  // Advances the state by one token (an Error names the position if it is not below vocab_size).
  void feed(uint32_t token);
  // The logits after the last token fed, [vocab_size], widened to double; valid until the next call.
  // Runs the LM head, which the prompt tokens before the last never need.
  std::span<const double> next_logits();
  // Tokens fed since the start or the last reset.
  int64_t position() const { return position_; }
  int64_t vocab_size() const { return weights_.config().vocab_size; }

 private:
  LinearOp linear(int64_t layer, Projection p, LoraPath& storage) const;
  void layer_step(int64_t i);

  Backend& backend_;
  const MambaWeights& weights_;
  const LoraAdapters* adapters_;
  int64_t position_ = 0;
  Arena arena_;
  // The residual stream ping-pongs between two buffers: residual i+1 = residual i + mixer output i.
  void* residual_[2] = {nullptr, nullptr};  // master [d_model]
  int current_ = 0;                         // which of residual_ holds the stream entering the next norm
  void* normed_ = nullptr;                  // act [d_model]: a layer's normed input, then the final norm's output
  void* rstd_ = nullptr;                    // master [3]: the norms' rstd (needed only by a backward)
  void* xz_ = nullptr;                      // act [2*d_inner]: in_proj output x | z
  void* u_ = nullptr;                       // act [d_inner]
  void* xdbl_ = nullptr;                    // act [R + 2N]: dt_r | B | C as dt_proj and the scan read them
  void* xdbl_raw_ = nullptr;                // act [R + 2N]: with the mixer norm, the x_proj output before it
  void* dt_ = nullptr;                      // act [d_inner]
  void* y_ = nullptr;                       // act [d_inner]
  void* mixer_out_ = nullptr;               // act [d_model]
  void* lora_h_ = nullptr;                  // act [rank]
  void* conv_windows_ = nullptr;            // master [n_layer, d_inner, conv_kernel-1]
  void* ssm_states_ = nullptr;              // master [n_layer, d_inner, d_state]
  void* logits_ = nullptr;                  // master [vocab]
  int32_t* token_ = nullptr;                // [1]
  void* linear_workspace_ = nullptr;
  std::vector<std::byte> host_logits_bytes_;
  std::vector<double> host_logits_;
};

struct SamplingOptions {
  double temperature = 1.0;  // 0: greedy (argmax, the lowest id on ties)
  double top_p = 1.0;        // in (0, 1]: sample from the smallest set of most likely tokens holding top_p
  uint64_t seed = 0;
  // Only ids below this are drawn (e.g. a tokenizer's vocab, smaller than the model's padded one); 0: all.
  int64_t vocab_limit = 0;
};

// Picks next tokens from logits. Draw k uses the counter RNG's value (seed, k), so a seed reproduces
// the same tokens from the same logits. Scratch for a vocabulary of `vocab` is allocated once here.
class Sampler {
 public:
  // Errors (naming the option) for a negative temperature or top_p outside (0, 1].
  Sampler(const SamplingOptions& options, int64_t vocab);
  uint32_t next(std::span<const double> logits);

 private:
  SamplingOptions options_;
  int64_t vocab_;
  uint64_t draws_ = 0;
  std::vector<double> weights_;
  std::vector<uint32_t> order_;
};

struct GenerationOptions {
  int64_t max_new_tokens = 64;
  std::optional<uint32_t> stop_token;  // ends generation when drawn (it is not returned)
  SamplingOptions sampling;
};

// Errors naming the option: a negative or non-finite temperature, top_p outside (0, 1], a negative
// max_new_tokens. Callers may check before loading a model; Sampler and generate check again.
void check_generation_options(const GenerationOptions& options);

// Starts a new sequence (Decoder::reset), feeds the prompt (at least one token), then draws up to
// max_new_tokens tokens, handing each to on_token (may be empty) as soon as it is drawn; returns them.
std::vector<uint32_t> generate(Decoder& decoder, std::span<const uint32_t> prompt, const GenerationOptions& options,
                               const std::function<void(uint32_t)>& on_token = {});

}  // namespace ssmtune
