#include "framework/evaluation.h"

#include <cmath>

#include "framework/context_parallel.h"
#include "framework/error.h"

namespace ssmtune {
namespace {

// Not train.seed: every run evaluates on the same validation sequences.
constexpr uint64_t kValidationSeed = 0;

}  // namespace

Validation::Validation(const TokenDataset& dataset, int64_t batches, const StepShape& shape, bool packing,
                       Communicator& host, int context_size)
    : host_(host), batch_(shape.batch), seq_len_(shape.seq_len / context_size) {
  // Replicas of context_size consecutive ranks; micro-batches replica, replica + replicas, ... are this
  // replica's.
  const int replica = host.rank() / context_size, replicas = host.size() / context_size;
  local_batches_ = batches > replica ? (batches - replica + replicas - 1) / replicas : 0;
  passes_ = (batches + replicas - 1) / replicas;
  const int64_t full_len = shape.seq_len;
  SequenceSampler sampler(dataset, full_len, kValidationSeed, packing);
  const uint64_t needed = static_cast<uint64_t>(batches * batch_);
  if (needed > sampler.sequences_per_epoch())
    fail("{} (data.val_path): eval.batches {} x train.batch_size {} = {} sequences of data.seq_len+1 = {} tokens "
         "are needed, the file holds {}; lower eval.batches or use a larger validation set",
         dataset.path(), batches, batch_, needed, full_len + 1, sampler.sequences_per_epoch());
  const auto L = static_cast<size_t>(seq_len_), full = static_cast<size_t>(full_len);
  tokens_.resize(static_cast<size_t>(local_batches_ * batch_) * (L + 1));
  mask_.resize(static_cast<size_t>(local_batches_ * batch_) * L);
  doc_start_.resize(mask_.size());
  std::vector<uint32_t> tokens(full + 1);
  std::vector<uint8_t> mask(full);
  std::vector<int32_t> doc_start(full);
  size_t taken = 0;
  for (int64_t micro = 0; micro < batches; ++micro) {
    if (micro % replicas != replica) {
      sampler.skip(static_cast<uint64_t>(batch_));
      continue;
    }
    for (int64_t s = 0; s < batch_; ++s, ++taken) {
      sampler.next(tokens.data(), mask.data(), doc_start.data());
      take_context_slice(host.rank() % context_size, seq_len_, 1, full_len, tokens.data(), mask.data(),
                         doc_start.data(), &tokens_[taken * (L + 1)], &mask_[taken * L], &doc_start_[taken * L]);
    }
  }
  for (uint8_t m : mask_) target_tokens_ += m;
  host_.all_reduce_sum(&target_tokens_, 1, Element::i64);
  if (target_tokens_ == 0)
    fail("{} (data.val_path): every target token of the {} validation micro-batches is masked out", dataset.path(),
         batches);
}

ValidationResult Validation::evaluate(TrainStep& step) const {
  if (step.shape().batch != batch_ || step.shape().seq_len != seq_len_)
    fail("validation micro-batches of {} x {} tokens cannot run on a train step planned for {} x {}", batch_,
         seq_len_, step.shape().batch, step.shape().seq_len);
  const auto L = static_cast<size_t>(seq_len_), B = static_cast<size_t>(batch_);
  double loss_sum = 0;
  for (size_t micro = 0; micro < static_cast<size_t>(local_batches_); ++micro)
    loss_sum += step.forward_loss(&tokens_[micro * B * (L + 1)], &mask_[micro * B * L], &doc_start_[micro * B * L]);
  // Every rank runs as many forward passes as the busiest, since a forward may hold collectives (sharded
  // base weights gather each layer): the extra ones on token 0 with every target masked out add 0.
  if (local_batches_ < passes_) {
    const std::vector<uint32_t> tokens(B * (L + 1), 0);
    const std::vector<uint8_t> mask(B * L, 0);
    for (int64_t pass = local_batches_; pass < passes_; ++pass)
      loss_sum += step.forward_loss(tokens.data(), mask.data());
  }
  host_.all_reduce_sum(&loss_sum, 1, Element::f64);
  const double loss = loss_sum / static_cast<double>(target_tokens_);
  return {loss, std::exp(loss), target_tokens_};
}

}  // namespace ssmtune
