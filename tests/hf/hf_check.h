// Catch2 checks of an ssmtune run against one variant of an HF reference (hf_reference.h), with the
// errors printed on one line that run_hf.sh collects into its table.
#pragma once
#include <string>

#include "tests/hf/hf_reference.h"

namespace ssmtune::test {

// Bounds on max|ours - HF| / max|HF|: over all logits, for the loss, and per adapter gradient tensor.
struct Tolerances {
  double logits, loss, grads;
};

// Checks the run against the reference's <variant>logits, <variant>loss and every <variant>grad.<key>
// (the run must have an adapter for each), and prints
//   hf-compare <label> <config>: logits <rel> (max abs <abs> of <max>), loss <rel> (...), grads <worst rel> (<key>)
void check_run(const HfReference& ref, const std::string& variant, const SsmtuneRun& run, const Tolerances& tol,
               const std::string& label);

}  // namespace ssmtune::test
