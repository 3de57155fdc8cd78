// Fuzz target: data/jsonl_records, the per-line parsing of `ssmtune prepare`. The first byte picks the
// format (text, instruction or chat), the rest is the file, rendered line by line as prepare reads it.
// Each line must render or give a RecordError; nothing may throw.
#include <cstdlib>
#include <string_view>
#include <variant>

#include "data/jsonl_records.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace ssmtune;
  if (size == 0) return 0;
  constexpr RecordFormat kFormats[] = {RecordFormat::text, RecordFormat::instruction, RecordFormat::chat};
  const RecordFormat format = kFormats[data[0] % 3];
  static const PromptTemplate prompts = PromptTemplate::alpaca();
  std::string_view rest(reinterpret_cast<const char*>(data + 1), size - 1);
  while (!rest.empty()) {
    const size_t end = std::min(rest.find('\n'), rest.size());
    const auto rendered = render_record(rest.substr(0, end), format, prompts);
    if (const auto* record = std::get_if<RenderedRecord>(&rendered))
      if (record->segments.empty()) std::abort();  // a rendered document has text
    rest.remove_prefix(std::min(end + 1, rest.size()));
  }
  return 0;
}
