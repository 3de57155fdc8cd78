// The check behind the packed-documents tests (test_packing.cpp on the CPU backend, test_packing_cuda.cpp
// on the GPU): documents packed into rows with doc_start give the same per-document losses, the same
// total loss and the same adapter gradients as each document alone in a padded row of its own.
#pragma once
#include <cmath>
#include <filesystem>
#include <functional>
#include <memory>
#include <random>
#include <vector>

#include "framework/backend.h"
#include "framework/cpu_backend.h"
#include "framework/mamba_config.h"
#include "framework/lora.h"
#include "framework/mamba_model.h"
#include "framework/train_step.h"
#include "tests/catch.h"

namespace ssmtune::test {

using Document = std::vector<uint32_t>;

// Rows of seq_len+1 tokens with their target mask, doc_start (empty: none, the rows are unpacked) and,
// for every target, the document it belongs to (-1 where the target is masked out).
struct DocumentBatch {
  int64_t batch = 0, seq_len = 0;
  std::vector<uint32_t> tokens;
  std::vector<uint8_t> mask;
  std::vector<int32_t> doc_start;
  std::vector<int64_t> target_document;

  // Target t of a row is trained when tokens t and t+1 are of the same document: a document's first
  // token is never a target (the rule of SequenceSampler with data.packing). Rows are filled up with
  // pad_token, whose targets are masked and which continues the row's last document.
  static DocumentBatch make(const std::vector<Document>& docs, const std::vector<std::vector<size_t>>& rows,
                            int64_t seq_len, bool packed, uint32_t pad_token) {
    DocumentBatch out;
    out.batch = static_cast<int64_t>(rows.size());
    out.seq_len = seq_len;
    for (const auto& row : rows) {
      std::vector<uint32_t> tokens;
      std::vector<int64_t> document, start;
      for (const size_t d : row) {
        const auto first = static_cast<int64_t>(tokens.size());
        for (const uint32_t token : docs[d]) {
          tokens.push_back(token);
          document.push_back(static_cast<int64_t>(d));
          start.push_back(first);
        }
      }
      REQUIRE(tokens.size() <= static_cast<size_t>(seq_len + 1));
      const size_t real = tokens.size();
      while (tokens.size() < static_cast<size_t>(seq_len + 1)) {
        tokens.push_back(pad_token);
        document.push_back(-1);
        start.push_back(start.back());
      }
      out.tokens.insert(out.tokens.end(), tokens.begin(), tokens.end());
      for (int64_t t = 0; t < seq_len; ++t) {
        const bool trained = static_cast<size_t>(t + 1) < real && document[t] == document[t + 1];
        out.mask.push_back(trained);
        out.target_document.push_back(trained ? document[t] : -1);
        if (packed) out.doc_start.push_back(static_cast<int32_t>(start[t]));
      }
    }
    return out;
  }

  const int32_t* doc_start_or_null() const { return doc_start.empty() ? nullptr : doc_start.data(); }
  // The mask restricted to the targets of document d.
  std::vector<uint8_t> mask_of(int64_t d) const {
    std::vector<uint8_t> out(mask.size());
    for (size_t i = 0; i < mask.size(); ++i) out[i] = target_document[i] == d;
    return out;
  }
};

struct StepResult {
  double loss = 0;                     // sum over the trained targets
  std::vector<double> document_losses; // per document, from forward_loss with its targets only
  std::vector<double> gradients;       // adapter gradients of the summed loss
};

// One TrainStep over `batch` on a fresh backend, from the adapter values `params`; without dropout, whose
// masks depend on where a token sits.
inline StepResult run_documents(Backend& backend, const std::filesystem::path& model, const LoraConfig& lora,
                                const std::vector<double>& params, const DocumentBatch& batch, int64_t scan_chunk,
                                bool recompute, size_t documents) {
  MambaWeights weights = MambaWeights::load(model, backend);
  LoraAdapters adapters(backend, weights.config(), lora);
  adapters.upload(adapters.params(), params);
  backend.fill_zero(adapters.grads(), static_cast<size_t>(adapters.numel()) * dtype_size(adapters.dtype()));
  const StepShape shape{batch.batch, batch.seq_len, scan_chunk, recompute, 64};
  TrainStep step(backend, weights, adapters, shape);
  StepResult r;
  r.loss = step.forward_backward(batch.tokens.data(), batch.mask.data(), 1.0, 0, 0, batch.doc_start_or_null());
  r.gradients = adapters.download(adapters.grads());
  for (size_t d = 0; d < documents; ++d) {
    const std::vector<uint8_t> mask = batch.mask_of(static_cast<int64_t>(d));
    r.document_losses.push_back(step.forward_loss(batch.tokens.data(), mask.data(), batch.doc_start_or_null()));
  }
  return r;
}

// Adapter values drawn from N(0, 0.1^2), one per adapter parameter of this model and LoRA config.
inline std::vector<double> random_adapter_values(const MambaConfig& config, const LoraConfig& lora, uint64_t seed) {
  const std::unique_ptr<Backend> backend = make_cpu_backend(DType::F64);
  const LoraAdapters adapters(*backend, config, lora);
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 0.1);
  std::vector<double> values(static_cast<size_t>(adapters.numel()));
  for (double& v : values) v = normal(rng);
  return values;
}

inline double relative_difference(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double diff = 0, norm = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    diff += (a[i] - b[i]) * (a[i] - b[i]);
    norm += b[i] * b[i];
  }
  return std::sqrt(diff / (norm > 0 ? norm : 1.0));
}

// Packs `rows` (document indices per row) into rows of seq_len tokens and compares them, on backends
// from make_backend, with every document alone in a row of its own of the same length. Losses agree to
// loss_tolerance (relative, each document's and the total), gradients to gradient_tolerance (relative,
// norm-wise). Random non-zero adapters, so that every adapter gradient is non-zero (PEFT starts B at 0).
inline void check_packed_equals_separate(const std::function<std::unique_ptr<Backend>()>& make_backend,
                                         const std::filesystem::path& model, const std::vector<Document>& docs,
                                         const std::vector<std::vector<size_t>>& rows, int64_t seq_len,
                                         int64_t scan_chunk, bool recompute, double loss_tolerance,
                                         double gradient_tolerance) {
  LoraConfig lora;
  lora.rank = 4;
  lora.alpha = 8;
  std::vector<std::vector<size_t>> alone;
  for (const auto& row : rows)
    for (const size_t d : row) alone.push_back({d});
  const DocumentBatch packed = DocumentBatch::make(docs, rows, seq_len, true, 0);
  const DocumentBatch separate = DocumentBatch::make(docs, alone, seq_len, false, 0);

  std::unique_ptr<Backend> packed_backend = make_backend(), separate_backend = make_backend();
  const std::vector<double> params = random_adapter_values(load_mamba_config(model / "config.json"), lora, 11);
  const StepResult p =
      run_documents(*packed_backend, model, lora, params, packed, scan_chunk, recompute, docs.size());
  const StepResult s =
      run_documents(*separate_backend, model, lora, params, separate, scan_chunk, recompute, docs.size());

  INFO("packed loss " << p.loss << ", separate " << s.loss);
  CHECK(std::abs(p.loss - s.loss) <= loss_tolerance * std::abs(s.loss));
  for (size_t d = 0; d < docs.size(); ++d) {
    INFO("document " << d << " of " << docs[d].size() << " tokens: packed loss " << p.document_losses[d]
                     << ", alone " << s.document_losses[d]);
    CHECK(std::abs(p.document_losses[d] - s.document_losses[d]) <= loss_tolerance * std::abs(s.document_losses[d]));
  }
  const double gradient_error = relative_difference(p.gradients, s.gradients);
  INFO("relative gradient difference " << gradient_error);
  CHECK(gradient_error <= gradient_tolerance);
}

}  // namespace ssmtune::test
