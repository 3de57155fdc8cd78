// On the GPU, a bitsandbytes NF4 checkpoint from `ssmtune quantize` (quantized on the host by
// cpu::nf4_quantize) loads as exactly the weights the CUDA backend gets by quantizing the source on
// load: byte for byte, the packed codes, absmax codes, nested absmax and offsets included.
#include "framework/cuda_backend.h"
#include "framework/mamba_model.h"
#include "framework/model_sizes.h"
#include "framework/quantize_model.h"
#include "tests/catch.h"
#include "tests/framework/model_rewrite.h"
#include "tests/framework/same_weights.h"
#include "tests/framework/scratch_dir.h"

using namespace ssmtune;

TEST_CASE("on the GPU a pre-quantized checkpoint loads as quantizing its source on load") {
  const std::unique_ptr<Backend> backend = make_cuda_backend();
  for (const std::string size : {"demo", "falcon-demo"}) {
    for (const DType stored : {DType::F32, DType::BF16}) {
      INFO(size << ", " << dtype_name(stored));
      test::ScratchDir dir("prequantized-cuda");
      write_random_mamba(dir / "f32", model_size(size), 21);
      test::rewrite_model(dir / "f32", dir / "source", test::convert_floats_to(stored));
      write_quantized_model(dir / "source", dir / "nf4", 3000);
      test::require_same_weights(*backend, MambaWeights::load(dir / "source", *backend),
                                 MambaWeights::load(dir / "nf4", *backend));
    }
  }
}
