// The trainable LoRA adapters (REFERENCE.md §4). Parameters, gradients and the two AdamW moments are
// contiguous master buffers with one layout, so clipping, reducing and sharding are each one call
// over a flat buffer; each adapter tensor is a named slice of that layout. The layout is layer after
// layer, so a layer's tensors are one range of it. The moments may cover one shard of the layout only
// (ZeRO: each rank keeps and updates its own shard's).
#pragma once
#include <array>
#include <optional>
#include <string>
#include <vector>

#include "distributed/sharding.h"
#include "framework/arena.h"
#include "framework/backend.h"
#include "framework/mamba_config.h"
#include "framework/mamba_model.h"

namespace ssmtune {

struct LoraConfig {
  int64_t rank = 16;
  double alpha = 32;
  double dropout = 0;
  bool rslora = false;
  std::vector<Projection> targets{kProjections.begin(), kProjections.end()};
  // alpha/r, or alpha/sqrt(r) for rsLoRA
  double scale() const;
  bool targets_projection(Projection p) const;
};

// One adapter matrix: its PEFT key and where it lives in the flat layout.
struct AdapterTensor {
  std::string peft_key;  // base_model.model.backbone.layers.{i}.mixer.<proj>.lora_{A,B}.weight
  int64_t layer;
  Projection projection;
  bool is_A;
  int64_t rows, cols;  // A: [rank, in]; B: [out, rank]
  int64_t offset;      // in elements
  int64_t numel() const { return rows * cols; }
};

class LoraAdapters {
 public:
  // The AdamW moments are kept for `optimizer_shard` of the layout (distributed/sharding.h): all of it
  // by default.
  LoraAdapters(Backend& backend, const MambaConfig& model, const LoraConfig& config,
               ShardIndex optimizer_shard = {});

  const LoraConfig& config() const { return config_; }
  const std::vector<AdapterTensor>& tensors() const { return tensors_; }
  int64_t numel() const { return numel_; }
  DType dtype() const { return backend_->master_dtype(); }

  void* params() const { return params_; }
  // The parameters in the backend's act dtype, which path() hands out as A_act and B_act for the GEMMs: a
  // copy where act is not master (the GPU's bf16 beside its fp32 masters), else the parameters themselves.
  // Whatever writes the parameters (the optimizer, loading, uploads) leaves the copy stale: the passes that
  // read it call refresh_act_params first.
  void refresh_act_params() const;
  void* grads() const { return grads_; }
  // The moments of optimizer_range() only: element 0 is that of element optimizer_range().begin.
  void* adam_m() const { return m_; }
  void* adam_v() const { return v_; }
  FlatRange optimizer_range() const { return optimizer_range_; }
  // The range of the layout that holds layer `layer`'s tensors.
  FlatRange layer_range(int64_t layer) const;

  // PEFT's initialisation: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0.
  void initialize(uint64_t seed);
  // The LoRA path of (layer, projection) for this step, or nullopt when it has no adapter.
  std::optional<LoraPath> path(int64_t layer, Projection p, uint64_t dropout_seed, uint64_t dropout_stream) const;

  // Host copies of a whole flat buffer as doubles (checkpoints, exports, tests), and back; for the
  // moments, of optimizer_range()'s elements.
  std::vector<double> download(const void* buffer) const;
  void upload(void* buffer, const std::vector<double>& values) const;

 private:
  Backend* backend_;
  LoraConfig config_;
  std::vector<AdapterTensor> tensors_;
  std::vector<std::array<int64_t, 4>> index_;  // [layer][projection] -> index of its A tensor, or -1
  int64_t numel_ = 0;
  FlatRange optimizer_range_;
  Arena arena_;
  void* params_ = nullptr;
  void* params_act_ = nullptr;  // params_ when act is master
  void* grads_ = nullptr;
  void* m_ = nullptr;
  void* v_ = nullptr;
  int64_t count_of(const void* buffer) const;
};

}  // namespace ssmtune
