// The frozen Mamba-1 base model as HF MambaForCausalLM defines it (REFERENCE.md §1), held on a backend:
// the four linear projections of every mixer in NF4, everything else in 16/32-bit.
#pragma once
#include <array>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "distributed/sharding.h"
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

// A layer's four NF4 projections live in one block of bytes: each projection's packed weight, absmax
// codes and nested absmax at these offsets (256-byte aligned). With sharded base weights the block is
// what ranks split and all-gather (framework/layer_weights.h); its size is padded to a whole number of
// 256-byte pieces per rank, so the shards are equal and aligned. The padding stays zero.
struct LayerNf4Layout {
  struct Buffers {
    size_t packed = 0, absmax_codes = 0, nested_absmax = 0;
  };
  std::array<Buffers, 4> proj;  // indexed by Projection
  size_t bytes = 0;             // the block, padding included
  int shards = 1;
  size_t shard_bytes() const { return bytes / static_cast<size_t>(shards); }
};
LayerNf4Layout layer_nf4_layout(const MambaConfig& config, int shards);

// Where the weights come from: a model directory (model_files.h) or the random initialisation
// (mamba_model.cpp).
class TensorSource;

class MambaWeights {
 public:
  // Loads an HF directory (model_files.h: config.json, model.safetensors or shards with an index),
  // quantizing the projections to NF4 through the backend, or taking them as they are where the
  // checkpoint holds them pre-quantized by bitsandbytes. One allocation planned from the config, then
  // one tensor at a time: host memory holds a single tensor, never the whole model.
  // With projection_shard {r, N} (sharded base weights, N > 1), this rank keeps only shard r of N of
  // each layer's NF4 block (LayerNf4Layout): it reads and quantizes every layer, one at a time, into a
  // one-layer staging block and keeps its shard, so loading never holds more than the shards and one
  // layer. Everything else (embedding, LM head, norms, conv, A, D, dt_bias) is kept whole.
  static MambaWeights load(const std::filesystem::path& dir, Backend& backend, ShardIndex projection_shard = {});
  // What write_random_mamba(dir, config, seed) followed by load(dir, backend) gives, built in memory
  // without touching the disk (for benchmarks of models whose fp32 checkpoint would take gigabytes).
  static MambaWeights random(const MambaConfig& config, Backend& backend, uint64_t seed,
                             ShardIndex projection_shard = {});

  const MambaConfig& config() const { return config_; }
  const void* embedding() const { return embedding_; }  // act [vocab, d_model]
  const void* lm_head() const { return lm_head_; }      // act [vocab, d_model]; the embedding when tied
  const void* norm_f() const { return norm_f_; }        // master [d_model]
  // Layer i whole; fails when the projections are sharded (they are then gathered a layer at a time:
  // framework/layer_weights.h).
  const MambaLayerWeights& layer(int64_t i) const;
  size_t bytes() const { return arena_.bytes(); }

  ShardIndex projection_shard() const { return projection_shard_; }
  bool projections_sharded() const { return projection_shard_.count > 1; }
  const LayerNf4Layout& nf4_layout() const { return nf4_layout_; }
  // This rank's shard of layer i's NF4 block (the whole block when not sharded), device memory.
  const void* layer_nf4_shard(int64_t i) const { return layer_nf4_[static_cast<size_t>(i)]; }
  // Layer i with its projections read from `block`, a whole copy of its NF4 block (device memory).
  MambaLayerWeights layer_at(int64_t i, const void* block) const;

 private:
  MambaWeights(Backend& backend, MambaConfig config, ShardIndex projection_shard);
  static MambaWeights from_source(MambaConfig config, const TensorSource& source, Backend& backend,
                                  ShardIndex projection_shard);
  MambaConfig config_;
  ShardIndex projection_shard_;
  LayerNf4Layout nf4_layout_;
  Arena arena_;
  const void* embedding_ = nullptr;
  const void* lm_head_ = nullptr;
  const void* norm_f_ = nullptr;
  std::vector<MambaLayerWeights> layers_;  // projections null when sharded
  std::vector<const void*> layer_nf4_;     // per layer: its NF4 block, or this rank's shard of it
};

// Writes a randomly initialised base model (config.json + model.safetensors, F32) the way HF's
// MambaPreTrainedModel initialises one, for demos, tests and benchmarks.
void write_random_mamba(const std::filesystem::path& dir, const MambaConfig& config, uint64_t seed);

}  // namespace ssmtune
