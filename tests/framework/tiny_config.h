// The smallest Mamba configuration the whole-model tests (gradcheck, packing) run: two layers, d_model 8,
// d_state 4, in the architecture model_type names ("mamba" or "falcon_mamba").
#pragma once
#include <string>

#include "framework/mamba_config.h"

namespace ssmtune::test {

inline MambaConfig tiny_config(const std::string& model_type) {
  MambaConfig c;
  c.model_type = model_type;
  c.d_model = 8;
  c.n_layer = 2;
  c.vocab_size = 11;
  c.d_state = 4;
  c.expand = 2;
  c.d_inner = 16;
  c.conv_kernel = 4;
  c.dt_rank = 3;  // not a power of two, so the strided dt/B/C split is exercised
  c.tie_word_embeddings = model_type == "mamba";  // falcon-mamba's lm_head is its own
  return c;
}

}  // namespace ssmtune::test
