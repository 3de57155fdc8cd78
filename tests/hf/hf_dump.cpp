// hf_dump <reference dir> <model dir> <out dir>: ssmtune's side of check_exports.py and nf4_reader.py
// (run_hf.sh runs them). With the reference's adapters and tokens (hf_reference.h) and the model in
// <model dir> (the reference's own, or `ssmtune quantize`'s output of it), on the CPU backend in fp64,
// writes into <out dir>:
//   ssmtune_logits.safetensors  tokens I32 [batch, length]; F64 [batch, length-1, vocab]:
//                               logits.all   with the adapters on all four projections
//                               logits.peft  with only those PEFT's adapter carries (in_proj, x_proj),
//                                            which are the ones HF + PEFT apply
//   all/, peft/, zero/          training output directories whose checkpoints/step_0 holds those
//                               adapters (zero: all four targets, every value 0, so that its merged
//                               export is the dequantized base); their recipes name <model dir>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <memory>

#include "distributed/mpi_communicator.h"
#include "framework/checkpoint.h"
#include "framework/cpu_backend.h"
#include "framework/error.h"
#include "framework/recipe_config.h"
#include "tests/hf/hf_reference.h"

using namespace ssmtune;
namespace fs = std::filesystem;

namespace {

// A recipe for the checkpoint: data.path is required but nothing is trained.
RecipeConfig recipe_for(const fs::path& model_dir, const LoraConfig& lora, const fs::path& output_dir) {
  auto quoted = [](const fs::path& p) { return nlohmann::json(fs::absolute(p).string()).dump(); };
  std::string targets;
  for (Projection p : lora.targets) targets += (targets.empty() ? "" : ", ") + std::string(projection_name(p));
  const std::string yaml = fmt::format(
      "model:\n  path: {}\ndata:\n  path: {}\nlora:\n  rank: {}\n  alpha: {}\n  dropout: {}\n  rslora: {}\n"
      "  targets: [{}]\ntrain:\n  output_dir: {}\n",
      quoted(model_dir), quoted(output_dir / "unused.h5"), lora.rank, lora.alpha, lora.dropout, lora.rslora, targets,
      quoted(output_dir));
  return parse_recipe(yaml, "hf_dump recipe", {});
}

void save(Communicator& ranks, const fs::path& model_dir, const LoraAdapters& adapters, const fs::path& output_dir) {
  save_checkpoint(ranks, output_dir, adapters, ShardIndex{}, TrainingState{},
                  recipe_for(model_dir, adapters.config(), output_dir).resolved_yaml);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s <reference dir> <model dir> <out dir>\n", argv[0]);
    return 2;
  }
  // save_checkpoint is collective: a job of one rank here.
  ProcessGroup group(&argc, &argv);
  try {
    Watchdog watchdog(group, 600);
    MpiCommunicator ranks(group, watchdog);
    const test::HfReference ref(argv[1]);
    const fs::path model_dir = argv[2], out = argv[3];
    const std::unique_ptr<Backend> backend = make_cpu_backend(DType::F64);
    const MambaWeights weights = MambaWeights::load(model_dir, *backend);
    fs::create_directories(out);
    const std::vector<int64_t> logits_shape{ref.batch(), ref.length() - 1, weights.config().vocab_size};

    SafetensorsWriter logits;
    std::vector<int32_t> tokens(ref.tokens().begin(), ref.tokens().end());
    logits.add("tokens", DType::I32, {ref.batch(), ref.length()}, tokens.data());
    for (const bool peft_only : {false, true}) {
      LoraAdapters adapters(*backend, weights.config(), ref.lora(peft_only));
      ref.load_adapters(adapters);
      TrainStep step(*backend, weights, adapters, ref.step_shape());
      logits.add(peft_only ? "logits.peft" : "logits.all", DType::F64, logits_shape,
                 step.forward_logits(ref.inputs().data()).data());
      save(ranks, model_dir, adapters, out / (peft_only ? "peft" : "all"));
    }
    LoraAdapters zero(*backend, weights.config(), ref.lora(false));
    zero.upload(zero.params(), std::vector<double>(static_cast<size_t>(zero.numel()), 0.0));
    save(ranks, model_dir, zero, out / "zero");
    logits.write(out / "ssmtune_logits.safetensors");
    std::printf("wrote %s\n", (out / "ssmtune_logits.safetensors").c_str());
    return 0;
  } catch (const Error& e) {
    std::fprintf(stderr, "hf_dump: error: %s\n", e.what());
    return 1;
  }
}
