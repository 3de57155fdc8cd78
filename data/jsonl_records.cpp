#include "data/jsonl_records.h"

#include <yaml-cpp/yaml.h>

#include <nlohmann/json.hpp>

#include <iterator>
#include <optional>

#include "data/unicode_text.h"
#include "framework/error.h"
#include "framework/untrusted_json.h"

namespace ssmtune {
namespace {

using nlohmann::json;

constexpr std::string_view kInstruction = "{instruction}";
constexpr std::string_view kInput = "{input}";

// The chat template: every message is "<|role|>\n" + content + "<|end|>\n". The end marker closes
// every turn, so a model trained on the assistant's turns learns to end them; at generation time
// "<|end|>" is the stop string.
constexpr std::string_view kEndOfTurn = "<|end|>\n";

// Appends text to the last segment when it has the same mask, else starts a segment.
void add_segment(std::vector<Segment>& segments, std::string text, bool trained) {
  if (!segments.empty() && segments.back().trained == trained)
    segments.back().text += text;
  else
    segments.push_back({std::move(text), trained});
}

// One pass over the template, so that a value containing a placeholder is not expanded again.
std::string fill_prompt(std::string_view prompt, std::string_view instruction, std::string_view input) {
  std::string out;
  out.reserve(prompt.size() + instruction.size() + input.size());
  size_t pos = 0;
  while (pos < prompt.size()) {
    const std::string_view rest = prompt.substr(pos);
    if (rest.starts_with(kInstruction)) {
      out += instruction;
      pos += kInstruction.size();
    } else if (rest.starts_with(kInput)) {
      out += input;
      pos += kInput.size();
    } else {
      out += prompt[pos++];
    }
  }
  return out;
}

// Reads the string field `name` of `object` into `out`, or returns why it cannot. `where` prefixes the
// field's name in the detail ("messages[2]." in a chat). An optional field may be absent or null.
struct FieldRules {
  bool required = true;
  bool non_empty = true;
};
std::optional<RecordError> read_string(const json& object, const std::string& where, const char* name,
                                       FieldRules rules, std::string& out) {
  const auto it = object.find(name);
  if (it == object.end() || (!rules.required && it->is_null())) {
    if (rules.required) return RecordError{LineProblem::missing_field, fmt::format("no field \"{}{}\"", where, name)};
    out.clear();
    return std::nullopt;
  }
  if (!it->is_string())
    return RecordError{LineProblem::wrong_type,
                       fmt::format("field \"{}{}\" has type {}, expected string", where, name, it->type_name())};
  out = it->get<std::string>();
  if (rules.non_empty && out.empty())
    return RecordError{LineProblem::empty_field, fmt::format("field \"{}{}\" is empty", where, name)};
  return std::nullopt;
}

std::variant<RenderedRecord, RecordError> render_text(const json& record) {
  RenderedRecord rendered;
  std::string text;
  if (auto error = read_string(record, "", "text", {}, text)) return *error;
  add_segment(rendered.segments, std::move(text), true);
  return rendered;
}

std::variant<RenderedRecord, RecordError> render_instruction(const json& record, const PromptTemplate& prompts) {
  std::string instruction, input, output;
  if (auto error = read_string(record, "", "instruction", {}, instruction)) return *error;
  if (auto error = read_string(record, "", "input", {.required = false, .non_empty = false}, input)) return *error;
  if (auto error = read_string(record, "", "output", {}, output)) return *error;
  RenderedRecord rendered;
  add_segment(rendered.segments,
              fill_prompt(input.empty() ? prompts.prompt_no_input : prompts.prompt_input, instruction, input), false);
  add_segment(rendered.segments, std::move(output), true);
  return rendered;
}

std::variant<RenderedRecord, RecordError> render_chat(const json& record) {
  const auto messages = record.find("messages");
  if (messages == record.end()) return RecordError{LineProblem::missing_field, "no field \"messages\""};
  if (!messages->is_array())
    return RecordError{LineProblem::wrong_type,
                       fmt::format("field \"messages\" has type {}, expected array", messages->type_name())};
  if (messages->empty()) return RecordError{LineProblem::empty_field, "field \"messages\" is empty"};
  RenderedRecord rendered;
  bool any_assistant = false, last_assistant = false;
  for (size_t i = 0; i < messages->size(); ++i) {
    const json& message = (*messages)[i];
    const std::string where = fmt::format("messages[{}].", i);
    if (!message.is_object())
      return RecordError{LineProblem::wrong_type,
                         fmt::format("messages[{}] has type {}, expected object", i, message.type_name())};
    std::string role, content;
    if (auto error = read_string(message, where, "role", {}, role)) return *error;
    if (auto error = read_string(message, where, "content", {.required = true, .non_empty = false}, content))
      return *error;
    if (role != "system" && role != "user" && role != "assistant")
      return RecordError{LineProblem::unknown_role,
                         fmt::format("\"{}role\" is {}, expected system, user or assistant", where, json(role).dump())};
    last_assistant = role == "assistant";
    any_assistant = any_assistant || last_assistant;
    add_segment(rendered.segments, "<|" + role + "|>\n", false);
    add_segment(rendered.segments, content + std::string(kEndOfTurn), last_assistant);
  }
  if (!any_assistant) return RecordError{LineProblem::no_assistant_turn, "no message with role assistant"};
  rendered.eos_trained = last_assistant;
  return rendered;
}

// A template's value, checked for the placeholders it needs.
std::string template_prompt(const YAML::Node& root, const std::string& path, const char* key, bool with_input) {
  const YAML::Node node = root[key];
  if (!node) fail("{}: missing key {} (a string)", path, key);
  if (!node.IsScalar()) fail("{}: key {} must be a string", path, key);
  std::string prompt = node.as<std::string>();
  if (prompt.find(kInstruction) == std::string::npos)
    fail("{}: key {} does not contain {{instruction}}", path, key);
  if (with_input && prompt.find(kInput) == std::string::npos) fail("{}: key {} does not contain {{input}}", path, key);
  if (!with_input && prompt.find(kInput) != std::string::npos)
    fail("{}: key {} contains {{input}}, but is used for records without input", path, key);
  return prompt;
}

}  // namespace

RecordFormat parse_record_format(std::string_view name) {
  if (name == "text") return RecordFormat::text;
  if (name == "instruction") return RecordFormat::instruction;
  if (name == "chat") return RecordFormat::chat;
  fail("unknown data format '{}' (known: text, instruction, chat)", name);
}

PromptTemplate PromptTemplate::alpaca() {
  return {
      "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
      "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}"
      "\n\n### Response:\n",
      "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
      "### Instruction:\n{instruction}\n\n### Response:\n",
  };
}

PromptTemplate PromptTemplate::load(const std::string& path) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    fail("{}: cannot open the prompt template", path);
  } catch (const YAML::Exception& e) {
    fail("{}: not valid YAML: {}", path, e.what());
  }
  if (!root.IsMap()) fail("{}: expected a mapping with the keys prompt_input and prompt_no_input", path);
  for (const auto& entry : root) {
    if (!entry.first.IsScalar()) fail("{}: keys must be plain names (prompt_input, prompt_no_input)", path);
    const std::string key = entry.first.as<std::string>();
    if (key != "prompt_input" && key != "prompt_no_input")
      fail("{}: unknown key {} (known: prompt_input, prompt_no_input)", path, key);
  }
  return {template_prompt(root, path, "prompt_input", true), template_prompt(root, path, "prompt_no_input", false)};
}

std::string_view describe(LineProblem problem) {
  static constexpr std::string_view kNames[] = {  // in the order of the enum
      "empty line",    "invalid UTF-8",       "bad JSON",          "not a JSON object",
      "missing field", "wrongly typed field", "empty field",       "unknown role",
      "no assistant turn", "longer than --max-tokens"};
  static_assert(std::size(kNames) == static_cast<size_t>(LineProblem::too_long) + 1);
  return kNames[static_cast<size_t>(problem)];
}

std::variant<RenderedRecord, RecordError> render_record(std::string_view line, RecordFormat format,
                                                        const PromptTemplate& instruction_template) {
  if (line.find_first_not_of(" \t\r\n") == std::string_view::npos) return RecordError{LineProblem::empty_line, ""};
  const size_t valid = valid_utf8_prefix(line);
  if (valid < line.size())
    return RecordError{LineProblem::invalid_utf8, fmt::format("at byte {}", valid + 1)};
  json record;
  try {
    record = parse_untrusted_json("the line", line);
  } catch (const json::parse_error& e) {
    return RecordError{LineProblem::bad_json, e.what()};
  } catch (const Error& e) {  // nested too deep
    return RecordError{LineProblem::bad_json, e.what()};
  }
  if (!record.is_object())
    return RecordError{LineProblem::not_an_object, fmt::format("found type {}", record.type_name())};
  if (format == RecordFormat::text) return render_text(record);
  if (format == RecordFormat::instruction) return render_instruction(record, instruction_template);
  return render_chat(record);
}

}  // namespace ssmtune
