#include "data/prepare.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <optional>
#include <vector>

#include "data/token_dataset.h"
#include "framework/error.h"
#include "kernels/common/counter_rng.h"

namespace ssmtune {
namespace {

namespace fs = std::filesystem;

// The counter-RNG stream of the train/validation split, apart from the streams that training draws.
constexpr uint64_t kValidationSplitStream = 0x76616c2d73706c74;  // "val-splt"

// Line `line` (1-based) goes to validation with probability `fraction`, decided by (seed, line) alone,
// so the split does not depend on which other lines were skipped.
bool goes_to_validation(uint64_t seed, uint64_t line, double fraction) {
  if (fraction <= 0) return false;
  const uint64_t draw = counter_random_u64(seed, kValidationSplitStream, line);
  return static_cast<double>(draw >> 11) * 0x1p-53 < fraction;  // uniform in [0, 1) with 53 bits
}

// Whether two paths name the same file, existing or not.
bool same_file(const std::string& a, const std::string& b) {
  std::error_code error;
  const fs::path ca = fs::weakly_canonical(a, error);
  if (error) return a == b;
  const fs::path cb = fs::weakly_canonical(b, error);
  return error ? a == b : ca == cb;
}

void check_options(const std::string& out, const std::string& val_out, const PrepareOptions& options) {
  if (out.empty()) fail("no output file given (--out)");
  if (!std::isfinite(options.val_fraction) || options.val_fraction < 0 || options.val_fraction >= 1)
    fail("--val-fraction is {}, expected a number in [0, 1)", options.val_fraction);
  if (options.val_fraction > 0 && val_out.empty())
    fail("--val-fraction {} needs a validation file", options.val_fraction);
  if (options.val_fraction == 0 && !val_out.empty())
    fail("a validation file ({}) needs --val-fraction above 0", val_out);
  if (!val_out.empty() && same_file(out, val_out))
    fail("the training and the validation file are both {}", out);
}

}  // namespace

std::string default_val_path(const std::string& out) {
  return fs::path(out).replace_extension(".val.h5").string();
}

PrepareSummary prepare_dataset(const Tokenizer& tokenizer, std::istream& input, const std::string& input_name,
                               const std::string& out, const std::string& val_out, const PrepareOptions& options) {
  check_options(out, val_out, options);
  const std::optional<uint32_t> eos = tokenizer.token_id(options.eos_token);
  if (!eos)
    fail("the tokenizer has no token '{}' to end documents with; name its end-of-document token with --eos-token",
         options.eos_token);

  // Text trains on every token, which a file without /loss_mask says.
  const bool with_mask = options.format != RecordFormat::text;
  TokenDatasetWriter train(out, tokenizer.vocab_size(), *eos, with_mask);
  std::optional<TokenDatasetWriter> val;
  if (options.val_fraction > 0) val.emplace(val_out, tokenizer.vocab_size(), *eos, with_mask);

  PrepareSummary summary;
  PrepareProgress progress;
  // Over-long documents are a choice of --max-tokens, not a malformed line: always skipped.
  auto skip = [&](LineProblem problem, std::string_view detail) {
    const std::string message = fmt::format("{}:{}: {}{}{}", input_name, summary.lines, describe(problem),
                                            detail.empty() ? "" : ": ", detail);
    if (!options.skip_malformed && problem != LineProblem::too_long)
      fail("{} (--on-error skip skips such lines)", message);
    ++summary.skipped[problem];
    if (options.on_skipped) options.on_skipped(message);
  };

  std::string line;
  std::vector<uint32_t> tokens;
  std::vector<uint8_t> mask;
  while (std::getline(input, line)) {
    ++summary.lines;
    if (!line.empty() && line.back() == '\r') line.pop_back();  // CRLF line ends
    const auto rendered = render_record(line, options.format, options.instruction_template);
    if (const auto* error = std::get_if<RecordError>(&rendered)) {
      skip(error->problem, error->detail);
    } else {
      const RenderedRecord& record = std::get<RenderedRecord>(rendered);
      tokens.clear();
      mask.clear();
      for (const Segment& segment : record.segments) {
        const std::vector<uint32_t> ids = tokenizer.encode(segment.text);
        tokens.insert(tokens.end(), ids.begin(), ids.end());
        mask.insert(mask.end(), ids.size(), segment.trained ? 1 : 0);
      }
      tokens.push_back(*eos);
      mask.push_back(record.eos_trained ? 1 : 0);
      if (options.max_tokens > 0 && tokens.size() > options.max_tokens) {
        skip(LineProblem::too_long, fmt::format("{} tokens", tokens.size()));
      } else {
        const bool to_val = goes_to_validation(options.seed, summary.lines, options.val_fraction);
        (to_val ? *val : train).append(tokens, with_mask ? std::span<const uint8_t>(mask) : std::span<const uint8_t>());
        SplitSummary& split = to_val ? summary.val : summary.train;
        ++split.documents;
        split.tokens += tokens.size();
        split.trained_tokens += static_cast<uint64_t>(std::count(mask.begin(), mask.end(), uint8_t{1}));
        ++progress.documents;
        progress.tokens += tokens.size();
      }
    }
    progress.lines = summary.lines;
    if (options.on_progress) options.on_progress(progress);
  }
  if (input.bad()) fail("{}: read error after line {}", input_name, summary.lines);

  uint64_t skipped = 0;
  for (const auto& [problem, count] : summary.skipped) skipped += count;
  if (summary.train.documents == 0)
    fail("{}: no documents for the training set ({} lines, {} skipped)", input_name, summary.lines, skipped);
  if (val && summary.val.documents == 0)
    fail("{}: none of the {} documents fell into the validation set; raise --val-fraction", input_name,
         summary.train.documents);
  // Both files complete before either replaces anything.
  train.close();
  if (val) val->close();
  train.finish();
  if (val) val->finish();
  return summary;
}

PrepareSummary prepare_dataset(const Tokenizer& tokenizer, const std::string& input_path, const std::string& out,
                               const std::string& val_out, const PrepareOptions& options) {
  for (const std::string& output : {out, val_out})
    if (!output.empty() && same_file(input_path, output)) fail("{}: the output would replace the input", input_path);
  if (fs::is_directory(input_path)) fail("{}: is a directory, expected a JSONL file", input_path);
  std::ifstream input(input_path, std::ios::binary);
  if (!input) fail("{}: cannot open the input file", input_path);
  return prepare_dataset(tokenizer, input, input_path, out, val_out, options);
}

}  // namespace ssmtune
