// Fuzz target: data/tokenizer on any tokenizer.json. The input is the file's text, then, after a NUL
// byte, a text to encode. Loading must give a tokenizer or throw ssmtune::Error; a loaded tokenizer
// must encode any bytes to ids that decode without error.
#include <cstdint>
#include <cstdlib>
#include <optional>

#include "data/tokenizer.h"
#include "framework/error.h"
#include "tests/fuzz/fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace ssmtune;
  const std::vector<std::string> parts = fuzz::split_at_nul(data, size, 2);
  const std::string& json = parts.front();
  const std::string text = parts.size() > 1 ? parts[1] : "Hello, world! 123 \xc3\xa9\xff";
  const std::string& path = fuzz::input_file(reinterpret_cast<const uint8_t*>(json.data()), json.size(), ".json");
  std::optional<Tokenizer> tokenizer;
  try {
    tokenizer.emplace(Tokenizer::load(path));
  } catch (const Error&) {
    return 0;
  }
  // Past loading nothing may throw: an Error from encoding or decoding is a finding too.
  const std::vector<uint32_t> ids = tokenizer->encode(text);
  for (uint32_t id : ids)
    if (id >= tokenizer->vocab_size()) std::abort();
  (void)tokenizer->decode(ids);
  (void)tokenizer->token_id(text);
  return 0;
}
