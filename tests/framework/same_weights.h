// Two MambaWeights compared buffer by buffer, byte for byte, through the backend that holds them.
#pragma once
#include <cstring>
#include <vector>

#include "framework/backend.h"
#include "framework/mamba_model.h"
#include "kernels/cpu/nf4.h"
#include "tests/catch.h"

namespace ssmtune::test {

inline std::vector<std::byte> download(Backend& backend, const void* buffer, size_t bytes) {
  std::vector<std::byte> host(bytes);
  backend.copy_to_host(host.data(), buffer, bytes);
  return host;
}

// The buffers of a and b agree byte for byte.
inline void require_same_weights(Backend& backend, const MambaWeights& a, const MambaWeights& b) {
  const MambaConfig& c = a.config();
  REQUIRE(mamba_config_to_json(a.config()) == mamba_config_to_json(b.config()));
  REQUIRE(a.bytes() == b.bytes());
  const size_t act = dtype_size(backend.act_dtype()), master = dtype_size(backend.master_dtype());
  auto same = [&](const void* x, const void* y, int64_t n, size_t element) {
    const size_t bytes = static_cast<size_t>(n) * element;
    return download(backend, x, bytes) == download(backend, y, bytes);
  };
  CHECK(same(a.embedding(), b.embedding(), c.vocab_size * c.d_model, act));
  CHECK(same(a.lm_head(), b.lm_head(), c.vocab_size * c.d_model, act));
  CHECK((a.lm_head() == a.embedding()) == c.tie_word_embeddings);
  CHECK((b.lm_head() == b.embedding()) == c.tie_word_embeddings);
  CHECK(same(a.norm_f(), b.norm_f(), c.d_model, master));
  for (int64_t i = 0; i < c.n_layer; ++i) {
    INFO("layer " << i);
    const MambaLayerWeights &x = a.layer(i), &y = b.layer(i);
    CHECK(same(x.norm_weight, y.norm_weight, c.d_model, master));
    CHECK(same(x.conv_weight, y.conv_weight, c.d_inner * c.conv_kernel, master));
    CHECK(same(x.conv_bias, y.conv_bias, c.d_inner, master));
    CHECK(same(x.A, y.A, c.d_inner * c.d_state, master));
    CHECK(same(x.D, y.D, c.d_inner, master));
    CHECK(same(x.dt_bias, y.dt_bias, c.d_inner, master));
    for (Projection p : kProjections) {
      INFO(projection_name(p));
      const Nf4Weight &u = x.proj[static_cast<size_t>(p)], &v = y.proj[static_cast<size_t>(p)];
      const auto [out, in] = projection_shape(c, p);
      CHECK(u.out_features == out);
      CHECK(u.in_features == in);
      CHECK(v.out_features == out);
      CHECK(v.in_features == in);
      CHECK(std::memcmp(&u.nested_offset, &v.nested_offset, sizeof(float)) == 0);
      const cpu::Nf4Sizes sizes = cpu::nf4_sizes(out * in);
      CHECK(same(u.packed, v.packed, sizes.packed_bytes, 1));
      CHECK(same(u.absmax_codes, v.absmax_codes, sizes.blocks, 1));
      CHECK(same(u.nested_absmax, v.nested_absmax, sizes.nested_blocks, sizeof(float)));
    }
  }
}


}  // namespace ssmtune::test
