// Sharded safetensors (model.safetensors.index.json): the writer splits as huggingface_hub does, the
// reader serves the shards as one set identical to the tensors written, and every malformed index is
// an Error naming the index and what is wrong.
#include "framework/sharded_safetensors.h"

#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "framework/atomic_file.h"
#include "framework/error.h"
#include "tests/catch.h"
#include "tests/framework/error_message.h"
#include "tests/framework/scratch_dir.h"

using namespace ssmtune;
using test::contains;
using test::error_message;
namespace fs = std::filesystem;

namespace {

// A U8 tensor of `bytes` bytes, each byte its name's first letter plus its position.
PlannedTensor tensor_of(const std::string& name, int64_t bytes) {
  return {name, DType::U8, {bytes}, [name](std::span<std::byte> to) {
            for (size_t i = 0; i < to.size(); ++i) to[i] = static_cast<std::byte>(name[0] + i);
          }};
}

std::vector<std::byte> expected_bytes(const PlannedTensor& t) {
  std::vector<std::byte> bytes(t.byte_size());
  t.fill(bytes);
  return bytes;
}

nlohmann::json read_index(const fs::path& dir) {
  return nlohmann::json::parse(read_text_file(dir / kSafetensorsIndexName));
}

// The shard each tensor went to, by shard number (1-based), from the written index.
std::map<std::string, int> shard_numbers(const fs::path& dir) {
  std::map<std::string, int> numbers;
  const nlohmann::json index = read_index(dir);
  for (const auto& [name, file] : index["weight_map"].items())
    numbers[name] = std::stoi(file.get<std::string>().substr(6, 5));
  return numbers;
}

}  // namespace

TEST_CASE("sharding follows huggingface_hub: in order, a new shard at the limit, oversized tensors alone") {
  test::ScratchDir dir("sharded");
  // huggingface_hub's documented example: limit 10, sizes [6, 6, 2, 6, 2, 2] -> [6], [6+2], [6+2+2].
  const std::vector<PlannedTensor> tensors{tensor_of("a", 6), tensor_of("b", 6), tensor_of("c", 2),
                                           tensor_of("d", 6), tensor_of("e", 2), tensor_of("f", 2)};
  const std::vector<std::string> files = write_sharded_safetensors(dir.path(), tensors, 10);
  CHECK(files == std::vector<std::string>{"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                                          "model-00003-of-00003.safetensors", kSafetensorsIndexName});
  CHECK(shard_numbers(dir.path()) == std::map<std::string, int>{{"a", 1}, {"b", 2}, {"c", 2}, {"d", 3}, {"e", 3},
                                                                 {"f", 3}});
  CHECK(read_index(dir.path())["metadata"] == nlohmann::json{{"total_size", 24}});
  CHECK(!fs::exists(dir / kSafetensorsName));

  // A tensor over the limit gets a shard of its own, placed before the shard being filled.
  test::ScratchDir big("sharded");
  write_sharded_safetensors(big.path(), std::vector<PlannedTensor>{tensor_of("a", 4), tensor_of("b", 11), tensor_of("c", 4),
                                         tensor_of("d", 4)},
                            10);
  CHECK(shard_numbers(big.path()) == std::map<std::string, int>{{"a", 2}, {"b", 1}, {"c", 2}, {"d", 3}});
}

TEST_CASE("one shard is model.safetensors without an index, and the reader prefers it") {
  test::ScratchDir dir("sharded");
  const std::vector<PlannedTensor> tensors{tensor_of("a", 3), tensor_of("b", 5)};
  CHECK(write_sharded_safetensors(dir.path(), tensors, kDefaultMaxShardBytes) ==
        std::vector<std::string>{kSafetensorsName});
  CHECK(!fs::exists(dir / kSafetensorsIndexName));
  const ShardedSafetensors set = ShardedSafetensors::open_dir(dir.path());
  CHECK(set.origin() == dir / kSafetensorsName);
  CHECK(set.names() == std::vector<std::string>{"a", "b"});
  CHECK(SafetensorsFile::open(dir / kSafetensorsName).metadata().at("format") == "pt");

  // With both present, model.safetensors is read and the index ignored, as transformers does.
  std::ofstream(dir / kSafetensorsIndexName) << "not json";
  CHECK(ShardedSafetensors::open_dir(dir.path()).names().size() == 2);
}

TEST_CASE("a sharded set reads back every tensor exactly, floats converted from each dtype") {
  test::ScratchDir dir("sharded");
  // Values exactly representable in f16 and bf16, so every dtype must give them back exactly.
  const std::vector<float> values{1.5f, -2.25f, 0.0f, 3.0f, -0.125f, 96.0f};
  std::vector<PlannedTensor> tensors;
  for (DType dtype : {DType::F32, DType::BF16, DType::F16, DType::F64}) {
    tensors.push_back({std::string(dtype_name(dtype)), dtype, {2, 3}, [dtype, &values](std::span<std::byte> to) {
                         const std::vector<double> wide(values.begin(), values.end());
                         convert_from_double(wide.data(), wide.size(), dtype, to.data());
                       }});
  }
  tensors.push_back(tensor_of("u", 7));
  write_sharded_safetensors(dir.path(), tensors, 16);  // each tensor in a shard of its own
  REQUIRE(fs::exists(dir / kSafetensorsIndexName));

  const ShardedSafetensors set = ShardedSafetensors::open_dir(dir.path());
  CHECK(set.origin() == dir / kSafetensorsIndexName);
  CHECK(set.names() == std::vector<std::string>{"BF16", "F16", "F32", "F64", "u"});
  for (DType dtype : {DType::F32, DType::BF16, DType::F16, DType::F64}) {
    INFO(dtype_name(dtype));
    const std::string name(dtype_name(dtype));
    CHECK(set.info(name).dtype == dtype);
    std::vector<float> back(6);
    set.read_float(name, std::vector<int64_t>{2, 3}, back.data());
    CHECK(back == values);
    std::vector<double> back64(6);
    set.read_double(name, std::vector<int64_t>{2, 3}, back64.data());
    CHECK(back64 == std::vector<double>(values.begin(), values.end()));
  }
  const std::span<const std::byte> u = set.bytes("u");
  const std::vector<std::byte> wanted = expected_bytes(tensor_of("u", 7));
  CHECK(std::equal(u.begin(), u.end(), wanted.begin(), wanted.end()));
  CHECK(contains(error_message([&] { set.info("v"); }), kSafetensorsIndexName));
  CHECK(contains(error_message([&] { set.info("v"); }), "no tensor 'v'"));
  // A shape mismatch is reported by the shard that holds the tensor.
  const std::string shape_error = error_message([&] {
    std::vector<float> out(6);
    set.read_float("F16", std::vector<int64_t>{3, 2}, out.data());
  });
  CHECK(contains(shape_error, set.file_of("F16").path().filename().string()));
  CHECK(contains(shape_error, "'F16' has shape [2, 3], expected [3, 2]"));
}

TEST_CASE("each malformed index is an Error naming the index and the problem") {
  test::ScratchDir dir("sharded");
  write_sharded_safetensors(dir.path(), std::vector<PlannedTensor>{tensor_of("a", 8), tensor_of("b", 8)}, 8);
  const fs::path index = dir / kSafetensorsIndexName;
  const std::string shard1 = "model-00001-of-00002.safetensors", shard2 = "model-00002-of-00002.safetensors";
  auto error_with = [&](const std::string& text) {
    std::ofstream(index) << text;
    return error_message([&] { ShardedSafetensors::open_dir(dir.path()); });
  };
  struct Case {
    std::string text;
    std::vector<std::string> phrases;
  };
  const std::vector<Case> cases{
      {R"({"weight_map": {"a": )", {"invalid JSON"}},
      {R"({"metadata": )" + std::string(200, '[') + std::string(200, ']') + "}",
       {"JSON nested deeper than 128 levels"}},
      {R"([1])", {"expected a JSON object"}},
      {R"({"metadata": {}})", {"missing key 'weight_map'"}},
      {R"({"weight_map": ["a"]})", {"'weight_map' must be a JSON object"}},
      {R"({"weight_map": {"a": 1}})", {"weight_map['a']", "must be a shard file name"}},
      {R"({"weight_map": {"a": "../model-00001-of-00002.safetensors"}})", {"not a file name inside"}},
      {R"({"weight_map": {"a": "model-00003-of-00003.safetensors"}})",
       {"shard 'model-00003-of-00003.safetensors'", "tensor 'a'", "does not exist"}},
      {R"({"weight_map": {"a": ")" + shard2 + R"("}})", {"puts tensor 'a' in '" + shard2 + "'", "no such tensor"}},
  };
  for (const Case& c : cases) {
    INFO(c.text);
    const std::string message = error_with(c.text);
    CHECK(contains(message, index.string()));
    for (const std::string& phrase : c.phrases) CHECK(contains(message, phrase));
  }

  // Restored, the index reads; then a shard listed but deleted, and one that is not a safetensors file.
  std::ofstream(index) << R"({"weight_map": {"a": ")" + shard1 + R"(", "b": ")" + shard2 + R"("}})";
  CHECK(ShardedSafetensors::open_dir(dir.path()).names() == std::vector<std::string>{"a", "b"});
  fs::remove(dir / shard2);
  const std::string missing = error_message([&] { ShardedSafetensors::open_dir(dir.path()); });
  CHECK(contains(missing, index.string()));
  CHECK(contains(missing, "shard '" + shard2 + "'"));
  CHECK(contains(missing, "does not exist"));
  std::ofstream(dir / shard2) << "short";
  CHECK(contains(error_message([&] { ShardedSafetensors::open_dir(dir.path()); }), shard2));

  test::ScratchDir empty("sharded");
  const std::string nothing = error_message([&] { ShardedSafetensors::open_dir(empty.path()); });
  CHECK(contains(nothing, kSafetensorsName));
  CHECK(contains(nothing, kSafetensorsIndexName));
}

TEST_CASE("tensors a shard holds but the index does not list are not part of the set") {
  test::ScratchDir dir("sharded");
  write_sharded_safetensors(dir.path(), std::vector<PlannedTensor>{tensor_of("a", 8), tensor_of("b", 8)}, 8);
  std::ofstream(dir / kSafetensorsIndexName) << R"({"weight_map": {"a": "model-00001-of-00002.safetensors"}})";
  CHECK(ShardedSafetensors::open_dir(dir.path()).names() == std::vector<std::string>{"a"});
}

TEST_CASE("parse_byte_size takes transformers' spellings in bytes and refuses the rest") {
  CHECK(parse_byte_size("5GB", "--max-shard-size") == 5'000'000'000);
  CHECK(parse_byte_size("200MB", "x") == 200'000'000);
  CHECK(parse_byte_size("10KB", "x") == 10'000);
  CHECK(parse_byte_size("2GiB", "x") == (uint64_t{2} << 30));
  CHECK(parse_byte_size("3MiB", "x") == (uint64_t{3} << 20));
  CHECK(parse_byte_size("1KiB", "x") == 1024);
  CHECK(parse_byte_size("123", "x") == 123);
  CHECK(parse_byte_size("123B", "x") == 123);
  for (const std::string bad : {"", "0", "-5GB", "5gb", "5 GB", "1.5GB", "GB", "5TB", "99999999999GiB"}) {
    INFO(bad);
    const std::string message = error_message([&] { parse_byte_size(bad, "--max-shard-size"); });
    CHECK(contains(message, "--max-shard-size '" + bad + "'"));
  }
}
