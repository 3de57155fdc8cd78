#include "framework/model_info.h"

#include "framework/arena.h"
#include "framework/cpu_backend.h"
#ifdef SSMTUNE_WITH_CUDA
#include "framework/cuda_backend.h"
#endif
#include "framework/error.h"
#include "framework/mamba_model.h"

namespace ssmtune {

ParameterCounts parameter_counts(const MambaConfig& model, bool tied_lm_head, const LoraConfig& lora) {
  ParameterCounts p;
  for (const MambaTensor& t : mamba_tensors(model, !tied_lm_head)) {
    p.base += t.numel();
    (t.kind == MambaTensor::Kind::projection ? p.nf4 : p.dense) += t.numel();
  }
  for (Projection proj : kProjections)
    if (lora.targets_projection(proj)) {
      const auto [out, in] = projection_shape(model, proj);
      p.trainable += model.n_layer * lora.rank * (in + out);
    }
  return p;
}

MemoryEstimate memory_estimate(const BackendSizes& backend, const MambaConfig& model, bool tied_lm_head,
                               const LoraConfig& lora, const StepShape& shape, ShardIndex optimizer_shard,
                               int base_weight_shards) {
  using Kind = MambaTensor::Kind;
  MemoryEstimate m;
  const size_t act = dtype_size(backend.act_dtype()), master = dtype_size(backend.master_dtype());
  // The buffers of MambaWeights' plan, each padded as its Arena pads it: one NF4 block (or its shard) per
  // layer, then the other tensors; with sharded weights LayerWeights' plan gathers two whole blocks.
  const LayerNf4Layout layout = layer_nf4_layout(model, base_weight_shards);
  m.nf4_weights = static_cast<size_t>(model.n_layer) * Arena::padded(layout.shard_bytes());
  if (base_weight_shards > 1) m.gathered_weights = 2 * Arena::padded(layout.bytes);
  for (const MambaTensor& t : mamba_tensors(model, !tied_lm_head))
    if (t.kind != Kind::projection)
      m.dense_weights += Arena::padded(static_cast<size_t>(t.numel()) *
                                       (t.kind == Kind::embedding || t.kind == Kind::lm_head ? act : master));
  if (!model.use_conv_bias)  // the conv kernels always add a bias: a buffer of zeros per layer
    m.dense_weights += static_cast<size_t>(model.n_layer) * Arena::padded(static_cast<size_t>(model.d_inner) * master);
  // LoraAdapters' plan: parameters and gradients whole, the parameters' act copy where act is not master,
  // the moments for the shard.
  const int64_t adapter_numel = parameter_counts(model, tied_lm_head, lora).trainable;
  m.adapters = 2 * Arena::padded(static_cast<size_t>(adapter_numel) * master);
  if (backend.act_dtype() != backend.master_dtype()) m.adapters += Arena::padded(static_cast<size_t>(adapter_numel) * act);
  m.adam_moments = 2 * Arena::padded(static_cast<size_t>(shard_range(adapter_numel, optimizer_shard).size()) * master);
  m.step = TrainStep::planned_bytes(backend, model, lora, shape);
  return m;
}

FlopsPerToken flops_per_token(const MambaConfig& model, const LoraConfig& lora, int64_t checkpoint_every,
                              bool keep_layer_outputs) {
  double gemm = 0, adapters = 0;
  for (Projection p : kProjections) {
    const auto [out, in] = projection_shape(model, p);
    gemm += 2.0 * static_cast<double>(out * in);
    if (lora.targets_projection(p)) adapters += 2.0 * static_cast<double>(lora.rank * (in + out));
  }
  const double conv = 2.0 * static_cast<double>(model.conv_kernel * model.d_inner);
  const double scan = 8.0 * static_cast<double>(model.d_inner * model.d_state);
  const double layers = static_cast<double>(model.n_layer);
  const double head = 2.0 * static_cast<double>(model.d_model * model.vocab_size);
  FlopsPerToken f;
  f.forward = layers * (gemm + adapters + conv + scan) + head;
  // dx = dy · W for each frozen GEMM (one forward's worth), the adapters' dA, dB and their share of dx
  // (two forwards' worth), the conv's dx, the scan's three, and dh of the LM head.
  f.backward = layers * (gemm + 2 * adapters + conv + 3 * scan) + head;
  // The recomputation before a layer's backward skips out_proj's frozen GEMM and its adapter's
  // up-projection: the output they form is not needed again (TrainStep::layer_forward).
  const int64_t out_proj_rank = lora.targets_projection(Projection::out_proj) ? lora.rank : 0;
  const double out_proj_output = 2.0 * static_cast<double>(model.d_model * (model.d_inner + out_proj_rank));
  f.recompute = layers * (gemm + adapters + conv + scan - out_proj_output);
  f.regenerate =
      static_cast<double>(TrainStep::regenerated_layer_forwards(model.n_layer, checkpoint_every, keep_layer_outputs)) *
      (gemm + adapters + conv + scan);
  return f;
}

std::unique_ptr<BackendSizes> backend_sizes_for(const std::string& device, std::string* assumption) {
  assumption->clear();
  if (device == "cpu") return make_cpu_backend(DType::F32);
#ifdef SSMTUNE_WITH_CUDA
  if (device == "auto")
    *assumption = "device auto: sized for the CUDA backend, as on a machine with a GPU (device=cpu for the CPU)";
  return cuda_backend_sizes();
#else
  if (device == "cuda")
    fail("device=cuda: this build of ssmtune has no CUDA backend (nvcc was not found when it was configured); "
         "use device=cpu or auto");
  *assumption = "device auto: sized for the CPU backend, the only one in this build (no CUDA)";
  return make_cpu_backend(DType::F32);
#endif
}

ModelInfo model_info(const RecipeConfig& recipe, int ranks) {
  if (ranks < 1) fail("--ranks must be at least 1, got {}", ranks);
  ModelInfo info;
  info.model = load_mamba_config(recipe.model_path / "config.json");
  info.tied_lm_head = info.model.tie_word_embeddings;
  const std::unique_ptr<BackendSizes> backend = backend_sizes_for(recipe.device, &info.assumption);
  info.backend = backend->name();
  info.act_dtype = backend->act_dtype();
  info.master_dtype = backend->master_dtype();
  info.ranks = ranks;
  info.params = parameter_counts(info.model, info.tied_lm_head, recipe.lora);
  info.memory = memory_estimate(*backend, info.model, info.tied_lm_head, recipe.lora, recipe.step,
                                optimizer_shard(recipe.distributed.strategy, 0, ranks),
                                recipe.distributed.shard_base_weights ? ranks : 1);
  StepShape other = recipe.step;
  other.recompute = !other.recompute;
  if (!other.recompute) {  // segment checkpoints need recomputation
    other.checkpoint_every = 1;
    other.keep_layer_outputs = false;
  }
  info.step_other_recompute = TrainStep::planned_bytes(*backend, info.model, recipe.lora, other);
  info.flops = flops_per_token(info.model, recipe.lora, recipe.step.checkpoint_every, recipe.step.keep_layer_outputs);
  return info;
}

}  // namespace ssmtune
