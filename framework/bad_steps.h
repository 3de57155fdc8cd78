// Steps whose loss or gradient norm is not finite ("bad steps"). The optimizer skips their update on
// every rank (UpdateStats::skipped): adapters and moments stay as they were, while the data moves on
// and the step counts, so the step number, the learning-rate schedule and AdamW's bias correction
// follow the step counter as in HF's and torchtune's trainers. One bad step is usually a rare batch;
// many in a row mean training has diverged, and the job stops after train.max_bad_steps of them.
#pragma once
#include <cstdint>

namespace ssmtune {

class BadSteps {
 public:
  // in_a_row, total: the counts at the checkpoint a run resumes from.
  explicit BadSteps(int64_t max_in_a_row, int64_t in_a_row = 0, int64_t total = 0);

  // Counts the step just done as bad or good.
  void record(bool bad);
  // An Error saying that training diverged, naming step number `step` (1-based, the one just
  // recorded) with its loss and norm, when max_in_a_row bad steps in a row have been recorded.
  void stop_if_diverged(int64_t step, double loss, double grad_norm) const;

  int64_t in_a_row() const { return in_a_row_; }
  int64_t total() const { return total_; }

 private:
  int64_t max_in_a_row_;
  int64_t in_a_row_;
  int64_t total_;
};

}  // namespace ssmtune
