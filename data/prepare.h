// JSONL to token datasets (`ssmtune prepare`): reads the input line by line, renders each line in its
// format (data/jsonl_records.h), encodes the segments with the tokenizer, appends the end-of-document
// token and streams the document into the training or the validation file (TokenDatasetWriter), so
// the corpus is never held in memory. Which file a document goes to depends only on (seed, line
// number): the same input and seed give the same files. A malformed line is an Error naming
// file:line and the problem, or, when skipping, is counted and reported through a callback. Nothing is
// written at `out` or `val_out` unless everything succeeds.
#pragma once
#include <cstdint>
#include <functional>
#include <istream>
#include <map>
#include <string>
#include <string_view>

#include "data/jsonl_records.h"
#include "data/tokenizer.h"

namespace ssmtune {

struct PrepareProgress {
  uint64_t lines = 0;      // lines read so far
  uint64_t documents = 0;  // documents written (both files)
  uint64_t tokens = 0;     // tokens written (both files)
};

struct PrepareOptions {
  RecordFormat format = RecordFormat::text;
  PromptTemplate instruction_template = PromptTemplate::alpaca();
  std::string eos_token = "<|endoftext|>";  // the tokenizer's token that ends every document
  double val_fraction = 0;                  // in [0, 1): the share of documents sent to validation
  uint64_t seed = 0;                        // chooses which documents those are
  bool skip_malformed = false;              // false: the first malformed line is an Error
  uint64_t max_tokens = 0;                  // documents with more tokens (EOS included) are skipped; 0: no limit
  std::function<void(const PrepareProgress&)> on_progress;  // after every line
  std::function<void(std::string_view)> on_skipped;         // "<file>:<line>: <problem>: <detail>"
};

struct SplitSummary {
  uint64_t documents = 0;
  uint64_t tokens = 0;
  uint64_t trained_tokens = 0;  // loss mask 1
};

struct PrepareSummary {
  uint64_t lines = 0;
  SplitSummary train, val;
  std::map<LineProblem, uint64_t> skipped;  // lines skipped, by problem
};

// Writes `out` and, when options.val_fraction > 0, `val_out`. The input is named `input_name` in
// messages. Text data gets no /loss_mask (every token is trained); the other formats get one.
PrepareSummary prepare_dataset(const Tokenizer& tokenizer, std::istream& input, const std::string& input_name,
                               const std::string& out, const std::string& val_out, const PrepareOptions& options);
// The same, reading the file at input_path.
PrepareSummary prepare_dataset(const Tokenizer& tokenizer, const std::string& input_path, const std::string& out,
                               const std::string& val_out, const PrepareOptions& options);

// The default validation file for `out`: its extension replaced by ".val.h5" (train.h5 -> train.val.h5).
std::string default_val_path(const std::string& out);

}  // namespace ssmtune
