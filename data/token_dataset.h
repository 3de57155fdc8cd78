// The HDF5 token dataset (format in data/README.md) and the sampler that turns it into fixed-length
// training sequences. Errors name the file and what was expected.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace ssmtune {

struct TokenDatasetInfo {
  uint64_t num_tokens = 0;
  uint64_t num_documents = 0;
  uint32_t vocab_size = 0;
  uint32_t eos_id = 0;
  bool has_loss_mask = false;
};

// Read-only view of one dataset file; reads by hyperslab, so files larger than memory work.
class TokenDataset {
 public:
  static TokenDataset open(const std::string& path);
  TokenDataset(TokenDataset&&) noexcept;
  TokenDataset& operator=(TokenDataset&&) noexcept;
  ~TokenDataset();

  const std::string& path() const;
  const TokenDatasetInfo& info() const;
  const std::vector<uint64_t>& doc_offsets() const;
  // tokens[begin, begin+count) widened to uint32; ids >= vocab_size are an error naming the position.
  void read_tokens(uint64_t begin, uint64_t count, uint32_t* out) const;
  // loss_mask[begin, begin+count); all ones when the file has no /loss_mask.
  void read_loss_mask(uint64_t begin, uint64_t count, uint8_t* out) const;

 private:
  struct Impl;
  explicit TokenDataset(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

struct TokenDatasetContents {
  std::vector<uint32_t> tokens;
  std::vector<uint64_t> doc_offsets;           // num_documents + 1 entries, first 0, last tokens.size()
  std::optional<std::vector<uint8_t>> loss_mask;  // tokens.size() entries when present
  uint32_t vocab_size = 0;
  uint32_t eos_id = 0;
};
// Writes a dataset file (uint16 tokens when vocab_size <= 65536, else uint32) through a temporary
// name and a rename, so a reader never sees half a file.
void write_token_dataset(const std::string& path, const TokenDatasetContents& contents);

// Where a sampler stands; saved in checkpoints so that a resumed run reads what it would have read.
struct SamplerPosition {
  uint64_t epoch = 0;
  uint64_t index = 0;  // sequences already taken in this epoch (by all ranks together)
};

// Cuts the token stream into sequences of seq_len+1 tokens (inputs and shifted targets; consecutive
// sequences overlap by one token) and visits them in an order shuffled from (seed, epoch). With
// several ranks, each global batch of world*batch sequences is split so rank r takes its own slice.
class SequenceSampler {
 public:
  SequenceSampler(const TokenDataset& dataset, int64_t seq_len, uint64_t seed);
  uint64_t sequences_per_epoch() const;
  // Fills tokens[seq_len+1] and target_mask[seq_len] (target_mask[t] is the loss mask of token t+1).
  void next(uint32_t* tokens, uint8_t* target_mask);
  // Skips n sequences (taken by other ranks).
  void skip(uint64_t n);
  SamplerPosition position() const;
  void restore(const SamplerPosition& position);

 private:
  const TokenDataset* dataset_;
  int64_t seq_len_;
  uint64_t seed_;
  SamplerPosition position_;
  std::vector<uint64_t> order_;
  void shuffle_epoch();
};

}  // namespace ssmtune
