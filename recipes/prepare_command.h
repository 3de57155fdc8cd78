// `ssmtune prepare`: a JSONL file to the HDF5 token datasets that training reads (data/prepare.h does
// the work; data/README.md describes the formats). This file holds the command line: its options,
// the progress line on stderr, the skipped-line warnings and the summary. Built only with the
// tokenizer (SSMTUNE_WITH_TOKENIZER).
#pragma once
#include <cstdint>
#include <string>

namespace CLI {
class App;
}

namespace ssmtune {

struct PrepareCommandOptions {
  std::string tokenizer;      // tokenizer.json
  std::string input;          // JSONL
  std::string format;         // text, instruction or chat
  std::string out;            // the training set
  std::string val_out;        // the validation set; empty: <out stem>.val.h5 when val_fraction > 0
  std::string template_path;  // instruction prompts (YAML); empty: Alpaca's
  std::string eos_token = "<|endoftext|>";
  std::string on_error = "fail";  // or skip
  double val_fraction = 0;
  uint64_t seed = 0;
  uint64_t max_tokens = 0;  // 0: no limit
};

// Declares the subcommand's options on `command` (created by the caller as app.add_subcommand("prepare")).
void add_prepare_options(CLI::App& command, PrepareCommandOptions& options);

// Writes the dataset file(s), progress and warnings to stderr, the summary to stdout. Errors
// (ssmtune::Error) name the file and line or the option at fault; no output file is then written.
void run_prepare(const PrepareCommandOptions& options);

}  // namespace ssmtune
