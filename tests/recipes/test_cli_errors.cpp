// Bad input to the ssmtune command: each case gives one line "ssmtune: error: ..." naming the file,
// key or tensor, and a non-zero exit — never a crash or a silently wrong run.
#include <hdf5.h>
#include <sys/wait.h>

#include <cstdio>
#include <fstream>

#include "data/demo_dataset.h"
#include "framework/mamba_model.h"
#include "framework/model_sizes.h"
#include "framework/safetensors.h"
#include "tests/catch.h"
#include "tests/framework/model_rewrite.h"
#include "tests/framework/scratch_dir.h"

using namespace ssmtune;
namespace fs = std::filesystem;

namespace {

struct Result {
  int exit_code;
  std::string output;
};

Result run(const std::string& args) {
  const std::string command = std::string(SSMTUNE_BINARY_DIR) + "/recipes/ssmtune " + args + " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  REQUIRE(pipe);
  std::string output;
  char buffer[4096];
  while (size_t n = fread(buffer, 1, sizeof buffer, pipe)) output.append(buffer, n);
  const int status = pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), output};
}

// A valid model, data set and recipe that each case then spoils in one way.
struct Setup {
  test::ScratchDir dir{"cli"};
  Setup() {
    write_random_mamba(dir / "model", model_size("demo"), 0);
    write_token_dataset((dir / "data.h5").string(), make_demo_dataset(0, 50));
    write_recipe("");
  }
  void write_recipe(const std::string& extra) const {
    std::ofstream(dir / "recipe.yaml") << "model:\n  path: " << (dir / "model").string() << "\ndata:\n  path: "
                                       << (dir / "data.h5").string() << "\n  seq_len: 16\ntrain:\n  output_dir: "
                                       << (dir / "out").string() << "\n  max_steps: 1\n  batch_size: 1\n"
                                       << extra;
  }
  Result train(const std::string& overrides = "") const {
    return run("train --config " + (dir / "recipe.yaml").string() + " " + overrides);
  }
  // Rewrites model.safetensors through `edit`, which may drop or replace tensors.
  template <typename Edit>
  void rewrite_weights(Edit edit) const {
    const SafetensorsFile file = SafetensorsFile::open(dir / "model/model.safetensors");
    SafetensorsWriter writer;
    for (const std::string& name : file.names())
      if (!edit(name, file.info(name), writer))
        writer.add(name, file.info(name).dtype, file.info(name).shape, file.bytes(name).data());
    fs::path tmp = dir / "rewritten.safetensors";
    writer.write(tmp);
    fs::rename(tmp, dir / "model/model.safetensors");
  }
};

// Exactly one error line, the last line of the output, containing every fragment.
void require_one_error(const Result& r, std::initializer_list<std::string> fragments) {
  INFO(r.output);
  CHECK(r.exit_code != 0);
  CHECK(r.exit_code < 128);  // not killed by a signal
  size_t errors = 0;
  for (size_t at = r.output.find("ssmtune: error: "); at != std::string::npos;
       at = r.output.find("ssmtune: error: ", at + 1))
    ++errors;
  CHECK(errors == 1);
  const size_t last_line = r.output.rfind('\n', r.output.size() - 2);
  const std::string error_line = r.output.substr(last_line == std::string::npos ? 0 : last_line + 1);
  CHECK(error_line.rfind("ssmtune: error: ", 0) == 0);
  for (const std::string& f : fragments) CHECK(error_line.find(f) != std::string::npos);
}

}  // namespace

TEST_CASE("a valid setup trains (the cases below each spoil one thing)") {
  Setup s;
  const Result r = s.train();
  INFO(r.output);
  CHECK(r.exit_code == 0);
}

TEST_CASE("config.json missing or malformed") {
  Setup s;
  fs::remove(s.dir / "model/config.json");
  require_one_error(s.train(), {"config.json"});
  std::ofstream(s.dir / "model/config.json") << "{\"hidden_size\": 64,";
  require_one_error(s.train(), {"config.json"});
  std::ofstream(s.dir / "model/config.json") << "{\"hidden_size\": \"wide\", \"num_hidden_layers\": 2, \"vocab_size\": 64}";
  require_one_error(s.train(), {"config.json", "hidden_size"});
}

TEST_CASE("safetensors truncated, or its header length past the end of the file") {
  Setup s;
  const fs::path weights = s.dir / "model/model.safetensors";
  fs::resize_file(weights, fs::file_size(weights) - 100);
  require_one_error(s.train(), {"model.safetensors"});
  {
    std::fstream f(weights, std::ios::in | std::ios::out | std::ios::binary);
    const uint64_t huge = 1u << 30;
    f.write(reinterpret_cast<const char*>(&huge), 8);
  }
  require_one_error(s.train(), {"model.safetensors"});
}

TEST_CASE("a tensor missing, of the wrong dtype or of the wrong shape") {
  Setup s;
  s.rewrite_weights([](const std::string& name, const TensorInfo&, SafetensorsWriter&) {
    return name == "backbone.layers.1.mixer.x_proj.weight";
  });
  require_one_error(s.train(), {"model.safetensors", "backbone.layers.1.mixer.x_proj.weight"});

  Setup t;
  t.rewrite_weights([](const std::string& name, const TensorInfo& info, SafetensorsWriter& w) {
    if (name != "backbone.layers.0.mixer.A_log") return false;
    std::vector<int32_t> ints(static_cast<size_t>(info.numel()), 1);
    w.add(name, DType::I32, info.shape, ints.data());
    return true;
  });
  require_one_error(t.train(), {"model.safetensors", "backbone.layers.0.mixer.A_log", "I32"});

  Setup u;
  u.rewrite_weights([](const std::string& name, const TensorInfo&, SafetensorsWriter& w) {
    if (name != "backbone.norm_f.weight") return false;
    std::vector<float> v(65, 1.0f);
    w.add(name, DType::F32, {65}, v.data());
    return true;
  });
  require_one_error(u.train(), {"model.safetensors", "backbone.norm_f.weight", "65"});
}

TEST_CASE("YAML syntax errors and unknown keys") {
  Setup s;
  s.write_recipe("lora:\n  rank: [4\n");
  require_one_error(s.train(), {"recipe.yaml", "line"});
  s.write_recipe("lora:\n  rnak: 4\n");
  require_one_error(s.train(), {"recipe.yaml", "unknown key 'lora.rnak'"});
  s.write_recipe("");
  require_one_error(s.train("train.max_stepz=3"), {"unknown key 'train.max_stepz'"});
}

TEST_CASE("an HDF5 file without /tokens") {
  Setup s;
  const fs::path bad = s.dir / "data.h5";
  fs::remove(bad);
  const hid_t file = H5Fcreate(bad.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  REQUIRE(file >= 0);
  H5Fclose(file);
  require_one_error(s.train(), {"data.h5", "/tokens"});
}

TEST_CASE("token ids at or above the vocab size") {
  Setup s;
  // The data set's own vocab_size larger than the model's.
  TokenDatasetContents big = make_demo_dataset(0, 50);
  big.vocab_size = 1000;
  write_token_dataset((s.dir / "data.h5").string(), big);
  require_one_error(s.train(), {"data.h5", "vocab_size"});
  // Ids at or above the file's declared vocab_size.
  write_token_dataset((s.dir / "data.h5").string(), make_demo_dataset(0, 50));
  const hid_t file = H5Fopen((s.dir / "data.h5").c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  const hid_t attribute = H5Aopen(file, "vocab_size", H5P_DEFAULT);
  const uint32_t small = 3;
  H5Awrite(attribute, H5T_NATIVE_UINT32, &small);
  H5Aclose(attribute);
  H5Fclose(file);
  require_one_error(s.train(), {"data.h5", "token id", "vocab_size 3"});
}

namespace {

std::string path_of(const test::ScratchDir& dir, const std::string& name) { return (dir / name).string(); }

}  // namespace

TEST_CASE("quantize, train on the NF4 model and export it merged, from the command line") {
  Setup s;
  Result r = run("quantize --model " + path_of(s.dir, "model") + " --out " + path_of(s.dir, "nf4"));
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  s.write_recipe("");
  r = s.train("model.path=" + path_of(s.dir, "nf4"));
  REQUIRE(r.exit_code == 0);
  r = run("export --checkpoint " + path_of(s.dir, "out/checkpoints/step_1") + " --format merged --dtype f16 " +
          "--max-shard-size 8KiB --out " + path_of(s.dir, "merged"));
  REQUIRE(r.exit_code == 0);
  CHECK(fs::exists(s.dir / "merged/model.safetensors.index.json"));
  CHECK(s.train("model.path=" + path_of(s.dir, "merged") + " train.output_dir=" + path_of(s.dir, "out2")).exit_code ==
        0);
}

TEST_CASE("a sharded model with a shard missing") {
  Setup s;
  test::rewrite_model(s.dir / "model", s.dir / "sharded", test::keep, 10'000);
  const std::string shard = ShardedSafetensors::open_dir(s.dir / "sharded").file_of("backbone.norm_f.weight").path()
                                .filename()
                                .string();
  fs::remove(s.dir / "sharded" / shard);
  require_one_error(s.train("model.path=" + path_of(s.dir, "sharded")),
                    {"model.safetensors.index.json", "shard '" + shard + "'", "does not exist"});
}

TEST_CASE("quantize: an unsupported model_type, a projection of the wrong shape, an output in use") {
  Setup s;
  std::ofstream(s.dir / "model/config.json")
      << R"({"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 64})";
  require_one_error(run("quantize --model " + path_of(s.dir, "model") + " --out " + path_of(s.dir, "nf4")),
                    {"config.json", "model_type 'mamba2'"});
  CHECK(!fs::exists(s.dir / "nf4"));

  Setup t;
  t.rewrite_weights([](const std::string& name, const TensorInfo&, SafetensorsWriter& w) {
    if (name != "backbone.layers.0.mixer.dt_proj.weight") return false;
    std::vector<float> v(128 * 5, 0.25f);
    w.add(name, DType::F32, {128, 5}, v.data());
    return true;
  });
  require_one_error(run("quantize --model " + path_of(t.dir, "model") + " --out " + path_of(t.dir, "nf4")),
                    {"model.safetensors", "backbone.layers.0.mixer.dt_proj.weight", "[128, 5]", "[128, 4]"});

  Setup u;
  fs::create_directories(u.dir / "taken");
  std::ofstream(u.dir / "taken/README") << "mine";
  require_one_error(run("quantize --model " + path_of(u.dir, "model") + " --out " + path_of(u.dir, "taken")),
                    {"taken", "not an empty directory"});
}

TEST_CASE("a pre-quantized model whose quantization_config we do not support") {
  Setup s;
  REQUIRE(run("quantize --model " + path_of(s.dir, "model") + " --out " + path_of(s.dir, "nf4")).exit_code == 0);
  std::string config = read_text_file(s.dir / "nf4/config.json");
  const std::string nf4 = R"("bnb_4bit_quant_type": "nf4")";
  config.replace(config.find(nf4), nf4.size(), R"("bnb_4bit_quant_type": "fp4")");
  std::ofstream(s.dir / "nf4/config.json") << config;
  require_one_error(s.train("model.path=" + path_of(s.dir, "nf4")),
                    {"config.json", "quantization_config.bnb_4bit_quant_type", "only nf4"});
}

TEST_CASE("export: the base model gone, options of the other format, a malformed shard size") {
  Setup s;
  REQUIRE(s.train().exit_code == 0);
  const std::string checkpoint = " --checkpoint " + path_of(s.dir, "out/checkpoints/step_1");
  fs::rename(s.dir / "model", s.dir / "moved");
  require_one_error(run("export" + checkpoint + " --format merged --out " + path_of(s.dir, "merged")),
                    {"no base model", "model.path", "recipe.yaml", "--model"});
  require_one_error(run("export" + checkpoint + " --format peft --dtype f32 --out " + path_of(s.dir, "peft")),
                    {"--dtype only applies to --format merged"});
  require_one_error(run("export" + checkpoint + " --format merged --max-shard-size 5gb --model " +
                        path_of(s.dir, "moved") + " --out " + path_of(s.dir, "merged")),
                    {"--max-shard-size '5gb'", "KB, MB, GB"});
  CHECK(!fs::exists(s.dir / "merged"));
}
