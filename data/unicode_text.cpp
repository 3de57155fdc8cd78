// NFC through utf8proc, the GPT-2 pattern through PCRE2 (UTF + UCP so \s, \p{L}, \p{N} are Unicode
// classes as in HF's Oniguruma; MATCH_INVALID_UTF so invalid bytes are skipped instead of refused;
// JIT where the library has it).
#define PCRE2_CODE_UNIT_WIDTH 8
#include "data/unicode_text.h"

#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <cstdlib>

#include "framework/error.h"

namespace ssmtune {

size_t valid_utf8_prefix(std::string_view text) {
  size_t pos = 0;
  while (pos < text.size()) {
    utf8proc_int32_t cp;
    auto n = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(text.data() + pos),
                              static_cast<utf8proc_ssize_t>(text.size() - pos), &cp);
    if (n <= 0) break;
    pos += static_cast<size_t>(n);
  }
  return pos;
}

namespace {

void append_nfc(std::string_view run, std::string& out) {
  bool ascii = true;
  for (char c : run) ascii = ascii && static_cast<unsigned char>(c) < 0x80;
  if (ascii) {  // NFC never changes ASCII; most text takes this path
    out.append(run);
    return;
  }
  utf8proc_uint8_t* mapped = nullptr;
  auto n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(run.data()),
                        static_cast<utf8proc_ssize_t>(run.size()), &mapped,
                        static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
  if (n < 0) fail("NFC normalization failed: {}", utf8proc_errmsg(n));
  out.append(reinterpret_cast<const char*>(mapped), static_cast<size_t>(n));
  std::free(mapped);
}

// byte -> code point of GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the
// others take 256, 257, ... in byte order.
const std::array<uint32_t, 256>& byte_to_code_point() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      t[b] = printable ? b : next++;
    }
    return t;
  }();
  return table;
}

}  // namespace

std::string nfc_normalize(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  while (!text.empty()) {
    size_t valid = valid_utf8_prefix(text);
    append_nfc(text.substr(0, valid), out);
    text.remove_prefix(valid);
    if (!text.empty()) {  // one invalid byte, kept as it is
      out.push_back(text.front());
      text.remove_prefix(1);
    }
  }
  return out;
}

struct Gpt2Splitter::Impl {
  pcre2_code* code = nullptr;
  ~Impl() { pcre2_code_free(code); }
};

Gpt2Splitter::Gpt2Splitter() : impl_(std::make_unique<Impl>()) {
  static constexpr char pattern[] =
      R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
  int error = 0;
  PCRE2_SIZE offset = 0;
  impl_->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern), PCRE2_ZERO_TERMINATED,
                              PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &error, &offset, nullptr);
  if (!impl_->code) {
    std::array<PCRE2_UCHAR, 256> message{};
    pcre2_get_error_message(error, message.data(), message.size());
    fail("PCRE2 cannot compile the GPT-2 split pattern at {}: {}", offset,
         reinterpret_cast<const char*>(message.data()));
  }
  pcre2_jit_compile(impl_->code, PCRE2_JIT_COMPLETE);  // without JIT support the interpreter runs
}

Gpt2Splitter::Gpt2Splitter(Gpt2Splitter&&) noexcept = default;
Gpt2Splitter& Gpt2Splitter::operator=(Gpt2Splitter&&) noexcept = default;
Gpt2Splitter::~Gpt2Splitter() = default;

void Gpt2Splitter::split(std::string_view text, std::vector<std::string_view>& pieces) const {
  std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> match(
      pcre2_match_data_create_from_pattern(impl_->code, nullptr), &pcre2_match_data_free);
  // PCRE2 checks the UTF-8 of the whole subject on every call, so matching against the rest of a long
  // text is quadratic. Each match runs on a window of the text instead (the pattern has no lookbehind,
  // so a window starting at `pos` matches as the whole text would); the result is kept only where the
  // character after the match lies whole inside the window (the (?!\S) lookahead and greedy runs look
  // at it), else the window doubles.
  constexpr size_t max_char = 4;
  size_t pos = 0;
  size_t window = 256;
  while (pos < text.size()) {
    const size_t length = std::min(window, text.size() - pos);
    const bool to_end = pos + length == text.size();
    int rc = pcre2_match(impl_->code, reinterpret_cast<PCRE2_SPTR>(text.data() + pos), length, 0, 0,
                         match.get(), nullptr);
    if (rc < 0 && rc != PCRE2_ERROR_NOMATCH) fail("PCRE2 match failed with code {}", rc);
    const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(match.get());
    if (!to_end && (rc == PCRE2_ERROR_NOMATCH || ovector[1] + max_char > length)) {
      window *= 2;
      continue;
    }
    window = 256;
    if (rc == PCRE2_ERROR_NOMATCH) {  // only invalid bytes remain
      pieces.push_back(text.substr(pos));
      break;
    }
    const size_t begin = pos + ovector[0], end = pos + ovector[1];
    if (begin > pos) pieces.push_back(text.substr(pos, begin - pos));
    pieces.push_back(text.substr(begin, end - begin));
    pos = end;  // every alternative consumes at least one character, so this advances
  }
}

std::string byte_level_char(uint8_t byte) {
  uint32_t cp = byte_to_code_point()[byte];
  std::string out;
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else {  // the alphabet stays below U+0800: two bytes
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
  return out;
}

std::optional<std::string> byte_level_to_bytes(std::string_view key) {
  static const auto code_point_to_byte = [] {
    std::array<int, 512> t;
    t.fill(-1);
    for (int b = 0; b < 256; ++b) t[byte_to_code_point()[b]] = b;
    return t;
  }();
  std::string out;
  size_t pos = 0;
  while (pos < key.size()) {
    utf8proc_int32_t cp;
    auto n = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(key.data() + pos),
                              static_cast<utf8proc_ssize_t>(key.size() - pos), &cp);
    if (n <= 0 || cp < 0 || cp >= 512 || code_point_to_byte[cp] < 0) return std::nullopt;
    out.push_back(static_cast<char>(code_point_to_byte[cp]));
    pos += static_cast<size_t>(n);
  }
  return out;
}

}  // namespace ssmtune
