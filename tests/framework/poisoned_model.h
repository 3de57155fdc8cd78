// Non-finite training steps on purpose, without any test hook in the trainer: the demo model with an
// lm_head of its own (untied) and NaN in the embedding row of one token. A sequence with that token
// among its inputs gets a NaN loss and NaN gradients; the others train normally. Which steps are bad
// follows from the data order, which poisoned_steps() replays with the trainer's sampler.
#pragma once
#include <cmath>
#include <filesystem>
#include <vector>

#include "data/token_dataset.h"
#include "framework/mamba_model.h"
#include "framework/model_sizes.h"
#include "tests/framework/model_rewrite.h"

namespace ssmtune::test {

inline constexpr uint32_t kPoisonedToken = 63;

// The demo model at `dir`; `clean` is a scratch directory for the model before the NaN goes in.
inline void write_poisoned_demo_model(const std::filesystem::path& clean, const std::filesystem::path& dir) {
  MambaConfig config = model_size("demo");
  config.tie_word_embeddings = false;
  write_random_mamba(clean, config, 0);
  rewrite_model(clean, dir, [](const std::string& name, const ShardedSafetensors& source) -> std::vector<PlannedTensor> {
    if (name != "backbone.embeddings.weight") return keep(name, source);
    const TensorInfo& info = source.info(name);
    return {{name, info.dtype, info.shape, [&source, name, info](std::span<std::byte> to) {
               std::vector<double> values(static_cast<size_t>(info.numel()));
               source.read_double(name, info.shape, values.data());
               const int64_t d_model = info.shape[1];
               for (int64_t i = 0; i < d_model; ++i) values[kPoisonedToken * d_model + i] = std::nan("");
               convert_from_double(values.data(), values.size(), info.dtype, to.data());
             }}};
  });
}

// For each of `steps` steps of `per_step` sequences (all ranks' micro-batches together) as the trainer
// samples them: whether one of them has kPoisonedToken among its inputs.
inline std::vector<bool> poisoned_steps(const std::filesystem::path& data, int64_t seq_len, uint64_t seed,
                                        int64_t per_step, int64_t steps) {
  const TokenDataset dataset = TokenDataset::open(data.string());
  SequenceSampler sampler(dataset, seq_len, seed);
  std::vector<uint32_t> tokens(static_cast<size_t>(seq_len + 1));
  std::vector<uint8_t> mask(static_cast<size_t>(seq_len));
  std::vector<bool> bad(static_cast<size_t>(steps), false);
  for (int64_t step = 0; step < steps; ++step)
    for (int64_t s = 0; s < per_step; ++s) {
      sampler.next(tokens.data(), mask.data());
      for (int64_t t = 0; t < seq_len; ++t)
        if (tokens[static_cast<size_t>(t)] == kPoisonedToken) bad[static_cast<size_t>(step)] = true;
    }
  return bad;
}

}  // namespace ssmtune::test
