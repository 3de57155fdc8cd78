// `ssmtune generate`: text (or token ids) from a base model and, optionally, its LoRA adapters — a PEFT
// adapter directory or an ssmtune checkpoint — by recurrent decoding (framework/generation.h) on the CPU
// or a GPU. The base model is quantized to NF4 on load as in training, so the adapters see the weights
// they were trained against.
#pragma once
#include <cstdint>
#include <string>

namespace CLI {
class App;
}

namespace ssmtune {

struct GenerateOptions {
  std::string model;       // base model directory (HF format)
  std::string adapter;     // PEFT adapter directory or checkpoints/step_N; empty: none
  std::string prompt;      // text, encoded with the tokenizer
  std::string prompt_ids;  // or token ids "1,2,3": the output is then ids too
  std::string tokenizer;   // tokenizer.json; empty: <model>/tokenizer.json
  std::string device = "auto";
  int64_t max_new_tokens = 64;
  double temperature = 1.0;
  double top_p = 1.0;
  uint64_t seed = 0;
};

// Declares the subcommand's options on `command` (created by the caller as app.add_subcommand("generate")).
void add_generate_options(CLI::App& command, GenerateOptions& options);

// Writes the continuation to stdout as it is drawn (text, or comma-separated ids for --prompt-ids) and a
// summary to stderr. Errors (ssmtune::Error) name the file, key or option at fault.
void run_generate(const GenerateOptions& options);

}  // namespace ssmtune
