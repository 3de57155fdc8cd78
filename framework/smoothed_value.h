// An exponential moving average with the bias correction of Adam, for the training loss of the live
// progress line and of the plot: after values x_1..x_n it is sum_i (1-beta) beta^(n-i) x_i / (1-beta^n),
// a weighted mean whose weights sum to one, so the first values are not pulled toward zero as a plain
// EMA started at 0 would pull them. beta 0.9: about the last ten steps.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

namespace ssmtune {

class SmoothedValue {
 public:
  static constexpr double kDefaultBeta = 0.9;
  explicit SmoothedValue(double beta = kDefaultBeta) : beta_(beta) {}
  // `steps`: how many steps this value stands for, when values are not one per step (metrics.jsonl
  // logs every train.log_every steps): the average then decays by beta^steps, so it spans about the
  // same number of steps whatever the logging interval.
  void add(double value, double steps = 1) {
    const double decay = std::pow(beta_, steps);
    average_ = decay * average_ + (1 - decay) * value;
    beta_power_ *= decay;
    ++count_;
  }
  bool empty() const { return count_ == 0; }
  // NaN while empty.
  double value() const {
    return count_ == 0 ? std::numeric_limits<double>::quiet_NaN() : average_ / (1 - beta_power_);
  }

 private:
  double beta_;
  double average_ = 0;     // the uncorrected average
  double beta_power_ = 1;  // beta^n
  int64_t count_ = 0;
};

}  // namespace ssmtune
