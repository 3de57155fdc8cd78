// The validation loss during training: the mean loss over the unmasked target tokens of a fixed set of
// eval.batches micro-batches of data.val_path, the same micro-batches at every evaluation and in every
// run (the validation sequences are drawn by a SequenceSampler with its own fixed seed, so that runs
// with different train.seed are compared on the same tokens). Under mpirun micro-batch i is evaluated
// by rank i % world and the sums are added over the ranks, so the result does not depend on the
// number of ranks.
#pragma once
#include <cstdint>
#include <vector>

#include "data/token_dataset.h"
#include "distributed/communicator.h"
#include "framework/train_step.h"

namespace ssmtune {

struct ValidationResult {
  double loss = 0;        // mean over the unmasked target tokens, nats
  double perplexity = 0;  // exp(loss)
  int64_t target_tokens = 0;
};

class Validation {
 public:
  // Reads this rank's micro-batches of shape step.shape() once, here, and counts the target tokens of
  // all ranks through host (a collective: every rank constructs its Validation together). Fails,
  // naming the file, when it holds fewer than batches * shape.batch sequences of seq_len + 1 tokens or
  // every target token is masked out. packing: data.packing, as in training (data/README.md).
  // With context parallelism (parallel.context = context_size), the ranks context_size apart form one
  // replica that reads the same micro-batches, each keeping its slice (framework/context_parallel.h);
  // shape.seq_len is the whole sequence's length.
  Validation(const TokenDataset& dataset, int64_t batches, const StepShape& shape, bool packing, Communicator& host,
             int context_size = 1);

  // A collective over host: forward_loss without dropout over this rank's micro-batches, summed over
  // the ranks. Changes nothing that training reads: forward_loss writes only activations that the next
  // forward_backward writes again, leaves the adapter gradients alone and draws no random numbers.
  ValidationResult evaluate(TrainStep& step) const;

 private:
  Communicator& host_;
  int64_t batch_, seq_len_;
  int64_t local_batches_;
  int64_t passes_;  // forward passes of every rank: the most micro-batches any rank has
  int64_t target_tokens_ = 0;  // over all ranks
  std::vector<uint32_t> tokens_;  // [local_batches, batch, seq_len + 1]
  std::vector<uint8_t> mask_;     // [local_batches, batch, seq_len]
  std::vector<int32_t> doc_start_;  // [local_batches, batch, seq_len]
};

}  // namespace ssmtune
