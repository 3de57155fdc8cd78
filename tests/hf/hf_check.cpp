#include "tests/hf/hf_check.h"

#include <fmt/format.h>

#include <cmath>

#include "tests/catch.h"

namespace ssmtune::test {

void check_run(const HfReference& ref, const std::string& variant, const SsmtuneRun& run, const Tolerances& tol,
               const std::string& label) {
  const std::string what = label + " " + ref.name() + (variant.empty() ? "" : " (" + variant + ")");
  INFO(what);

  const Discrepancy logits = discrepancy(run.logits, ref.logits(variant));
  const double hf_loss = ref.read(variant + "loss").at(0);
  const double loss_error = std::fabs(run.loss - hf_loss) / std::fabs(hf_loss);

  const std::string grad_prefix = variant + "grad.";
  size_t reference_grads = 0;
  for (const std::string& name : ref.names()) reference_grads += name.rfind(grad_prefix, 0) == 0;
  CHECK(run.layout.size() == reference_grads);
  double worst = 0;
  std::string worst_key = "none";
  for (const AdapterTensor& t : run.layout) {
    const Discrepancy d = discrepancy({run.grads.data() + t.offset, static_cast<size_t>(t.numel())},
                                      ref.read(grad_prefix + t.peft_key));
    INFO("d loss / d " << t.peft_key << ": max abs error " << d.max_abs << " of max " << d.max_ref);
    CHECK(d.relative() <= tol.grads);
    if (!(d.relative() <= worst)) {
      worst = d.relative();
      worst_key = t.peft_key;
    }
  }

  fmt::print("hf-compare {}: logits {:.2e} (max abs {:.2e} of {:.3g}), loss {:.2e} ({:.8f} vs HF {:.8f}), "
             "grads {:.2e} ({})\n",
             what, logits.relative(), logits.max_abs, logits.max_ref, loss_error, run.loss, hf_loss, worst, worst_key);
  std::fflush(stdout);
  INFO("logits: max abs error " << logits.max_abs << " of max " << logits.max_ref);
  CHECK(logits.relative() <= tol.logits);
  INFO("loss " << run.loss << " against HF's " << hf_loss);
  CHECK(loss_error <= tol.loss);
}

}  // namespace ssmtune::test
