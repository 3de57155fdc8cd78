// The Unicode steps of byte-level BPE before the merges: NFC normalization, the GPT-2 split pattern,
// and GPT-2's byte <-> character alphabet. Text is UTF-8 bytes that may be invalid: invalid bytes are
// kept as they are and become pieces of their own, so any byte string can be encoded and decoded back.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace ssmtune {

// Length of the valid UTF-8 prefix of `text` (the rules of RFC 3629, as utf8proc and PCRE2 apply).
size_t valid_utf8_prefix(std::string_view text);

// NFC of each maximal valid UTF-8 run of `text`; invalid bytes are copied unchanged between them.
std::string nfc_normalize(std::string_view text);

// Splits text into the pieces of the GPT-2 pattern
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// keeping the text between matches (invalid UTF-8 bytes, which match nothing) as pieces too, so the
// pieces concatenate back to the text (HF's Split with behaviour Isolated).
class Gpt2Splitter {
 public:
  Gpt2Splitter();
  Gpt2Splitter(Gpt2Splitter&&) noexcept;
  Gpt2Splitter& operator=(Gpt2Splitter&&) noexcept;
  ~Gpt2Splitter();
  // Appends the pieces of `text` (views into it) to `pieces`.
  void split(std::string_view text, std::vector<std::string_view>& pieces) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// GPT-2's byte-level alphabet: every byte is written as one printable character so that vocab keys
// are readable strings. `byte_level_to_bytes` inverts it for a whole key; nullopt when a character of
// `key` is not in the alphabet (or the key is not valid UTF-8).
std::string byte_level_char(uint8_t byte);
std::optional<std::string> byte_level_to_bytes(std::string_view key);

}  // namespace ssmtune
