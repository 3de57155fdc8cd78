#include "recipes/prepare_command.h"

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <vector>

#include "data/prepare.h"
#include "data/tokenizer.h"
#include "framework/error.h"
#include "framework/progress.h"

namespace ssmtune {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// At most this many skipped lines are shown one by one; the summary counts all of them.
constexpr uint64_t kShownSkippedLines = 20;

// Progress on stderr: on a terminal one line redrawn at most ten times a second, otherwise a plain
// line every ten seconds (logs of batch jobs stay short).
class PrepareProgressDisplay {
 public:
  PrepareProgressDisplay() : live_(isatty(STDERR_FILENO) == 1), start_(Clock::now()), last_plain_(start_) {}

  void update(const PrepareProgress& p) {
    last_progress_ = p;
    if (live_) {
      if (live_line_.due()) live_line_.draw(line(p));
      return;
    }
    const Clock::time_point now = Clock::now();
    if (now - last_plain_ < std::chrono::seconds(10)) return;
    last_plain_ = now;
    fmt::print(stderr, "{}\n", line(p));
    std::fflush(stderr);
  }
  // A line of its own, after clearing the live line (the next update draws it again).
  void message(std::string_view text) { live_line_.message(text); }
  // Leaves the final figures on screen.
  void finish() {
    if (live_) live_line_.message(line(last_progress_));
  }
  void clear() { live_line_.clear(); }
  double seconds() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }
  double tokens_per_second(uint64_t tokens) const {
    return seconds() > 0 ? static_cast<double>(tokens) / seconds() : 0;
  }

 private:
  std::string line(const PrepareProgress& p) const {
    return fmt::format("prepare: line {}, {} documents, {} tokens, {:.0f} tokens/s", p.lines, p.documents, p.tokens,
                       tokens_per_second(p.tokens));
  }
  bool live_;
  LiveLine live_line_{stderr};
  Clock::time_point start_, last_plain_;
  PrepareProgress last_progress_;
};

void create_parent_directory(const std::string& path) {
  const fs::path parent = fs::path(path).parent_path();
  if (!parent.empty()) fs::create_directories(parent);
}

void print_split(const std::string& path, const SplitSummary& s) {
  fmt::print("wrote {}: {} documents, {} tokens ({} trained, {} masked out of the loss)\n", path, s.documents,
             s.tokens, s.trained_tokens, s.tokens - s.trained_tokens);
}

}  // namespace

void add_prepare_options(CLI::App& command, PrepareCommandOptions& o) {
  command.add_option("--tokenizer", o.tokenizer, "the model's tokenizer.json")->required();
  command.add_option("--input", o.input, "JSONL file, one document per line")->required();
  command.add_option("--format", o.format, "text: {text}; instruction: {instruction, input, output}; chat: {messages}")
      ->required()
      ->check(CLI::IsMember({"text", "instruction", "chat"}));
  command.add_option("--out", o.out, "training set (.h5)")->required();
  command.add_option("--val-fraction", o.val_fraction, "share of documents for the validation set, in [0, 1)");
  command.add_option("--val-out", o.val_out, "validation set (default: <out stem>.val.h5)");
  command.add_option("--seed", o.seed, "which documents go to validation");
  command.add_option("--on-error", o.on_error, "malformed lines: fail (stop at the first) or skip (count them)")
      ->check(CLI::IsMember({"fail", "skip"}));
  command.add_option("--template", o.template_path,
                     "instruction: YAML with prompt_input and prompt_no_input (default: Alpaca's)");
  command.add_option("--max-tokens", o.max_tokens, "skip documents with more tokens, EOS included (0: no limit)");
  command.add_option("--eos-token", o.eos_token, "the tokenizer's end-of-document token (default <|endoftext|>)");
}

void run_prepare(const PrepareCommandOptions& o) {
  PrepareOptions options;
  options.format = parse_record_format(o.format);
  if (!o.template_path.empty()) {
    if (options.format != RecordFormat::instruction) fail("--template applies to --format instruction only");
    options.instruction_template = PromptTemplate::load(o.template_path);
  }
  options.eos_token = o.eos_token;
  options.val_fraction = o.val_fraction;
  options.seed = o.seed;
  options.skip_malformed = o.on_error == "skip";
  options.max_tokens = o.max_tokens;
  const std::string val_out = o.val_out.empty() && o.val_fraction > 0 ? default_val_path(o.out) : o.val_out;

  const Tokenizer tokenizer = Tokenizer::load(o.tokenizer);
  PrepareProgressDisplay display;
  uint64_t skipped = 0;
  options.on_progress = [&](const PrepareProgress& p) { display.update(p); };
  options.on_skipped = [&](std::string_view message) {
    if (++skipped <= kShownSkippedLines) display.message(fmt::format("warning: skipped {}", message));
    if (skipped == kShownSkippedLines + 1)
      display.message("warning: more lines skipped; the summary counts them");
  };
  create_parent_directory(o.out);
  if (!val_out.empty()) create_parent_directory(val_out);
  PrepareSummary summary;
  try {
    summary = prepare_dataset(tokenizer, o.input, o.out, val_out, options);
  } catch (...) {
    display.clear();  // the error line follows on a clean line
    throw;
  }
  display.finish();

  print_split(o.out, summary.train);
  if (!val_out.empty()) print_split(val_out, summary.val);
  const uint64_t tokens = summary.train.tokens + summary.val.tokens;
  fmt::print("read {} lines in {:.1f} s ({:.0f} tokens/s)", summary.lines, display.seconds(),
             display.tokens_per_second(tokens));
  if (skipped > 0) {
    std::vector<std::string> reasons;
    for (const auto& [problem, count] : summary.skipped)
      reasons.push_back(fmt::format("{} {}", describe(problem), count));
    fmt::print("; skipped {}: {}", skipped, fmt::join(reasons, ", "));
  }
  fmt::print("\n");
}

}  // namespace ssmtune
