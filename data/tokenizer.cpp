// Loading follows HF's tokenizer.json layout; encoding follows HF's order: split on added tokens not
// marked `normalized` (raw text), normalize the rest, split on `normalized` added tokens, pre-tokenize
// with the GPT-2 pattern, then merge each piece's bytes by BPE rank.
#include "data/tokenizer.h"

#include <algorithm>
#include <array>
#include <bitset>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "data/bpe_merges.h"
#include "data/unicode_text.h"
#include "framework/error.h"
#include "framework/untrusted_json.h"

namespace ssmtune {

using nlohmann::json;

namespace {

// Added tokens of one kind, matched leftmost-longest as HF's Aho-Corasick does. Grouped by length so
// that loading n tokens takes O(n) and each text position costs one lookup per distinct length.
class AddedTokenMatcher {
 public:
  // A content added twice keeps its first id.
  void add(std::string content, uint32_t id) {
    first_bytes_.set(static_cast<uint8_t>(content.front()));
    by_length_[content.size()].emplace(std::move(content), id);
  }

  // Calls on_text for each stretch between matches (never empty) and on_token for each match.
  void split(std::string_view text, const std::function<void(std::string_view)>& on_text,
             const std::function<void(uint32_t)>& on_token) const {
    size_t start = 0;
    for (size_t pos = 0; pos < text.size() && !by_length_.empty(); ++pos) {
      if (!first_bytes_.test(static_cast<uint8_t>(text[pos]))) continue;
      for (const auto& [length, tokens] : by_length_) {
        if (length > text.size() - pos) continue;
        auto found = tokens.find(std::string(text.substr(pos, length)));
        if (found == tokens.end()) continue;
        if (pos > start) on_text(text.substr(start, pos - start));
        on_token(found->second);
        start = pos + length;
        pos = start - 1;
        break;
      }
    }
    if (start < text.size()) on_text(text.substr(start));
  }

 private:
  std::map<size_t, std::unordered_map<std::string, uint32_t>, std::greater<>> by_length_;  // longest first
  std::bitset<256> first_bytes_;
};

// Reads one tokenizer.json, every error naming the file and the key.
class JsonReader {
 public:
  explicit JsonReader(std::string path) : path_(std::move(path)) {}

  json parse() const {
    std::ifstream in(path_, std::ios::binary);
    if (!in) fail("tokenizer file '{}': cannot open it", path_);
    try {
      return parse_untrusted_json(fmt::format("tokenizer file '{}'", path_), in);
    } catch (const json::exception& e) {
      fail("tokenizer file '{}': not valid JSON: {}", path_, e.what());
    }
  }

  const json& field(const json& object, const std::string& context, const char* key) const {
    if (!object.is_object() || !object.contains(key))
      fail("tokenizer file '{}': key '{}{}' is missing", path_, context, key);
    return object.at(key);
  }

  template <typename T>
  T value(const json& object, const std::string& context, const char* key) const {
    const json& v = field(object, context, key);
    try {
      return v.get<T>();
    } catch (const json::exception&) {
      fail("tokenizer file '{}': key '{}{}' has the wrong type ({})", path_, context, key, v.dump());
    }
  }

  // A key that must be absent, null or equal to `allowed` (the only setting supported).
  void require(const json& object, const std::string& context, const char* key, const json& allowed) const {
    if (!object.contains(key) || object.at(key).is_null() || object.at(key) == allowed) return;
    fail("tokenizer file '{}': key '{}{}' is {}; only {} is supported", path_, context, key,
         object.at(key).dump(), allowed.dump());
  }

  [[noreturn]] void unsupported(const std::string& key, const json& value, const char* expected) const {
    fail("tokenizer file '{}': key '{}' is {}; supported: {}", path_, key, value.dump(), expected);
  }

  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::string type_of(const json& component) {
  return component.is_object() && component.contains("type") && component["type"].is_string()
             ? component["type"].get<std::string>()
             : std::string();
}

}  // namespace

struct Tokenizer::Impl {
  bool nfc = false;
  bool add_prefix_space = false;
  bool use_regex = true;
  bool ignore_merges = false;
  Gpt2Splitter splitter;
  BpeMerges merges;
  std::unordered_map<std::string, uint32_t> key_to_id;    // vocab keys, byte-level spelling
  std::unordered_map<std::string, uint32_t> bytes_to_id;  // the same tokens as raw bytes
  std::unordered_map<std::string, uint32_t> added_to_id;
  std::array<uint32_t, 256> byte_id{};
  std::vector<std::optional<std::string>> id_bytes;  // decode table; nullopt = unused id
  AddedTokenMatcher raw_added, normalized_added;

  std::string normalize(std::string_view text) const { return nfc ? nfc_normalize(text) : std::string(text); }

  void encode_piece(std::string_view piece, std::vector<uint32_t>& word, std::vector<uint32_t>& out) const {
    if (ignore_merges) {
      if (auto it = bytes_to_id.find(std::string(piece)); it != bytes_to_id.end()) {
        out.push_back(it->second);
        return;
      }
    }
    word.clear();
    for (char c : piece) word.push_back(byte_id[static_cast<uint8_t>(c)]);
    merges.apply(word);
    out.insert(out.end(), word.begin(), word.end());
  }

  void encode_text(std::string_view text, std::vector<uint32_t>& out) const {
    std::string prefixed;
    if (add_prefix_space && !text.starts_with(' ')) {
      prefixed = " " + std::string(text);
      text = prefixed;
    }
    std::vector<std::string_view> pieces;
    if (use_regex) {
      splitter.split(text, pieces);
    } else {
      pieces.push_back(text);
    }
    std::vector<uint32_t> word;
    for (std::string_view piece : pieces) encode_piece(piece, word, out);
  }
};

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::load(const std::string& path) {
  JsonReader reader(path);
  const json root = reader.parse();
  auto impl = std::make_unique<Impl>();

  const json& normalizer = reader.field(root, "", "normalizer");
  if (!normalizer.is_null()) {
    if (type_of(normalizer) != "NFC") reader.unsupported("normalizer.type", normalizer.value("type", json()), "\"NFC\" or a null normalizer");
    impl->nfc = true;
  }

  const json& pre = reader.field(root, "", "pre_tokenizer");
  if (type_of(pre) != "ByteLevel") reader.unsupported("pre_tokenizer.type", pre.is_object() ? pre.value("type", json()) : pre, "\"ByteLevel\"");
  impl->add_prefix_space = reader.value<bool>(pre, "pre_tokenizer.", "add_prefix_space");
  impl->use_regex = pre.contains("use_regex") ? reader.value<bool>(pre, "pre_tokenizer.", "use_regex") : true;

  const json& decoder = reader.field(root, "", "decoder");
  if (!decoder.is_null() && type_of(decoder) != "ByteLevel")
    reader.unsupported("decoder.type", decoder.value("type", json()), "\"ByteLevel\" or a null decoder");

  const json& model = reader.field(root, "", "model");
  if (type_of(model) != "BPE") reader.unsupported("model.type", model.is_object() ? model.value("type", json()) : model, "\"BPE\"");
  reader.require(model, "model.", "dropout", json(0.0));
  reader.require(model, "model.", "continuing_subword_prefix", json(""));
  reader.require(model, "model.", "end_of_word_suffix", json(""));
  reader.require(model, "model.", "byte_fallback", json(false));
  impl->ignore_merges = model.contains("ignore_merges") && reader.value<bool>(model, "model.", "ignore_merges");

  const json& vocab = reader.field(model, "model.", "vocab");
  if (!vocab.is_object()) reader.unsupported("model.vocab", json(vocab.type_name()), "an object of token -> id");
  const json& added = reader.field(root, "", "added_tokens");
  if (!added.is_array()) reader.unsupported("added_tokens", json(added.type_name()), "an array");
  // Ids are dense: none reaches the number of tokens the file lists. Bounding them so keeps the decode
  // table as large as the file, where an id near 2^32 from a broken file would ask for ~100 GB.
  const uint64_t id_limit = vocab.size() + added.size();
  for (const auto& [key, id_json] : vocab.items()) {
    if (!id_json.is_number_unsigned() || id_json.get<uint64_t>() >= id_limit)
      fail("tokenizer file '{}': key 'model.vocab' maps {} to {}, expected an id below {} (the number of vocab "
           "and added tokens)", path, json(key).dump(), id_json.dump(), id_limit);
    auto id = id_json.get<uint32_t>();
    impl->key_to_id.emplace(key, id);
    if (impl->id_bytes.size() <= id) impl->id_bytes.resize(id + 1);
    // Keys outside the byte-level alphabet decode as their own UTF-8 bytes, as HF's decoder does.
    std::string bytes = byte_level_to_bytes(key).value_or(key);
    impl->bytes_to_id.emplace(bytes, id);
    impl->id_bytes[id] = std::move(bytes);
  }
  for (int b = 0; b < 256; ++b) {
    auto it = impl->key_to_id.find(byte_level_char(static_cast<uint8_t>(b)));
    if (it == impl->key_to_id.end())
      fail("tokenizer file '{}': key 'model.vocab' lacks the byte-level token {} for byte {}; byte-level BPE "
           "needs all 256", path, json(byte_level_char(static_cast<uint8_t>(b))).dump(), b);
    impl->byte_id[b] = it->second;
  }

  const json& merges = reader.field(model, "model.", "merges");
  if (!merges.is_array()) reader.unsupported("model.merges", json(merges.type_name()), "an array");
  for (size_t i = 0; i < merges.size(); ++i) {
    const json& m = merges[i];
    std::string left, right;
    if (m.is_string()) {  // older files: "left right"
      auto text = m.get<std::string>();
      auto space = text.find(' ');
      if (space == std::string::npos || text.find(' ', space + 1) != std::string::npos)
        fail("tokenizer file '{}': key 'model.merges[{}]' is {}, expected two tokens split by one space", path, i, m.dump());
      left = text.substr(0, space);
      right = text.substr(space + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      left = m[0].get<std::string>();
      right = m[1].get<std::string>();
    } else {
      fail("tokenizer file '{}': key 'model.merges[{}]' is {}, expected \"a b\" or [\"a\", \"b\"]", path, i, m.dump());
    }
    auto find = [&](const std::string& token) {
      auto it = impl->key_to_id.find(token);
      if (it == impl->key_to_id.end())
        fail("tokenizer file '{}': key 'model.merges[{}]' uses {}, which is not in model.vocab", path, i, json(token).dump());
      return it->second;
    };
    uint32_t a = find(left), b = find(right), merged = find(left + right);
    impl->merges.add(a, b, merged);  // a repeated pair keeps its first (lowest) rank, as in HF
  }

  for (size_t i = 0; i < added.size(); ++i) {
    const std::string context = fmt::format("added_tokens[{}].", i);
    const json& token = added[i];
    auto content = reader.value<std::string>(token, context, "content");
    const json& id_json = reader.field(token, context, "id");
    if (!id_json.is_number_unsigned() || id_json.get<uint64_t>() >= id_limit)
      fail("tokenizer file '{}': key '{}id' is {}, expected an id below {} (the number of vocab and added tokens)",
           path, context, id_json.dump(), id_limit);
    auto id = id_json.get<uint32_t>();
    for (const char* flag : {"single_word", "lstrip", "rstrip"}) reader.require(token, context, flag, json(false));
    if (content.empty()) fail("tokenizer file '{}': key '{}content' is empty", path, context);
    bool normalized = token.contains("normalized") && reader.value<bool>(token, context, "normalized");
    if (impl->id_bytes.size() <= id) impl->id_bytes.resize(id + 1);
    impl->id_bytes[id] = content;
    impl->added_to_id[content] = id;
    if (normalized) {
      impl->normalized_added.add(impl->normalize(content), id);
    } else {
      impl->raw_added.add(content, id);
    }
  }
  return Tokenizer(std::move(impl));
}

std::vector<uint32_t> Tokenizer::encode(std::string_view text) const {
  const Impl& t = *impl_;
  std::vector<uint32_t> ids;
  auto emit = [&](uint32_t id) { ids.push_back(id); };
  t.raw_added.split(
      text,
      [&](std::string_view raw) {
        std::string normalized = t.normalize(raw);
        t.normalized_added.split(normalized, [&](std::string_view piece) { t.encode_text(piece, ids); }, emit);
      },
      emit);
  return ids;
}

std::string Tokenizer::decode(std::span<const uint32_t> ids) const {
  std::string out;
  for (uint32_t id : ids) {
    if (id >= impl_->id_bytes.size() || !impl_->id_bytes[id])
      fail("decode: token id {} is not in the tokenizer's vocab (size {})", id, impl_->id_bytes.size());
    out += *impl_->id_bytes[id];
  }
  return out;
}

std::string Tokenizer::normalize(std::string_view text) const { return impl_->normalize(text); }

uint32_t Tokenizer::vocab_size() const { return static_cast<uint32_t>(impl_->id_bytes.size()); }

std::optional<uint32_t> Tokenizer::token_id(std::string_view token) const {
  if (auto it = impl_->added_to_id.find(std::string(token)); it != impl_->added_to_id.end()) return it->second;
  if (auto it = impl_->key_to_id.find(std::string(token)); it != impl_->key_to_id.end()) return it->second;
  return std::nullopt;
}

}  // namespace ssmtune
