// Fused LM head + cross-entropy: loss against the formula written out, dh against central finite
// differences in double, identical results for every slice size, zero-weight rows, float against double,
// and logits far beyond float's exp range.
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "kernels/cpu/cross_entropy.h"
#include "tests/catch.h"
#include "tests/kernels/finite_difference.h"

using ssmtune::cpu::cross_entropy_forward_backward;
using ssmtune::test::central_difference;
using ssmtune::test::close_to_fd;
using ssmtune::test::random_values;

namespace {

constexpr int64_t kRows = 7, kDim = 5, kVocab = 11;
constexpr int32_t kIgnoredTarget = -100;  // what HF puts on padding; rows of weight 0 must not read it

struct Problem {
  std::vector<double> h, W, weights;
  std::vector<int32_t> targets;
  double grad_scale = 0.0;
};

// Random h and W; rows 2 and 5 excluded (weight 0, out-of-range target); grad_scale = 1 / sum(weights) as a
// trainer averaging over tokens would pass.
Problem random_problem(std::mt19937_64& rng, double h_scale = 1.0) {
  Problem p;
  p.h = random_values(kRows * kDim, rng, -h_scale, h_scale);
  p.W = random_values(kVocab * kDim, rng, -1.0, 1.0);
  p.weights = random_values(kRows, rng, 0.5, 1.5);
  std::uniform_int_distribution<int32_t> token(0, kVocab - 1);
  for (int64_t t = 0; t < kRows; ++t) p.targets.push_back(token(rng));
  for (const int64_t t : {2, 5}) {
    p.weights[t] = 0.0;
    p.targets[t] = kIgnoredTarget;
  }
  double weight_sum = 0.0;
  for (const double w : p.weights) weight_sum += w;
  p.grad_scale = 1.0 / weight_sum;
  return p;
}

// sum_t weight_t * (log sum_v exp(logit_tv) - logit_t,target), logits formed one dot product at a time.
double naive_loss(const Problem& p) {
  double total = 0.0;
  for (int64_t t = 0; t < kRows; ++t) {
    if (p.weights[t] == 0.0) continue;
    std::vector<double> logits(kVocab, 0.0);
    for (int64_t v = 0; v < kVocab; ++v) {
      for (int64_t i = 0; i < kDim; ++i) logits[v] += p.h[t * kDim + i] * p.W[v * kDim + i];
    }
    double max_logit = -std::numeric_limits<double>::infinity();
    for (const double l : logits) max_logit = std::max(max_logit, l);
    double sum_exp = 0.0;
    for (const double l : logits) sum_exp += std::exp(l - max_logit);
    total += p.weights[t] * (max_logit + std::log(sum_exp) - logits[p.targets[t]]);
  }
  return total;
}

template <typename T>
double run(const std::vector<T>& h, const std::vector<T>& W, const Problem& p, const std::vector<T>& weights,
           std::vector<T>* dh, int64_t slice_rows) {
  std::vector<T> workspace(slice_rows * kVocab);
  return cross_entropy_forward_backward<T>(h.data(), W.data(), kRows, kDim, kVocab, p.targets.data(),
                                           weights.data(), T(p.grad_scale), dh ? dh->data() : nullptr,
                                           workspace.data(), slice_rows);
}

// dh as written by the kernel, with every element first set to NaN to show it is written, not accumulated.
std::vector<double> gradient(const Problem& p, int64_t slice_rows, double* loss) {
  std::vector<double> dh(kRows * kDim, std::numeric_limits<double>::quiet_NaN());
  *loss = run(p.h, p.W, p, p.weights, &dh, slice_rows);
  return dh;
}

}  // namespace

TEST_CASE("cross entropy loss matches the formula, with and without dh") {
  std::mt19937_64 rng(31);
  const Problem p = random_problem(rng);
  const double expected = naive_loss(p);
  double loss = 0.0;
  gradient(p, 3, &loss);
  // The same double arithmetic in a different order (gemm's dot products, slicing): 1e-13 relative.
  CHECK(loss == Approx(expected).epsilon(1e-13));
  CHECK(run<double>(p.h, p.W, p, p.weights, nullptr, 3) == loss);  // forward only: bit for bit the same
}

TEST_CASE("cross entropy dh matches finite differences of grad_scale * loss") {
  std::mt19937_64 rng(32);
  Problem p = random_problem(rng);
  double loss = 0.0;
  const auto dh = gradient(p, 3, &loss);
  const auto scaled_loss = [&] { return p.grad_scale * run<double>(p.h, p.W, p, p.weights, nullptr, 3); };
  for (size_t i = 0; i < p.h.size(); ++i) {
    INFO("h index " << i);
    CHECK(close_to_fd(dh[i], central_difference(p.h, i, scaled_loss)));
  }
}

TEST_CASE("cross entropy gives identical loss and dh for every slice size") {
  std::mt19937_64 rng(33);
  const Problem p = random_problem(rng);
  double loss_one = 0.0;
  const auto dh_one = gradient(p, 1, &loss_one);
  // Each row's logits, softmax and dh row are computed by the same loops in the same order whichever slice
  // holds the row, and the losses are summed in row order: the results must be equal bit for bit.
  for (const int64_t slice_rows : {int64_t{3}, kRows, kRows + 4}) {
    INFO("slice_rows " << slice_rows);
    double loss = 0.0;
    const auto dh = gradient(p, slice_rows, &loss);
    CHECK(loss == loss_one);
    CHECK(dh == dh_one);
  }
}

TEST_CASE("cross entropy rows of weight 0 get a zero dh row and add no loss") {
  std::mt19937_64 rng(34);
  const Problem p = random_problem(rng);
  double loss = 0.0;
  const auto dh = gradient(p, 3, &loss);
  for (const int64_t t : {2, 5}) {
    for (int64_t i = 0; i < kDim; ++i) CHECK(dh[t * kDim + i] == 0.0);
  }
  // An excluded row is skipped, not multiplied by 0: even NaN in its hidden state changes nothing.
  Problem poisoned = p;
  for (int64_t i = 0; i < kDim; ++i) poisoned.h[2 * kDim + i] = std::numeric_limits<double>::quiet_NaN();
  double poisoned_loss = 0.0;
  CHECK(gradient(poisoned, 3, &poisoned_loss) == dh);
  CHECK(poisoned_loss == loss);
}

TEST_CASE("cross entropy float agrees with double") {
  std::mt19937_64 rng(35);
  const Problem p = random_problem(rng);
  // Round the inputs to float first so both runs see the same numbers.
  const std::vector<float> hf(p.h.begin(), p.h.end()), Wf(p.W.begin(), p.W.end()),
      weightsf(p.weights.begin(), p.weights.end());
  const std::vector<double> hd(hf.begin(), hf.end()), Wd(Wf.begin(), Wf.end()),
      weightsd(weightsf.begin(), weightsf.end());
  std::vector<double> dhd(kRows * kDim);
  std::vector<float> dhf(kRows * kDim);
  const double lossd = run(hd, Wd, p, weightsd, &dhd, 3);
  const double lossf = run(hf, Wf, p, weightsf, &dhf, 3);
  // float rounds at 6e-8 per operation; each row loss is O(1) from sums of 5 and 11 terms, so its error is
  // ~1e-6; summed over 5 rows, 1e-5 relative on the total bounds it. dh entries are O(0.1) sums of 11
  // terms: 1e-5 absolute. Any formula difference would be far larger.
  CHECK(lossf == Approx(lossd).epsilon(1e-5));
  for (size_t i = 0; i < dhd.size(); ++i) CHECK(std::abs(dhf[i] - dhd[i]) <= 1e-5);
}

TEST_CASE("cross entropy in float stays finite for logits beyond exp's range") {
  std::mt19937_64 rng(36);
  // |h| up to 1000 gives logits of several hundred to thousands: exp overflows float above 88.7 (and double
  // above 709), so only a max-subtracted logsumexp gives a finite answer.
  const Problem p = random_problem(rng, 1000.0);
  const std::vector<float> hf(p.h.begin(), p.h.end()), Wf(p.W.begin(), p.W.end()),
      weightsf(p.weights.begin(), p.weights.end());
  Problem rounded = p;
  rounded.h.assign(hf.begin(), hf.end());
  rounded.W.assign(Wf.begin(), Wf.end());
  rounded.weights.assign(weightsf.begin(), weightsf.end());
  std::vector<float> dhf(kRows * kDim);
  const double lossf = run(hf, Wf, rounded, weightsf, &dhf, 2);
  // Logits of magnitude ~2000 carry float rounding of ~2000 * 6e-8 * 5 terms ~ 1e-3 each; the loss is a
  // difference of such numbers summed over 5 rows, so 1e-2 absolute (on a total of order 1e3-1e4).
  CHECK(std::isfinite(lossf));
  CHECK(std::abs(lossf - naive_loss(rounded)) <= 1e-2);
  for (const float g : dhf) CHECK(std::isfinite(g));
}

TEST_CASE("cross entropy does not depend on the thread count") {
  // A vocabulary large enough (slice_rows * vocab > 2^14) for the per-row softmax loop to run in parallel.
  std::mt19937_64 rng(37);
  const int64_t rows = 7, dim = 5, vocab = 3001;
  const auto h = random_values(rows * dim, rng);
  const auto W = random_values(vocab * dim, rng);
  const std::vector<float> hf(h.begin(), h.end()), Wf(W.begin(), W.end()), weights(rows, 1.0f);
  std::vector<int32_t> targets;
  std::uniform_int_distribution<int32_t> token(0, vocab - 1);
  for (int64_t t = 0; t < rows; ++t) targets.push_back(token(rng));
  std::vector<float> workspace(rows * vocab);

  const int saved_threads = omp_get_max_threads();
  std::vector<double> losses;
  std::vector<std::vector<float>> dhs;
  for (const int threads : {1, 3}) {
    omp_set_num_threads(threads);
    std::vector<float> dh(rows * dim);
    losses.push_back(cross_entropy_forward_backward(hf.data(), Wf.data(), rows, dim, vocab, targets.data(),
                                                    weights.data(), 1.0f / rows, dh.data(), workspace.data(), rows));
    dhs.push_back(dh);
  }
  omp_set_num_threads(saved_threads);
  CHECK(losses[0] == losses[1]);  // bit for bit
  CHECK(dhs[0] == dhs[1]);
}
