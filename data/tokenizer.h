// A byte-level BPE tokenizer read from a Hugging Face tokenizer.json of GPT-NeoX's kind (Mamba's):
// optional NFC normalizer, ByteLevel pre-tokenizer (GPT-2 split pattern), BPE model, added tokens.
// encode(text) gives the ids of HF's `encode(text, add_special_tokens=False)`; decode(ids) gives the
// bytes back. Any byte string can be encoded: invalid UTF-8 bytes pass through as byte tokens, so
// decode(encode(x)) == normalize(x) for every x. Unsupported files fail with an Error naming the
// file and the key.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace ssmtune {

class Tokenizer {
 public:
  static Tokenizer load(const std::string& path);
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  std::vector<uint32_t> encode(std::string_view text) const;
  // The bytes of the tokens, added tokens as their content; an id outside the vocab is an Error.
  std::string decode(std::span<const uint32_t> ids) const;
  // The file's normalizer applied to text (the identity when it has none).
  std::string normalize(std::string_view text) const;

  // One more than the largest id of the vocab and the added tokens.
  uint32_t vocab_size() const;
  // The id of an added token's content or of a vocab key (in its byte-level spelling).
  std::optional<uint32_t> token_id(std::string_view token) const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace ssmtune
