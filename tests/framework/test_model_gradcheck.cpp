// The whole QLoRA step end to end on two-layer models, Mamba and falcon-mamba, on the CPU backend:
// every adapter gradient against finite differences of the loss in fp64; layer recomputation changes
// nothing; fp32 agrees with fp64; and the forward against the architecture of REFERENCE.md §1 written out
// naively here (which pins where falcon-mamba's mixer norm applies), through forward_logits, whose
// logits also give forward_loss's loss.
#include <cmath>
#include <random>

#include "framework/cpu_backend.h"
#include "framework/lora.h"
#include "framework/mamba_model.h"
#include "framework/train_step.h"
#include "kernels/cpu/nf4.h"
#include "tests/catch.h"
#include "tests/framework/scratch_dir.h"
#include "tests/framework/tiny_config.h"
#include "tests/kernels/finite_difference.h"

using namespace ssmtune;

namespace {

struct Fixture {
  test::ScratchDir dir{"gradcheck"};
  MambaConfig config;
  std::vector<uint32_t> tokens;
  std::vector<uint8_t> mask;
  std::vector<double> adapter_values;
  StepShape shape{2, 7, 3, true, 5};  // odd length over chunks of 3, loss in slices of 5 of 14 rows

  explicit Fixture(const std::string& model_type = "mamba") : config(test::tiny_config(model_type)) {
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
  // The input columns of `tokens`: [batch, seq_len], as forward_logits takes them.
  std::vector<uint32_t> inputs() const {
    std::vector<uint32_t> out;
    for (int64_t b = 0; b < shape.batch; ++b)
      for (int64_t t = 0; t < shape.seq_len; ++t) out.push_back(tokens[b * (shape.seq_len + 1) + t]);
    return out;
  }
};

void check_gradients_against_finite_differences(const std::string& model_type) {
  Fixture f(model_type);
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
        UNSCOPED_INFO(model_type << " dropout " << dropout << " param " << i << ": analytic " << analytic[i] << " fd "
                                 << fd);
      }
    }
    CHECK(failures == 0);
  }
}

// REFERENCE.md §1 in plain loops over the weights a F64 CPU backend holds (host memory), the NF4
// projections dequantized; no LoRA (the test zeroes the adapters). mixer_norm: falcon-mamba's weightless
// RMSNorm of dt_r, B and C, each over its own width, right after x_proj. Returns [batch * len, vocab].
std::vector<double> reference_logits(const MambaWeights& w, const std::vector<uint32_t>& inputs, int64_t batch,
                                     int64_t len, bool mixer_norm) {
  const MambaConfig& c = w.config();
  const int64_t E = c.d_model, D = c.d_inner, N = c.d_state, R = c.dt_rank, K = c.conv_kernel;
  auto host = [](const void* p) { return static_cast<const double*>(p); };
  auto dequantized = [](const Nf4Weight& q) {
    std::vector<double> out(static_cast<size_t>(q.out_features * q.in_features));
    cpu::nf4_dequantize<double>(q.packed, q.absmax_codes, q.nested_absmax, q.nested_offset,
                                q.out_features * q.in_features, out.data());
    return out;
  };
  auto matvec = [](const std::vector<double>& W, int64_t out, int64_t in, const double* x) {
    std::vector<double> y(static_cast<size_t>(out), 0.0);
    for (int64_t o = 0; o < out; ++o)
      for (int64_t i = 0; i < in; ++i) y[o] += W[o * in + i] * x[i];
    return y;
  };
  auto rms_normalize = [](double* x, int64_t n, double eps, const double* weight) {
    double mean_sq = 0;
    for (int64_t i = 0; i < n; ++i) mean_sq += x[i] * x[i] / n;
    for (int64_t i = 0; i < n; ++i) x[i] = x[i] / std::sqrt(mean_sq + eps) * (weight ? weight[i] : 1.0);
  };
  auto silu = [](double v) { return v / (1 + std::exp(-v)); };

  std::vector<double> logits;
  for (int64_t b = 0; b < batch; ++b) {
    std::vector<std::vector<double>> hidden;  // the residual stream, [len][E]
    for (int64_t t = 0; t < len; ++t) {
      const double* row = host(w.embedding()) + inputs[b * len + t] * E;
      hidden.emplace_back(row, row + E);
    }
    for (int64_t l = 0; l < c.n_layer; ++l) {
      const MambaLayerWeights& L = w.layer(l);
      const std::vector<double> in_proj = dequantized(L.proj[0]), x_proj = dequantized(L.proj[1]),
                                dt_proj = dequantized(L.proj[2]), out_proj = dequantized(L.proj[3]);
      std::vector<std::vector<double>> xz;
      for (int64_t t = 0; t < len; ++t) {
        std::vector<double> normed = hidden[t];
        rms_normalize(normed.data(), E, c.layer_norm_epsilon, host(L.norm_weight));
        xz.push_back(matvec(in_proj, 2 * D, E, normed.data()));
      }
      std::vector<double> state(static_cast<size_t>(D * N), 0.0);
      for (int64_t t = 0; t < len; ++t) {
        std::vector<double> u(static_cast<size_t>(D));
        for (int64_t d = 0; d < D; ++d) {
          double conv = host(L.conv_bias)[d];
          for (int64_t k = 0; k < K; ++k)
            if (t - (K - 1) + k >= 0) conv += host(L.conv_weight)[d * K + k] * xz[t - (K - 1) + k][d];
          u[d] = silu(conv);
        }
        std::vector<double> xdbl = matvec(x_proj, R + 2 * N, D, u.data());
        if (mixer_norm) {
          rms_normalize(xdbl.data(), R, c.mixer_rms_eps, nullptr);
          rms_normalize(xdbl.data() + R, N, c.mixer_rms_eps, nullptr);
          rms_normalize(xdbl.data() + R + N, N, c.mixer_rms_eps, nullptr);
        }
        const std::vector<double> dt = matvec(dt_proj, D, R, xdbl.data());
        std::vector<double> y(static_cast<size_t>(D));
        for (int64_t d = 0; d < D; ++d) {
          const double delta = std::log1p(std::exp(dt[d] + host(L.dt_bias)[d]));
          y[d] = host(L.D)[d] * u[d];
          for (int64_t n = 0; n < N; ++n) {
            double& h = state[d * N + n];
            h = std::exp(delta * host(L.A)[d * N + n]) * h + delta * xdbl[R + n] * u[d];
            y[d] += xdbl[R + N + n] * h;
          }
          y[d] *= silu(xz[t][D + d]);
        }
        const std::vector<double> out = matvec(out_proj, E, D, y.data());
        for (int64_t e = 0; e < E; ++e) hidden[t][e] += out[e];
      }
    }
    for (int64_t t = 0; t < len; ++t) {
      rms_normalize(hidden[t].data(), E, c.layer_norm_epsilon, host(w.norm_f()));
      const std::vector<double> head(host(w.lm_head()), host(w.lm_head()) + c.vocab_size * E);
      const std::vector<double> row = matvec(head, c.vocab_size, E, hidden[t].data());
      logits.insert(logits.end(), row.begin(), row.end());
    }
  }
  return logits;
}

double max_abs_difference(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

}  // namespace

TEST_CASE("two-layer QLoRA step: every adapter gradient matches finite differences in fp64") {
  check_gradients_against_finite_differences("mamba");
}

TEST_CASE("two-layer falcon-mamba QLoRA step, its mixer norm included: gradients match finite differences") {
  check_gradients_against_finite_differences("falcon_mamba");
}

TEST_CASE("layer recomputation gives bit-identical losses and gradients") {
  for (const char* model_type : {"mamba", "falcon_mamba"}) {
    INFO(model_type);
    Fixture f(model_type);
    Fixture::Run stored = f.make(DType::F32, false, 0.1);
    Fixture::Run recomputed = f.make(DType::F32, true, 0.1);
    CHECK(f.loss_and_grads(stored) == f.loss_and_grads(recomputed));
    CHECK(stored.adapters->download(stored.adapters->grads()) ==
          recomputed.adapters->download(recomputed.adapters->grads()));
    CHECK(recomputed.step->activation_bytes() < stored.step->activation_bytes());
  }
}

TEST_CASE("the fp32 backend agrees with the fp64 backend") {
  for (const char* model_type : {"mamba", "falcon_mamba"}) {
    INFO(model_type);
    Fixture f(model_type);
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
}

TEST_CASE("forward_logits equals the architecture written out, and its logits give forward_loss's loss") {
  for (const char* model_type : {"mamba", "falcon_mamba"}) {
    INFO(model_type);
    Fixture f(model_type);
    Fixture::Run run = f.make(DType::F64, true, 0.0);
    const std::vector<uint32_t> inputs = f.inputs();
    const int64_t rows = f.shape.batch * f.shape.seq_len, vocab = f.config.vocab_size;

    // With the fixture's random adapters: the masked sum of -log softmax(logits)[target] is forward_loss's.
    std::vector<double> logits = run.step->forward_logits(inputs.data());
    REQUIRE(logits.size() == static_cast<size_t>(rows * vocab));
    double loss = 0;
    for (int64_t b = 0; b < f.shape.batch; ++b)
      for (int64_t t = 0; t < f.shape.seq_len; ++t) {
        const int64_t row = b * f.shape.seq_len + t;
        if (!f.mask[row]) continue;
        const double* z = &logits[row * vocab];
        double max_z = z[0], sum = 0;
        for (int64_t v = 1; v < vocab; ++v) max_z = std::max(max_z, z[v]);
        for (int64_t v = 0; v < vocab; ++v) sum += std::exp(z[v] - max_z);
        loss += max_z + std::log(sum) - z[f.tokens[b * (f.shape.seq_len + 1) + t + 1]];
      }
    // fp64 on both sides, ~12 tokens of a few nats summed in different orders: 1e-12 relative.
    CHECK(loss == Approx(run.step->forward_loss(f.tokens.data(), f.mask.data())).epsilon(1e-12));

    // With zero adapters (the LoRA path adds exactly nothing), against the architecture written out.
    run.adapters->upload(run.adapters->params(), std::vector<double>(run.adapters->numel(), 0.0));
    logits = run.step->forward_logits(inputs.data());
    const bool falcon = f.config.has_mixer_norm();
    // Logits are O(1); both sides are fp64 with sums of at most 32 terms in different orders: 1e-12.
    CHECK(max_abs_difference(logits, reference_logits(*run.weights, inputs, f.shape.batch, f.shape.seq_len, falcon)) <
          1e-12);
    // The check above tells the two architectures apart: with random weights the mixer norm moves the
    // logits by far more than its tolerance.
    CHECK(max_abs_difference(logits, reference_logits(*run.weights, inputs, f.shape.batch, f.shape.seq_len,
                                                      !falcon)) > 1e-3);
  }
}
