// `ssmtune info` sizes the CUDA backend's plans without a device (cuda_backend_sizes): on a GPU, the
// plans the real CUDA backend allocates must take exactly those bytes (bf16 activations, fp32 master,
// the CUDA kernels' workspaces), and the device memory the progress line shows must be sane.
#include "framework/cuda_backend.h"
#include "framework/lora.h"
#include "framework/mamba_model.h"
#include "framework/model_info.h"
#include "framework/model_sizes.h"
#include "framework/train_step.h"
#include "tests/catch.h"
#include "tests/framework/scratch_dir.h"

using namespace ssmtune;

TEST_CASE("info's CUDA byte counts are those of the CUDA backend's plans") {
  test::ScratchDir dir("info-cuda");
  const std::unique_ptr<BackendSizes> sizes = cuda_backend_sizes();
  const std::unique_ptr<Backend> backend = make_cuda_backend(0);
  CHECK(sizes->act_dtype() == backend->act_dtype());
  CHECK(sizes->master_dtype() == backend->master_dtype());
  for (const std::string size : {"demo", "falcon-demo"}) {
    INFO(size);
    write_random_mamba(dir / size, model_size(size), 0);
    const MambaConfig c = load_mamba_config(dir / size / "config.json");
    const LoraConfig lora;
    const MemoryEstimate m = memory_estimate(*sizes, c, c.tie_word_embeddings, lora, StepShape{2, 64, 16, true, 32},
                                             ShardIndex{});
    const MambaWeights weights = MambaWeights::load(dir / size, *backend);
    CHECK(weights.bytes() == m.nf4_weights + m.dense_weights);
    LoraAdapters adapters(*backend, c, lora);
    for (const bool recompute : {true, false}) {
      const StepShape shape{2, 64, 16, recompute, 32};
      const TrainStep step(*backend, weights, adapters, shape);
      CHECK(step.activation_bytes() == TrainStep::planned_bytes(*sizes, c, lora, shape).total());
    }
  }
  const DeviceMemory memory = backend->device_memory();
  CHECK(memory.total > 0);
  CHECK(memory.used >= backend->allocated_bytes());  // the plans are on the device, with the context
  CHECK(memory.used <= memory.total);
}
