// The HDF5 token dataset (format in data/README.md): its reader, its writers (all at once or streamed
// document by document) and the sampler that turns it into fixed-length training sequences. Errors
// name the file and what was expected.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
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

// Writes a dataset file document by document without holding it in memory: each dataset keeps one
// chunk in memory and is extended on disk whenever that chunk fills. Everything goes to <path>.tmp,
// which finish() renames to path; a writer destroyed before finish() (an error on the way) removes
// the temporary, so an existing file at path is replaced only by a complete one. Token ids and mask
// values are checked as they arrive, so the writer never produces a file the reader rejects.
class TokenDatasetWriter {
 public:
  // Without with_loss_mask the file has no /loss_mask (every token is trained) and append takes no mask.
  TokenDatasetWriter(const std::string& path, uint32_t vocab_size, uint32_t eos_id, bool with_loss_mask);
  TokenDatasetWriter(TokenDatasetWriter&&) noexcept;
  TokenDatasetWriter& operator=(TokenDatasetWriter&&) noexcept;
  ~TokenDatasetWriter();

  // Appends one document (possibly empty); loss_mask has one 0/1 entry per token when the file has
  // a mask and is empty otherwise.
  void append(std::span<const uint32_t> tokens, std::span<const uint8_t> loss_mask);
  // Writes what is buffered and the attributes and closes the temporary file: the step that can fail
  // for a full disk. Files that belong together close all, then finish all.
  void close();
  // Closes the file if that was not done yet and renames it into place.
  void finish();

  const std::string& path() const;
  uint64_t num_tokens() const;
  uint64_t num_documents() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Where a sampler stands; saved in checkpoints so that a resumed run reads what it would have read.
struct SamplerPosition {
  uint64_t epoch = 0;
  uint64_t index = 0;  // sequences already taken in this epoch (by all ranks together)
};

// Turns the dataset into training sequences of seq_len+1 tokens (inputs and shifted targets) and visits
// them in an order shuffled from (seed, epoch). With several ranks, each global batch of world*batch
// sequences is split so rank r takes its own slice. data/README.md ("Sampling") defines both modes:
// packing: the token stream cut into sequences (consecutive ones overlap by one token), documents packed
//   together; doc_start marks where each restarts, and a document's first token is never a target.
// no packing: each sequence holds (a piece of) one document, padded with masked-out eos_id targets.
class SequenceSampler {
 public:
  SequenceSampler(const TokenDataset& dataset, int64_t seq_len, uint64_t seed, bool packing = true);
  uint64_t sequences_per_epoch() const;
  // Fills tokens[seq_len+1] and target_mask[seq_len] (target_mask[t] says whether token t+1 is trained)
  // and, when not null, doc_start[seq_len]: for input position t, the position of the first token of its
  // document within the sequence (0 for a document that began before it: the sequence starts afresh).
  void next(uint32_t* tokens, uint8_t* target_mask, int32_t* doc_start = nullptr);
  // Skips n sequences (taken by other ranks).
  void skip(uint64_t n);
  SamplerPosition position() const;
  void restore(const SamplerPosition& position);

 private:
  const TokenDataset* dataset_;
  int64_t seq_len_;
  uint64_t seed_;
  bool packing_;
  std::vector<uint64_t> piece_starts_;  // without packing: the first token of each sequence
  SamplerPosition position_;
  std::vector<uint64_t> order_;
  void shuffle_epoch();
  void next_packed(uint64_t start, uint32_t* tokens, uint8_t* target_mask, int32_t* doc_start) const;
  void next_piece(uint64_t start, uint32_t* tokens, uint8_t* target_mask, int32_t* doc_start) const;
};

}  // namespace ssmtune
