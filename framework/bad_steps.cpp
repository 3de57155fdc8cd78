#include "framework/bad_steps.h"

#include "framework/error.h"

namespace ssmtune {

BadSteps::BadSteps(int64_t max_in_a_row, int64_t in_a_row, int64_t total)
    : max_in_a_row_(max_in_a_row), in_a_row_(in_a_row), total_(total) {}

void BadSteps::record(bool bad) {
  in_a_row_ = bad ? in_a_row_ + 1 : 0;
  total_ += bad ? 1 : 0;
}

void BadSteps::stop_if_diverged(int64_t step, double loss, double grad_norm) const {
  if (in_a_row_ >= max_in_a_row_)
    fail("step {}: the loss or gradient norm was not finite in {} steps in a row (this one: loss {}, grad_norm {}), "
         "train.max_bad_steps = {}: training has diverged. The adapters are as after step {}; resume from an "
         "earlier checkpoint with a lower train.lr or train.max_grad_norm, or check the data and the model",
         step, in_a_row_, loss, grad_norm, max_in_a_row_, step - in_a_row_);
}

}  // namespace ssmtune
