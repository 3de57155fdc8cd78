// What `ssmtune info` computes before any GPU is touched, from a recipe and the model's config.json
// alone (no weights are read): parameter counts, the bytes each rank's memory plans will take for the
// recipe's shape and parallelism, and the FLOPs of a training step per token. The byte counts are those
// of the plans themselves (mamba_model.cpp, lora.h, train_step.h) for the backend the recipe would use,
// so they equal what `train` allocates through the backend; what the backend or libraries hold outside
// the plans (the CUDA context, cuBLASLt's workspace, NCCL's buffers) is not in them.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "distributed/sharding.h"
#include "framework/backend.h"
#include "framework/lora.h"
#include "framework/mamba_config.h"
#include "framework/recipe_config.h"
#include "framework/train_step.h"

namespace ssmtune {

struct ParameterCounts {
  int64_t base = 0;          // every frozen parameter of the base model
  int64_t nf4 = 0;           // of which the four projections of every layer, in NF4
  int64_t dense = 0;         // of which the rest: embedding (and an untied lm_head), norms, conv, dt bias, A, D
  int64_t trainable = 0;     // the LoRA adapters
};

// Bytes per rank.
struct MemoryEstimate {
  size_t nf4_weights = 0;    // packed NF4 values plus the quantization state (absmax codes, nested absmax):
                             // this rank's 1/N of every layer's with distributed.shard_base_weights
  size_t gathered_weights = 0;  // with shard_base_weights: two whole layers' NF4 blocks, gathered in turn
  size_t dense_weights = 0;  // embedding/lm_head in the act dtype; norms, conv, dt bias, A, D in the master dtype
  size_t adapters = 0;       // adapter parameters, their act copy and gradients (every rank holds all)
  size_t adam_moments = 0;   // AdamW's m and v (fp32 or the master dtype) for this rank's shard
  StepPlanBytes step;        // activations and workspaces of one micro-batch
  size_t total() const {
    return nf4_weights + gathered_weights + dense_weights + adapters + adam_moments + step.total();
  }
};

// Per token of a training step, in floating-point operations (a multiply-add counts two). GEMMs are
// exact: the four projections (2 * out * in each), the LoRA paths (2 * rank * (in + out)) and the LM
// head (2 * d_model * vocab). The causal conv counts 2 * kernel per channel, the selective scan 8 per
// (channel, state) forward (dA = exp(delta * A), delta * B * u, h = dA * h + ..., y += C * h) and three
// times that backward (the states recomputed from the chunk boundaries, then the gradients). Norms,
// SiLU, softplus and the gate are left out: small next to these.
struct FlopsPerToken {
  double forward = 0;    // layers and LM head with its loss
  double backward = 0;   // input gradients of the frozen GEMMs (no weight gradients), adapter gradients,
                         // conv and scan backward
  double recompute = 0;  // with memory.recompute: every layer's forward once more in the backward, but for
                         // out_proj's output (its frozen GEMM and its adapter's up-projection)
  // with memory.checkpoint_every > 1 as well: the layer forwards that regenerate the layer inputs between
  // checkpoints (TrainStep::regenerated_layer_forwards; none with memory.keep_layer_outputs)
  double regenerate = 0;
  double step(bool recompute_on) const { return forward + backward + (recompute_on ? recompute + regenerate : 0); }
};

struct ModelInfo {
  MambaConfig model;
  bool tied_lm_head = true;  // config.json's tie_word_embeddings: the embedding serves as the LM head
  std::string backend;       // the backend the numbers are for
  std::string assumption;    // how `device` chose it (e.g. device: auto), empty when the recipe names it
  DType act_dtype = DType::F32, master_dtype = DType::F32;
  int ranks = 1;
  ParameterCounts params;
  MemoryEstimate memory;            // with the recipe's memory.recompute
  StepPlanBytes step_other_recompute;  // the step's plan with memory.recompute the other way
  FlopsPerToken flops;
};

ParameterCounts parameter_counts(const MambaConfig& model, bool tied_lm_head, const LoraConfig& lora);
MemoryEstimate memory_estimate(const BackendSizes& backend, const MambaConfig& model, bool tied_lm_head,
                               const LoraConfig& lora, const StepShape& shape, ShardIndex optimizer_shard,
                               int base_weight_shards = 1);
FlopsPerToken flops_per_token(const MambaConfig& model, const LoraConfig& lora, int64_t checkpoint_every = 1,
                              bool keep_layer_outputs = false);

// The backend sizes for a recipe's `device` without touching a device: cpu, or cuda (an Error in a build
// without CUDA, as `train` gives); auto is the CUDA backend where the build has it (the machine that
// trains is taken to have a GPU) and the CPU otherwise, said in *assumption.
std::unique_ptr<BackendSizes> backend_sizes_for(const std::string& device, std::string* assumption);

// All of it for a recipe trained on `ranks` ranks (rank 0, which holds the largest optimizer shard).
ModelInfo model_info(const RecipeConfig& recipe, int ranks);

}  // namespace ssmtune
