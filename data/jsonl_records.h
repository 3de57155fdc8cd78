// One line of a JSONL data set rendered as the text the model sees, in segments that are trained
// (loss mask 1) or only context (0): the text, instruction and chat formats of `ssmtune prepare`
// (data/README.md has the formats, the default Alpaca prompts and the chat template). A line that
// cannot be rendered gives the problem and a detail instead, for the caller to report with its line
// number.
#pragma once
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace ssmtune {

enum class RecordFormat { text, instruction, chat };
// "text", "instruction" or "chat"; anything else is an Error listing them.
RecordFormat parse_record_format(std::string_view name);

// The instruction format's two prompts; "{instruction}" and "{input}" are replaced by the fields'
// values (once, left to right: a value that itself contains "{input}" stays as it is).
struct PromptTemplate {
  std::string prompt_input;     // used when the record has a non-empty input
  std::string prompt_no_input;  // used when it has none; must not mention {input}
  // Stanford Alpaca's prompts, which torchtune's Alpaca dataset also uses.
  static PromptTemplate alpaca();
  // A YAML file with exactly the keys prompt_input and prompt_no_input (strings); Errors name the
  // file and key.
  static PromptTemplate load(const std::string& path);
};

// Why a line gives no document. The summary of `ssmtune prepare` counts lines by these.
enum class LineProblem {
  empty_line,
  invalid_utf8,
  bad_json,           // not JSON, or nested deeper than JSON from users may be
  not_an_object,      // JSON, but not an object
  missing_field,
  wrong_type,         // a field of another JSON type than the format needs
  empty_field,        // text, instruction or output is ""
  unknown_role,       // a chat message whose role is not system, user or assistant
  no_assistant_turn,  // a chat with nothing to train on
  too_long,           // more tokens than --max-tokens (found after tokenizing, by the caller)
};
// "empty line", "invalid UTF-8", "bad JSON", ...: the words the summary and the messages use.
std::string_view describe(LineProblem problem);

struct RecordError {
  LineProblem problem;
  std::string detail;  // e.g. `field "text" is a number, expected a string`; may be empty
};

// Consecutive text of the same mask is one segment: the tokenizer sees it whole.
struct Segment {
  std::string text;
  bool trained;
};

// The document's segments in order; the caller encodes each on its own and appends the end-of-document
// token, trained when eos_trained.
struct RenderedRecord {
  std::vector<Segment> segments;
  bool eos_trained = true;
};

// Renders one line (without its line end).
std::variant<RenderedRecord, RecordError> render_record(std::string_view line, RecordFormat format,
                                                        const PromptTemplate& instruction_template);

}  // namespace ssmtune
