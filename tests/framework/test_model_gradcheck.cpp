// The whole QLoRA step end to end: a two-layer Mamba on the fp64 CPU backend, every adapter gradient
// against finite differences of the loss; layer recomputation changes nothing; fp32 agrees with fp64.
#include <random>

#include "framework/cpu_backend.h"
#include "framework/lora.h"
#include "framework/mamba_model.h"
#include "framework/train_step.h"
#include "tests/catch.h"
#include "tests/framework/scratch_dir.h"
#include "tests/kernels/finite_difference.h"

using namespace ssmtune;

namespace {

MambaConfig tiny_config() {
  MambaConfig c;
  c.d_model = 8;
  c.n_layer = 2;
  c.vocab_size = 11;
  c.d_state = 4;
  c.expand = 2;
  c.d_inner = 16;
  c.conv_kernel = 4;
  c.dt_rank = 3;  // not a power of two, so the strided dt/B/C split is exercised
  return c;
}

struct Fixture {
  test::ScratchDir dir{"gradcheck"};
  MambaConfig config = tiny_config();
  std::vector<uint32_t> tokens;
  std::vector<uint8_t> mask;
  std::vector<double> adapter_values;
  StepShape shape{2, 7, 3, true, 5};  // odd length over chunks of 3, loss in slices of 5 of 14 rows

  Fixture() {
    write_random_mamba(dir / "model", config, 7);
    std::mt19937_64 rng(3);
    for (int64_t i = 0; i < shape.batch * (shape.seq_len + 1); ++i) tokens.push_back(rng() % config.vocab_size);
    for (int64_t i = 0; i < shape.batch * shape.seq_len; ++i) mask.push_back(i % 5 != 2);
  }

  struct Run {
    std::unique_ptr<Backend> backend;
    std::unique_ptr<MambaWeights> weights;
    std::unique_ptr<LoraAdapters> adapters;
    std::unique_ptr<TrainStep> step;
  };
  Run make(DType scalar, bool recompute, double dropout) {
    Run r;
    r.backend = make_cpu_backend(scalar);
    r.weights = std::make_unique<MambaWeights>(MambaWeights::load(dir / "model", *r.backend));
    LoraConfig lora;
    lora.rank = 2;
    lora.alpha = 3;
    lora.dropout = dropout;
    r.adapters = std::make_unique<LoraAdapters>(*r.backend, config, lora);
    if (adapter_values.empty()) {  // B is zero at PEFT's init, which hides A's gradient: use random values
      std::mt19937_64 rng(5);
      adapter_values = test::random_values(r.adapters->numel(), rng, -0.5, 0.5);
    }
    r.adapters->upload(r.adapters->params(), adapter_values);
    StepShape s = shape;
    s.recompute = recompute;
    r.step = std::make_unique<TrainStep>(*r.backend, *r.weights, *r.adapters, s);
    return r;
  }
  double loss_and_grads(Run& r) {
    r.backend->fill_zero(r.adapters->grads(), r.adapters->numel() * dtype_size(r.adapters->dtype()));
    return r.step->forward_backward(tokens.data(), mask.data(), 1.0, 17, 4);
  }
};

}  // namespace

TEST_CASE("two-layer QLoRA step: every adapter gradient matches finite differences in fp64") {
  Fixture f;
  for (double dropout : {0.0, 0.3}) {
    Fixture::Run run = f.make(DType::F64, true, dropout);
    f.loss_and_grads(run);
    const std::vector<double> analytic = run.adapters->download(run.adapters->grads());
    std::vector<double> params = f.adapter_values;
    int failures = 0;
    for (size_t i = 0; i < params.size(); ++i) {
      const double fd = test::central_difference(params, i, [&] {
        run.adapters->upload(run.adapters->params(), params);
        return f.loss_and_grads(run);
      });
      if (!test::close_to_fd(analytic[i], fd)) {
        ++failures;
        UNSCOPED_INFO("dropout " << dropout << " param " << i << ": analytic " << analytic[i] << " fd " << fd);
      }
    }
    CHECK(failures == 0);
  }
}

TEST_CASE("layer recomputation gives bit-identical losses and gradients") {
  Fixture f;
  Fixture::Run stored = f.make(DType::F32, false, 0.1);
  Fixture::Run recomputed = f.make(DType::F32, true, 0.1);
  CHECK(f.loss_and_grads(stored) == f.loss_and_grads(recomputed));
  CHECK(stored.adapters->download(stored.adapters->grads()) ==
        recomputed.adapters->download(recomputed.adapters->grads()));
  CHECK(recomputed.step->activation_bytes() < stored.step->activation_bytes());
}

TEST_CASE("the fp32 backend agrees with the fp64 backend") {
  Fixture f;
  Fixture::Run r64 = f.make(DType::F64, true, 0.0);
  Fixture::Run r32 = f.make(DType::F32, true, 0.0);
  const double loss64 = f.loss_and_grads(r64), loss32 = f.loss_and_grads(r32);
  // fp32 rounding through two layers and ~10^2-term sums: relative error well under 1e-5.
  CHECK(loss32 == Approx(loss64).epsilon(1e-5));
  const std::vector<double> g64 = r64.adapters->download(r64.adapters->grads());
  const std::vector<double> g32 = r32.adapters->download(r32.adapters->grads());
  double max_grad = 0;
  for (double g : g64) max_grad = std::max(max_grad, std::abs(g));
  for (size_t i = 0; i < g64.size(); ++i) CHECK(std::abs(g32[i] - g64[i]) <= 1e-4 * max_grad);
}
