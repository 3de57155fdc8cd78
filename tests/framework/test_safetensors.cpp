#include "framework/safetensors.h"

#include <cstdint>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "framework/atomic_file.h"
#include "framework/error.h"
#include "tests/catch.h"
#include "tests/framework/error_message.h"
#include "tests/framework/scratch_dir.h"

using namespace ssmtune;
using ssmtune::test::ScratchDir;

namespace {

using test::contains;
using test::error_message;

// Writes a file by hand: the declared header length (the real one unless given), the header, then
// `data_bytes` zero bytes.
void write_raw(const std::filesystem::path& path, const std::string& header, size_t data_bytes,
               std::optional<uint64_t> declared_length = std::nullopt) {
  uint64_t length = declared_length.value_or(header.size());
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((length >> (8 * i)) & 0xff);
  bytes += header;
  bytes.append(data_bytes, '\0');
  std::ofstream(path, std::ios::binary) << bytes;
}


template <typename T>
std::vector<std::byte> bytes_of(const std::vector<T>& values) {
  std::vector<std::byte> bytes(values.size() * sizeof(T));
  if (!bytes.empty()) std::memcpy(bytes.data(), values.data(), bytes.size());
  return bytes;
}

template <typename T>
bool same_bytes(std::span<const std::byte> actual, const std::vector<T>& expected) {
  std::vector<std::byte> wanted = bytes_of(expected);
  return std::equal(actual.begin(), actual.end(), wanted.begin(), wanted.end());
}

}  // namespace

TEST_CASE("safetensors round trip of several dtypes and shapes") {
  ScratchDir dir("safetensors");
  const auto path = dir / "model.safetensors";

  const std::vector<float> f32{1.5f, -2.0f, 3.25f, 0.0f, -0.5f, 7.0f};
  const std::vector<double> f64{1.0 / 3.0, -2.5, 1e-300, 4.0};
  // Exactly representable in bf16 and f16, so reading back must give them exactly.
  const std::vector<float> halfs{1.5f, -2.25f, 3.0f};
  const std::vector<int64_t> i64{-1, 0, int64_t{1} << 40};
  const std::vector<uint8_t> u8{0, 1, 2, 254, 255};
  const std::vector<uint8_t> flags{1, 0};
  const std::vector<int32_t> scalar{-7};
  const std::vector<float> after_bf16{0.25f, 8.0f};

  SafetensorsWriter writer;
  writer.add("f32", DType::F32, {2, 3}, f32.data());
  writer.add("f64", DType::F64, {4}, f64.data());
  writer.add_float_as("bf16", DType::BF16, {3}, halfs.data());  // 6 bytes: the next tensor is misaligned
  writer.add_float_as("after_bf16", DType::F32, {2}, after_bf16.data());
  writer.add_float_as("f16", DType::F16, {1, 3}, halfs.data());
  writer.add("i64", DType::I64, {3}, i64.data());
  writer.add("u8", DType::U8, {5}, u8.data());
  writer.add("bool", DType::BOOL, {2}, flags.data());
  writer.add("scalar", DType::I32, {}, scalar.data());
  writer.add("empty", DType::F32, {0, 3}, nullptr);
  writer.set_metadata("step", "10");
  writer.write(path);
  CHECK(std::distance(std::filesystem::directory_iterator(dir.path()), std::filesystem::directory_iterator()) == 1);

  SafetensorsFile file = SafetensorsFile::open(path);
  CHECK(file.path() == path);
  CHECK(file.names() == std::vector<std::string>{"after_bf16", "bf16", "bool", "empty", "f16", "f32", "f64", "i64",
                                                 "scalar", "u8"});
  CHECK(file.contains("f32"));
  CHECK(!file.contains("F32"));
  CHECK(file.metadata() == std::map<std::string, std::string>{{"format", "pt"}, {"step", "10"}});

  CHECK(file.info("f32").dtype == DType::F32);
  CHECK(file.info("f32").shape == std::vector<int64_t>{2, 3});
  CHECK(file.info("f32").begin == 0);  // insertion order: the first added tensor comes first
  CHECK(same_bytes(file.bytes("f32"), f32));
  CHECK(same_bytes(file.bytes("f64"), f64));
  CHECK(same_bytes(file.bytes("i64"), i64));
  CHECK(same_bytes(file.bytes("u8"), u8));
  CHECK(same_bytes(file.bytes("bool"), flags));
  CHECK(file.info("bool").dtype == DType::BOOL);
  CHECK(file.info("scalar").shape.empty());
  CHECK(file.info("scalar").numel() == 1);
  CHECK(same_bytes(file.bytes("scalar"), scalar));
  CHECK(file.info("empty").numel() == 0);
  CHECK(file.bytes("empty").empty());
  CHECK(file.info("bf16").dtype == DType::BF16);
  CHECK(file.info("f16").dtype == DType::F16);

  std::vector<float> out(6);
  file.read_float("f32", std::vector<int64_t>{2, 3}, out.data());
  CHECK(out == f32);
  std::vector<double> out64(4);
  file.read_double("f64", std::vector<int64_t>{4}, out64.data());
  CHECK(out64 == f64);
  std::vector<float> halfs_back(3);
  file.read_float("bf16", std::vector<int64_t>{3}, halfs_back.data());
  CHECK(halfs_back == halfs);
  file.read_float("f16", std::vector<int64_t>{1, 3}, halfs_back.data());
  CHECK(halfs_back == halfs);
  std::vector<float> misaligned(2);
  CHECK(file.info("after_bf16").begin % 4 != 0);
  file.read_float("after_bf16", std::vector<int64_t>{2}, misaligned.data());
  CHECK(misaligned == after_bf16);
  std::vector<double> f32_as_double(6);
  file.read_double("f32", std::vector<int64_t>{2, 3}, f32_as_double.data());
  CHECK(f32_as_double[2] == 3.25);
  file.read_float("empty", std::vector<int64_t>{0, 3}, nullptr);
}

TEST_CASE("add_float_as rounds to the nearest bf16, ties to even") {
  ScratchDir dir("safetensors");
  const auto path = dir / "rounded.safetensors";
  // 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to the even one, 1.
  // 1 + 3*2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: the even one is 1 + 2^-6.
  const std::vector<float> values{1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f};
  SafetensorsWriter writer;
  writer.add_float_as("w", DType::BF16, {2}, values.data());
  writer.write(path);
  std::vector<float> back(2);
  SafetensorsFile::open(path).read_float("w", std::vector<int64_t>{2}, back.data());
  CHECK(back == std::vector<float>{1.0f, 1.0f + 0x1p-6f});
}

TEST_CASE("the written header is JSON padded with spaces to a multiple of 8 bytes") {
  ScratchDir dir("safetensors");
  const auto path = dir / "padded.safetensors";
  const std::vector<float> one{1.0f};
  for (const std::string name : {"a", "ab", "abc", "abcd", "abcde", "abcdef", "abcdefg", "abcdefgh"}) {
    SafetensorsWriter writer;
    writer.add(name, DType::F32, {1}, one.data());
    writer.set_metadata("format", "custom");  // overrides the default "pt"
    writer.write(path);
    std::string raw = read_text_file(path);
    uint64_t length = 0;
    for (int i = 7; i >= 0; --i) length = (length << 8) | static_cast<uint8_t>(raw[i]);
    INFO("tensor name " << name << ", header length " << length);
    CHECK(length % 8 == 0);
    CHECK(raw.size() == 8 + length + 4);
    std::string header = raw.substr(8, length);
    size_t json_end = header.rfind('}') + 1;
    CHECK(header.find_first_not_of(' ', json_end) == std::string::npos);
    nlohmann::json parsed = nlohmann::json::parse(header);
    CHECK(parsed["__metadata__"] == nlohmann::json{{"format", "custom"}});
    CHECK(parsed[name]["data_offsets"] == nlohmann::json{0, 4});
  }
}

TEST_CASE("a file without tensors and one written by hand without padding are read") {
  ScratchDir dir("safetensors");
  SafetensorsWriter().write(dir / "none.safetensors");
  SafetensorsFile none = SafetensorsFile::open(dir / "none.safetensors");
  CHECK(none.names().empty());
  CHECK(none.metadata().at("format") == "pt");

  const auto path = dir / "by_hand.safetensors";
  write_raw(path, R"({"x":{"dtype":"U16","shape":[1],"data_offsets":[0,2]}})", 2);
  SafetensorsFile by_hand = SafetensorsFile::open(path);
  CHECK(by_hand.info("x").dtype == DType::U16);
  CHECK(by_hand.metadata().empty());
}

TEST_CASE("each malformed safetensors file is an Error naming the file and the problem") {
  ScratchDir dir("safetensors");
  struct BadFile {
    std::string header;
    size_t data_bytes;
    std::optional<uint64_t> declared_length;
    std::string phrase;
  };
  const std::string f32_1 = R"("dtype":"F32","shape":[1])";
  const std::vector<BadFile> cases{
      {"{}", 0, uint64_t{100'000'001}, "exceeds the limit of 100000000 bytes"},
      {"{}", 0, uint64_t{1000}, "runs past the end of the file"},
      {"[1, 2]", 0, std::nullopt, "header does not start with '{'"},
      {" {}", 0, std::nullopt, "header does not start with '{'"},
      {R"({"a": )", 0, std::nullopt, "header is not valid UTF-8 JSON"},
      {"{\"a\xff\":{}}", 0, std::nullopt, "header is not valid UTF-8 JSON"},
      {R"({"a":{"dtype":"F8","shape":[1],"data_offsets":[0,1]}})", 1, std::nullopt, "unknown dtype \"F8\""},
      {R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,0]}})", 0, std::nullopt, "not a non-negative integer"},
      {R"({"a":{"dtype":"F32","shape":[1.5],"data_offsets":[0,0]}})", 0, std::nullopt, "not a non-negative integer"},
      {R"({"a":{"dtype":"F32","shape":"1","data_offsets":[0,4]}})", 4, std::nullopt, "is not an array"},
      {R"({"a":{"dtype":"U8","shape":[4294967296,4294967296,4],"data_offsets":[0,0]}})", 0, std::nullopt,
       "is too large"},
      {"{\"a\":{" + f32_1 + R"(,"data_offsets":[0]}})", 4, std::nullopt, "are not 2 non-negative integers"},
      {"{\"a\":{" + f32_1 + R"(,"data_offsets":[0,"4"]}})", 4, std::nullopt, "are not 2 non-negative integers"},
      {"{\"a\":{" + f32_1 + R"(,"data_offsets":[-4,0]}})", 4, std::nullopt, "are not 2 non-negative integers"},
      {"{\"a\":{" + f32_1 + R"(,"data_offsets":[8,4]}})", 8, std::nullopt, "begin 8 > end 4"},
      {"{\"a\":{" + f32_1 + R"(,"data_offsets":[4,8]}})", 4, std::nullopt, "past the end of the data section"},
      {R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8, std::nullopt, "needs 12 bytes"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
       12, std::nullopt, "'a' and 'b' overlap"},
      {"{\"a\":{" + f32_1 + R"(,"data_offsets":[0,4]},"b":{)" + f32_1 + R"(,"data_offsets":[8,12]}})", 12,
       std::nullopt, "hole in the data section: bytes 4..8"},
      {"{\"a\":{" + f32_1 + R"(,"data_offsets":[4,8]}})", 8, std::nullopt, "hole in the data section: bytes 0..4"},
      {"{\"a\":{" + f32_1 + R"(,"data_offsets":[0,4]}})", 8, std::nullopt, "bytes 4..8 at its end belong to no tensor"},
      {R"({"a":{"shape":[1],"data_offsets":[0,4]}})", 4, std::nullopt, "missing \"dtype\""},
      {R"({"a":[1]})", 0, std::nullopt, "entry is not a JSON object"},
      {R"({"__metadata__":"pt"})", 0, std::nullopt, "__metadata__ is not a JSON object"},
      {R"({"__metadata__":{"format":1}})", 0, std::nullopt, "value of 'format' is 1, not a string"},
      // nlohmann reports this as out_of_range, not as a parse error: it used to escape as another exception.
      {R"({"a":1e999})", 0, std::nullopt, "number overflow parsing '1e999'"},
      // Printing a value nested this deep in the message used to overflow the stack.
      {R"({"a":{"dtype":)" + std::string(1'000'000, '[') + std::string(1'000'000, ']') +
           R"(,"shape":[1],"data_offsets":[0,4]}})",
       4, std::nullopt, "JSON nested deeper than 128 levels"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const BadFile& bad = cases[i];
    const auto path = dir / ("bad" + std::to_string(i) + ".safetensors");
    write_raw(path, bad.header, bad.data_bytes, bad.declared_length);
    std::string message = error_message([&] { SafetensorsFile::open(path); });
    INFO("case " << i << ": header " << bad.header << "\nmessage: " << message);
    CHECK(contains(message, path.string()));
    CHECK(contains(message, bad.phrase));
  }

  const auto short_file = dir / "short.safetensors";
  std::ofstream(short_file, std::ios::binary) << "12345";
  std::string message = error_message([&] { SafetensorsFile::open(short_file); });
  INFO(message);
  CHECK(contains(message, short_file.string()));
  CHECK(contains(message, "shorter than the 8-byte header length"));

  const auto missing = dir / "missing.safetensors";
  message = error_message([&] { SafetensorsFile::open(missing); });
  CHECK(contains(message, missing.string()));
  CHECK(contains(message, "No such file or directory"));
}

TEST_CASE("reading a tensor checks its name, shape and dtype") {
  ScratchDir dir("safetensors");
  const auto path = dir / "checks.safetensors";
  const std::vector<float> w(6, 1.0f);
  const std::vector<int64_t> ids{1, 2};
  SafetensorsWriter writer;
  writer.add("w", DType::F32, {2, 3}, w.data());
  writer.add("ids", DType::I64, {2}, ids.data());
  writer.write(path);
  SafetensorsFile file = SafetensorsFile::open(path);
  std::vector<float> out(6);

  std::string message = error_message([&] { file.read_float("w", std::vector<int64_t>{3, 2}, out.data()); });
  CHECK(contains(message, path.string()));
  CHECK(contains(message, "tensor 'w' has shape [2, 3], expected [3, 2]"));
  message = error_message([&] { file.read_float("ids", std::vector<int64_t>{2}, out.data()); });
  CHECK(contains(message, path.string()));
  CHECK(contains(message, "tensor 'ids' has dtype I64"));
  message = error_message([&] { file.info("nope"); });
  CHECK(contains(message, path.string() + ": no tensor 'nope'"));
  message = error_message([&] { file.bytes("nope"); });
  CHECK(contains(message, "no tensor 'nope'"));
}

TEST_CASE("the writer rejects duplicate names, negative shapes and non-float targets") {
  const std::vector<float> one{1.0f};
  SafetensorsWriter writer;
  writer.add("a", DType::F32, {1}, one.data());
  CHECK(contains(error_message([&] { writer.add("a", DType::F32, {1}, one.data()); }), "duplicate tensor 'a'"));
  CHECK(contains(error_message([&] { writer.add("__metadata__", DType::F32, {1}, one.data()); }), "reserved"));
  CHECK(contains(error_message([&] { writer.add("neg", DType::F32, {-1}, one.data()); }), "negative dimension"));
  CHECK(contains(error_message([&] { writer.add_float_as("i", DType::I32, {1}, one.data()); }),
                 "cannot store float data as I32"));
}
