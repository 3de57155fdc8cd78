#include "framework/evaluation.h"

#include <cmath>

#include "framework/error.h"

namespace ssmtune {
namespace {

// Not train.seed: every run evaluates on the same validation sequences.
constexpr uint64_t kValidationSeed = 0;

}  // namespace

Validation::Validation(const TokenDataset& dataset, int64_t batches, const StepShape& shape, Communicator& host)
    : host_(host), batch_(shape.batch), seq_len_(shape.seq_len) {
  const int rank = host.rank(), world = host.size();
  // Micro-batches rank, rank + world, ... are this rank's.
  local_batches_ = batches > rank ? (batches - rank + world - 1) / world : 0;
  SequenceSampler sampler(dataset, seq_len_, kValidationSeed);
  const uint64_t needed = static_cast<uint64_t>(batches * batch_);
  if (needed > sampler.sequences_per_epoch())
    fail("{} (data.val_path): eval.batches {} x train.batch_size {} = {} sequences of data.seq_len+1 = {} tokens "
         "are needed, the file holds {}; lower eval.batches or use a larger validation set",
         dataset.path(), batches, batch_, needed, seq_len_ + 1, sampler.sequences_per_epoch());
  const auto L = static_cast<size_t>(seq_len_);
  tokens_.resize(static_cast<size_t>(local_batches_ * batch_) * (L + 1));
  mask_.resize(static_cast<size_t>(local_batches_ * batch_) * L);
  size_t taken = 0;
  for (int64_t micro = 0; micro < batches; ++micro) {
    if (micro % world != rank) {
      sampler.skip(static_cast<uint64_t>(batch_));
      continue;
    }
    for (int64_t s = 0; s < batch_; ++s, ++taken) sampler.next(&tokens_[taken * (L + 1)], &mask_[taken * L]);
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
    loss_sum += step.forward_loss(&tokens_[micro * B * (L + 1)], &mask_[micro * B * L]);
  host_.all_reduce_sum(&loss_sum, 1, Element::f64);
  const double loss = loss_sum / static_cast<double>(target_tokens_);
  return {loss, std::exp(loss), target_tokens_};
}

}  // namespace ssmtune
