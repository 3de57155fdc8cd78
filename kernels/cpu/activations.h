// The scalar activations the CPU reference ops share (the conv's SiLU, the scan's softplus of delta and
// SiLU gate, and their one-token steps), so that every op evaluates them with the same expression.
#pragma once
#include <algorithm>
#include <cmath>

namespace ssmtune::cpu {

template <typename T>
T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// log(1 + e^x) without overflow for large x or loss of precision for very negative x; its derivative
// is sigmoid(x).
template <typename T>
T softplus(T x) {
  return std::max(x, T(0)) + std::log1p(std::exp(-std::abs(x)));
}

}  // namespace ssmtune::cpu
