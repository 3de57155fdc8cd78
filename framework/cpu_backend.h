// The CPU backend: the reference every other backend is tested against, and a real backend that
// trains tiny models in CI. Scalar is float for training and double for gradient checks; every role
// (act and master) then has that one type.
#pragma once
#include <memory>

#include "framework/backend.h"

namespace ssmtune {

std::unique_ptr<Backend> make_cpu_backend(DType scalar = DType::F32);

}  // namespace ssmtune
