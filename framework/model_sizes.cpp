#include "framework/model_sizes.h"

#include <fmt/ranges.h>

#include <map>

#include "framework/error.h"

namespace ssmtune {
namespace {

struct Size {
  int64_t d_model, n_layer, vocab_size;
  bool falcon = false;  // falcon_mamba: the mixer's dt/B/C norm, an untied lm_head, no biases
};

const std::map<std::string, Size>& sizes() {
  static const std::map<std::string, Size> table{
      {"demo", {64, 2, 64}},
      {"falcon-demo", {64, 2, 64, true}},
      {"mamba-130m", {768, 24, 50280}},
      {"mamba-370m", {1024, 48, 50280}},
      {"mamba-790m", {1536, 48, 50280}},
      {"mamba-1.4b", {2048, 48, 50280}},
      {"mamba-2.8b", {2560, 64, 50280}},
      {"falcon-mamba-7b", {4096, 64, 65024, true}},
  };
  return table;
}

}  // namespace

std::vector<std::string> model_size_names() {
  std::vector<std::string> names;
  for (const auto& [name, size] : sizes()) names.push_back(name);
  return names;
}

MambaConfig model_size(const std::string& name) {
  auto it = sizes().find(name);
  if (it == sizes().end()) fail("unknown model size '{}' (known: {})", name, fmt::join(model_size_names(), ", "));
  MambaConfig c;
  c.d_model = it->second.d_model;
  c.n_layer = it->second.n_layer;
  c.vocab_size = it->second.vocab_size;
  c.d_inner = c.expand * c.d_model;
  c.dt_rank = (c.d_model + 15) / 16;
  if (it->second.falcon) {
    c.model_type = "falcon_mamba";
    c.tie_word_embeddings = false;
  }
  return c;
}

}  // namespace ssmtune
