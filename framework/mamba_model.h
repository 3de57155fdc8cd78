// The frozen Mamba-1 base model as HF MambaForCausalLM defines it (REFERENCE.md §1), held on a backend:
// the four linear projections of every mixer in NF4, everything else in 16/32-bit.
#pragma once
#include <array>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "framework/arena.h"
#include "framework/backend.h"
#include "framework/mamba_config.h"

namespace ssmtune {

enum class Projection { in_proj = 0, x_proj = 1, dt_proj = 2, out_proj = 3 };
inline constexpr std::array<Projection, 4> kProjections{Projection::in_proj, Projection::x_proj,
                                                        Projection::dt_proj, Projection::out_proj};
std::string_view projection_name(Projection p);
// [out, in] of a projection for this config.
std::array<int64_t, 2> projection_shape(const MambaConfig& config, Projection p);

// One tensor of a Mamba checkpoint, by its Hugging Face name and shape (REFERENCE.md §1).
struct MambaTensor {
  enum class Kind { embedding, norm, projection, conv_weight, conv_bias, dt_bias, A_log, D, norm_f, lm_head };
  std::string name;
  std::vector<int64_t> shape;
  Kind kind;
  int64_t layer = -1;                           // -1 outside the layers
  Projection projection = Projection::in_proj;  // for Kind::projection
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t dim : shape) n *= dim;
    return n;
  }
};

// Every tensor a checkpoint of this config holds, in the order write_random_mamba writes them: the
// embedding; per layer its norm, the four projections, conv1d weight and bias (with use_conv_bias),
// dt_proj.bias, A_log and D; then norm_f, and lm_head when `with_lm_head` (an untied head).
std::vector<MambaTensor> mamba_tensors(const MambaConfig& config, bool with_lm_head);

// Original mamba_ssm files name the embedding without the "s"; read where the HF name is absent.
inline constexpr const char* kMambaSsmEmbeddingName = "backbone.embedding.weight";

struct MambaLayerWeights {
  const void* norm_weight = nullptr;  // master [d_model]
  const void* conv_weight = nullptr;  // master [d_inner, conv_kernel]
  const void* conv_bias = nullptr;    // master [d_inner]
  const void* A = nullptr;            // master [d_inner, d_state], -exp(A_log)
  const void* D = nullptr;            // master [d_inner]
  const void* dt_bias = nullptr;      // master [d_inner]
  std::array<Nf4Weight, 4> proj;      // indexed by Projection
};

// Where the weights come from: a model directory (model_files.h) or the random initialisation
// (mamba_model.cpp).
class TensorSource;

class MambaWeights {
 public:
  // Loads an HF directory (model_files.h: config.json, model.safetensors or shards with an index),
  // quantizing the projections to NF4 through the backend, or taking them as they are where the
  // checkpoint holds them pre-quantized by bitsandbytes. One allocation planned from the config, then
  // one tensor at a time: host memory holds a single tensor, never the whole model.
  static MambaWeights load(const std::filesystem::path& dir, Backend& backend);
  // What write_random_mamba(dir, config, seed) followed by load(dir, backend) gives, built in memory
  // without touching the disk (for benchmarks of models whose fp32 checkpoint would take gigabytes).
  static MambaWeights random(const MambaConfig& config, Backend& backend, uint64_t seed);

  const MambaConfig& config() const { return config_; }
  const void* embedding() const { return embedding_; }  // act [vocab, d_model]
  const void* lm_head() const { return lm_head_; }      // act [vocab, d_model]; the embedding when tied
  const void* norm_f() const { return norm_f_; }        // master [d_model]
  const MambaLayerWeights& layer(int64_t i) const { return layers_[i]; }
  size_t bytes() const { return arena_.bytes(); }

 private:
  MambaWeights(Backend& backend, MambaConfig config);
  static MambaWeights from_source(MambaConfig config, const TensorSource& source, Backend& backend);
  MambaConfig config_;
  Arena arena_;
  const void* embedding_ = nullptr;
  const void* lm_head_ = nullptr;
  const void* norm_f_ = nullptr;
  std::vector<MambaLayerWeights> layers_;
};

// Writes a randomly initialised base model (config.json + model.safetensors, F32) the way HF's
// MambaPreTrainedModel initialises one, for demos, tests and benchmarks.
void write_random_mamba(const std::filesystem::path& dir, const MambaConfig& config, uint64_t seed);

}  // namespace ssmtune
