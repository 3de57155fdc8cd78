// JSON from users' files (safetensors headers, tokenizer.json, data sets), parsed with a nesting
// limit. nlohmann's parser is iterative, but copying, comparing and dump() of a value recurse once per
// level, so a few megabytes nested a million levels deep would overflow the stack in the first error
// message that shows a value. serde_json, which the reference safetensors implementation and HF
// tokenizers use, refuses more than 128 levels; so does this.
#pragma once
#include <string_view>
#include <utility>

#include <nlohmann/json.hpp>

#include "framework/error.h"

namespace ssmtune {

constexpr int kMaxJsonDepth = 128;

// nlohmann::json::parse(input...) that refuses deeper nesting with the Error "<source>: JSON nested
// deeper than 128 levels" and a number too large for a double (1e999, which nlohmann reports as
// out_of_range rather than as a parse error) with the Error "<source>: ..."; a syntax error stays
// nlohmann's parse_error for the caller to word.
template <typename... Input>
nlohmann::json parse_untrusted_json(std::string_view source, Input&&... input) {
  try {
    return nlohmann::json::parse(std::forward<Input>(input)...,
                                 [source](int depth, nlohmann::json::parse_event_t, nlohmann::json&) {
                                   if (depth > kMaxJsonDepth)
                                     fail("{}: JSON nested deeper than {} levels", source, kMaxJsonDepth);
                                   return true;
                                 });
  } catch (const nlohmann::json::out_of_range& e) {
    fail("{}: {}", source, e.what());
  }
}

}  // namespace ssmtune
