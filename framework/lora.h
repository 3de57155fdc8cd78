// The trainable LoRA adapters (REFERENCE.md §4). Parameters, gradients and the two AdamW moments are
// four contiguous master buffers with one layout, so clipping, reducing and sharding are each one call
// over a flat buffer; each adapter tensor is a named slice of that layout.
#pragma once
#include <array>
#include <optional>
#include <string>
#include <vector>

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
  LoraAdapters(Backend& backend, const MambaConfig& model, const LoraConfig& config);

  const LoraConfig& config() const { return config_; }
  const std::vector<AdapterTensor>& tensors() const { return tensors_; }
  int64_t numel() const { return numel_; }
  DType dtype() const { return backend_->master_dtype(); }

  void* params() const { return params_; }
  void* grads() const { return grads_; }
  void* adam_m() const { return m_; }
  void* adam_v() const { return v_; }

  // PEFT's initialisation: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0.
  void initialize(uint64_t seed);
  // The LoRA path of (layer, projection) for this step, or nullopt when it has no adapter.
  std::optional<LoraPath> path(int64_t layer, Projection p, uint64_t dropout_seed, uint64_t dropout_stream) const;

  // Host copies of a whole flat buffer as doubles (checkpoints, exports, tests), and back.
  std::vector<double> download(const void* buffer) const;
  void upload(void* buffer, const std::vector<double>& values) const;

 private:
  Backend* backend_;
  LoraConfig config_;
  std::vector<AdapterTensor> tensors_;
  std::vector<std::array<int64_t, 4>> index_;  // [layer][projection] -> index of its A tensor, or -1
  int64_t numel_ = 0;
  Arena arena_;
  void* params_ = nullptr;
  void* grads_ = nullptr;
  void* m_ = nullptr;
  void* v_ = nullptr;
};

}  // namespace ssmtune
