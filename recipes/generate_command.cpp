#include "recipes/generate_command.h"

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <span>

#include "framework/checkpoint.h"
#include "framework/error.h"
#include "framework/generation.h"
#include "framework/mamba_model.h"
#include "framework/peft_export.h"
#include "framework/peft_import.h"
#include "framework/recipe_config.h"
#include "framework/trainer.h"
#ifdef SSMTUNE_WITH_TOKENIZER
#include "data/tokenizer.h"
#endif

namespace ssmtune {
namespace {

namespace fs = std::filesystem;

// "1,2,3" (spaces around the commas allowed).
std::vector<uint32_t> parse_token_ids(const std::string& text) {
  std::vector<uint32_t> ids;
  size_t begin = 0;
  while (begin <= text.size()) {
    const size_t end = std::min(text.find(',', begin), text.size());
    std::string item = text.substr(begin, end - begin);
    item.erase(0, item.find_first_not_of(' '));
    item.erase(item.find_last_not_of(' ') + 1);
    uint32_t id = 0;
    const auto [ptr, ec] = std::from_chars(item.data(), item.data() + item.size(), id);
    if (item.empty() || ec != std::errc() || ptr != item.data() + item.size())
      fail("--prompt-ids: '{}' is not a token id (expected comma-separated non-negative integers, e.g. 1,2,3)", item);
    ids.push_back(id);
    begin = end + 1;
  }
  return ids;
}

// The adapters of a checkpoint directory (state.json: the layout its recipe gives) or of a PEFT adapter
// directory (adapter_config.json), for the base model at hand.
std::unique_ptr<LoraAdapters> load_adapters(const fs::path& dir, Backend& backend, const MambaConfig& model) {
  if (fs::exists(dir / kStateFile)) {
    const RecipeConfig recipe = load_recipe(dir / kRecipeFile, {});
    auto adapters = std::make_unique<LoraAdapters>(backend, model, recipe.lora);
    load_checkpoint(dir, *adapters);
    return adapters;
  }
  if (fs::exists(dir / kPeftConfigFile)) {
    auto adapters = std::make_unique<LoraAdapters>(backend, model, read_peft_adapter_config(dir));
    load_peft_adapter(dir, *adapters);
    return adapters;
  }
  if (!fs::is_directory(dir)) fail("--adapter {}: no such directory", dir.string());
  fail("--adapter {}: neither a PEFT adapter (no {}) nor an ssmtune checkpoint (no {})", dir.string(), kPeftConfigFile,
       kStateFile);
}

// config.json's eos_token_id, when it has one.
std::optional<uint32_t> eos_token(const MambaConfig& config) {
  const auto found = config.extra.find("eos_token_id");
  if (found == config.extra.end() || !found->is_number_unsigned()) return std::nullopt;
  return found->get<uint32_t>();
}

// --tokenizer, or the model directory's tokenizer.json.
fs::path tokenizer_file(const GenerateOptions& o) {
  if (!o.tokenizer.empty()) return o.tokenizer;
  const fs::path beside_model = fs::path(o.model) / "tokenizer.json";
  if (!fs::exists(beside_model))
    fail(
        "--prompt needs a tokenizer: {} does not exist and --tokenizer was not given; pass --tokenizer FILE, or "
        "token ids with --prompt-ids",
        beside_model.string());
  return beside_model;
}

// Writes each token as it comes: its text (its bytes: a character split over tokens completes on the
// terminal when its last byte arrives), or its id.
class TokenPrinter {
 public:
  explicit TokenPrinter(std::function<std::string(uint32_t)> text) : text_(std::move(text)) {}
  void operator()(uint32_t token) {
    if (text_) {
      const std::string bytes = text_(token);
      std::fwrite(bytes.data(), 1, bytes.size(), stdout);
    } else {
      fmt::print("{}{}", first_ ? "" : ",", token);
    }
    first_ = false;
    std::fflush(stdout);
  }

 private:
  std::function<std::string(uint32_t)> text_;
  bool first_ = true;
};

}  // namespace

void add_generate_options(CLI::App& command, GenerateOptions& o) {
  command.add_option("--model", o.model, "base model directory (HF format)")->required();
  command.add_option("--adapter", o.adapter,
                     "LoRA adapters: a PEFT adapter directory or a checkpoint (…/checkpoints/step_N)");
  CLI::Option* prompt = command.add_option("--prompt", o.prompt, "text to continue (needs a tokenizer)");
  CLI::Option* ids =
      command.add_option("--prompt-ids", o.prompt_ids, "token ids to continue, e.g. 1,2,3 (the output is ids too)");
  prompt->excludes(ids);
  command.add_option("--tokenizer", o.tokenizer, "tokenizer.json (default: the one in the model directory)");
  command.add_option("--device", o.device, "auto, cpu or cuda (default auto)")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  command.add_option("--max-new-tokens", o.max_new_tokens, "tokens to generate at most (default 64)");
  command.add_option("--temperature", o.temperature, "softmax temperature; 0: greedy (default 1)");
  command.add_option("--top-p", o.top_p, "nucleus sampling: the most likely tokens holding this mass (default 1)");
  command.add_option("--seed", o.seed, "sampling seed (default 0)");
}

void run_generate(const GenerateOptions& o) {
  if (o.prompt.empty() && o.prompt_ids.empty())
    fail("nothing to continue: give text with --prompt or token ids with --prompt-ids");
  GenerationOptions options;
  options.max_new_tokens = o.max_new_tokens;
  options.sampling = {o.temperature, o.top_p, o.seed, 0};
  check_generation_options(options);  // before the minutes a large model may take to load
  const bool text = o.prompt_ids.empty();
  std::vector<uint32_t> prompt;
  std::function<std::string(uint32_t)> token_text;
#ifdef SSMTUNE_WITH_TOKENIZER
  std::optional<Tokenizer> tokenizer;
  if (text) {
    tokenizer.emplace(Tokenizer::load(tokenizer_file(o)));
    prompt = tokenizer->encode(o.prompt);
    options.sampling.vocab_limit = tokenizer->vocab_size();  // ids past it (a padded embedding) have no text
    token_text = [&tokenizer](uint32_t id) { return tokenizer->decode(std::span(&id, 1)); };
  }
#else
  if (text)
    fail(
        "--prompt needs the tokenizer, which this build of ssmtune lacks (it needs libpcre2-dev and "
        "libutf8proc-dev when configured); give token ids with --prompt-ids");
#endif
  if (!text) prompt = parse_token_ids(o.prompt_ids);

  const std::unique_ptr<Backend> backend = make_backend(o.device);
  const MambaWeights weights = MambaWeights::load(o.model, *backend);
  if (options.sampling.vocab_limit > weights.config().vocab_size)
    fail("{}: the tokenizer has {} ids, more than the model's vocab_size {}: it is not this model's tokenizer",
         tokenizer_file(o).string(), options.sampling.vocab_limit, weights.config().vocab_size);
  const std::unique_ptr<LoraAdapters> adapters =
      o.adapter.empty() ? nullptr : load_adapters(o.adapter, *backend, weights.config());
  Decoder decoder(*backend, weights, adapters.get());
  options.stop_token = eos_token(weights.config());

  TokenPrinter print(token_text);
  const auto start = std::chrono::steady_clock::now();
  const std::vector<uint32_t> generated = generate(decoder, prompt, options, std::ref(print));
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  fmt::print("\n");
  std::fflush(stdout);
  fmt::print(stderr, "ssmtune: {} prompt tokens, {} generated in {:.2f} s ({:.1f} tokens/s) on {}{}\n", prompt.size(),
             generated.size(), seconds, static_cast<double>(prompt.size() + generated.size()) / seconds,
             backend->name(),
             static_cast<int64_t>(generated.size()) < o.max_new_tokens ? ", stopped at eos_token_id" : "");
}

}  // namespace ssmtune
