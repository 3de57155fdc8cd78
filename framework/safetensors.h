// safetensors files (REFERENCE.md §5): an 8-byte little-endian header length N, N bytes of JSON
// {name: {"dtype", "shape", "data_offsets": [begin, end)}, "__metadata__": {string: string}}, then the
// tensors' bytes, C order, little-endian, offsets relative to the start of the data section.
#pragma once
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "framework/dtype.h"

namespace ssmtune {

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte range in the data section
  int64_t numel() const;        // 1 for a 0-d tensor
};

// A validated, read-only view of one file. The file is memory-mapped rather than read: checkpoints are
// many gigabytes and the loader converts them one tensor at a time, so mapping costs no second copy
// in memory, touches only the pages read, and lets ranks on one host share the page cache. The
// mapping stays valid as long as this object (moves keep it); replacing the file through
// write_file_atomically is safe, truncating it in place while it is open is not.
class SafetensorsFile {
 public:
  // Every problem with the layout is an ssmtune::Error naming the file and what is wrong.
  static SafetensorsFile open(const std::filesystem::path& path);
  SafetensorsFile(SafetensorsFile&&) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept;
  ~SafetensorsFile();

  const std::filesystem::path& path() const;
  std::vector<std::string> names() const;  // sorted
  bool contains(std::string_view name) const;
  const TensorInfo& info(std::string_view name) const;  // Error "<file>: no tensor '<name>'"
  std::span<const std::byte> bytes(std::string_view name) const;
  const std::map<std::string, std::string>& metadata() const;

  // The tensor's info once its shape is `expected_shape` and its dtype floating point (F16, BF16, F32,
  // F64); another shape or dtype is an Error naming the file, the tensor and both sides.
  const TensorInfo& float_info(std::string_view name, std::span<const int64_t> expected_shape) const;
  // Checks as float_info and converts the tensor into out[numel].
  void read_float(std::string_view name, std::span<const int64_t> expected_shape, float* out) const;
  void read_double(std::string_view name, std::span<const int64_t> expected_shape, double* out) const;

 private:
  struct Impl;
  explicit SafetensorsFile(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// A tensor whose bytes are produced only while its file is written, so that a file of many gigabytes
// (an exported model) never has to sit in memory whole: `fill` receives a buffer of exactly the
// tensor's size and must write every byte of it.
struct PlannedTensor {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  std::function<void(std::span<std::byte>)> fill;
  uint64_t byte_size() const;  // Error for a negative or overflowing shape
};

// Writes the tensors in order, calling each fill once, one tensor in memory at a time. Atomic
// (write_file_atomically); the header is padded with spaces to a multiple of 8 bytes so the data
// section starts 8-byte aligned. Errors: a duplicate or reserved name, a negative dimension, a name or
// metadata string that is not UTF-8.
void write_safetensors(const std::filesystem::path& path, std::span<const PlannedTensor> tensors,
                       const std::map<std::string, std::string>& metadata);

// Collects tensors (copying their bytes) and writes them in insertion order.
class SafetensorsWriter {
 public:
  // Errors: a duplicate or reserved name, a negative dimension.
  void add(std::string name, DType dtype, std::vector<int64_t> shape, const void* data);
  // Rounds float data to dtype (F32, BF16, F16 or F64) as torch's .to() does.
  void add_float_as(std::string name, DType dtype, std::vector<int64_t> shape, const float* data);
  // The file always carries {"format": "pt"} unless this sets "format" to something else.
  void set_metadata(std::string key, std::string value);
  // As write_safetensors.
  void write(const std::filesystem::path& path) const;

 private:
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    std::vector<std::byte> bytes;
  };
  std::vector<Entry> entries_;
  std::set<std::string, std::less<>> names_;
  std::map<std::string, std::string> metadata_{{"format", "pt"}};
};

}  // namespace ssmtune
