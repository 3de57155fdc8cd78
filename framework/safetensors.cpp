#include "framework/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "framework/atomic_file.h"
#include "framework/error.h"
#include "framework/untrusted_json.h"

namespace ssmtune {
namespace {

constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // the limit the reference implementation enforces

// Product of the dimensions, or nothing when it does not fit in int64.
std::optional<int64_t> checked_numel(std::span<const int64_t> shape) {
  int64_t numel = 1;
  for (int64_t dim : shape)
    if (__builtin_mul_overflow(numel, dim, &numel)) return std::nullopt;
  return numel;
}

// Unmaps on destruction; the file descriptor is closed right after mapping.
struct Mapping {
  const std::byte* base = nullptr;
  size_t size = 0;
  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (base) ::munmap(const_cast<std::byte*>(base), size);
  }
};

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t numel = 1;
  for (int64_t dim : shape) numel *= dim;
  return numel;
}

struct SafetensorsFile::Impl {
  std::filesystem::path path;
  Mapping mapping;
  const std::byte* data = nullptr;  // start of the data section
  uint64_t data_size = 0;
  std::map<std::string, TensorInfo, std::less<>> tensors;
  std::map<std::string, std::string> metadata;

  [[noreturn]] void bad(std::string_view problem) const { fail("{}: {}", path.string(), problem); }
  void map_file();
  void parse_header(std::string_view header);
  TensorInfo parse_tensor(const std::string& name, const nlohmann::json& entry) const;
  void check_coverage() const;
};

void SafetensorsFile::Impl::map_file() {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("{}: cannot open: {}", path.string(), std::strerror(errno));
  struct stat status;
  if (::fstat(fd, &status) != 0 || !S_ISREG(status.st_mode)) {
    ::close(fd);
    bad("not a regular file");
  }
  size_t size = static_cast<size_t>(status.st_size);
  if (size < 8) {
    ::close(fd);
    bad(fmt::format("file is {} bytes, shorter than the 8-byte header length", size));
  }
  void* base = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  int error_number = errno;
  ::close(fd);
  if (base == MAP_FAILED) bad(fmt::format("cannot mmap: {}", std::strerror(error_number)));
  mapping.base = static_cast<const std::byte*>(base);
  mapping.size = size;
}

TensorInfo SafetensorsFile::Impl::parse_tensor(const std::string& name, const nlohmann::json& entry) const {
  auto bad_tensor = [&](std::string_view problem) { bad(fmt::format("tensor '{}': {}", name, problem)); };
  if (!entry.is_object()) bad_tensor("entry is not a JSON object");
  for (const char* key : {"dtype", "shape", "data_offsets"})
    if (!entry.contains(key)) bad_tensor(fmt::format("missing \"{}\"", key));

  TensorInfo info;
  info.name = name;
  const nlohmann::json& dtype = entry["dtype"];
  std::optional<DType> parsed_dtype = dtype.is_string() ? dtype_from_name(dtype.get<std::string>()) : std::nullopt;
  if (!parsed_dtype) bad_tensor(fmt::format("unknown dtype {}", dtype.dump()));
  info.dtype = *parsed_dtype;

  const nlohmann::json& shape = entry["shape"];
  if (!shape.is_array()) bad_tensor(fmt::format("shape {} is not an array", shape.dump()));
  for (const nlohmann::json& dim : shape) {
    bool valid = dim.is_number_unsigned() &&
                 dim.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
    if (!valid) bad_tensor(fmt::format("shape {} has an entry that is not a non-negative integer", shape.dump()));
    info.shape.push_back(dim.get<int64_t>());
  }
  std::optional<int64_t> numel = checked_numel(info.shape);
  uint64_t expected_bytes = 0;
  if (!numel || __builtin_mul_overflow(static_cast<uint64_t>(*numel), dtype_size(info.dtype), &expected_bytes))
    bad_tensor(fmt::format("shape {} is too large", shape.dump()));

  const nlohmann::json& offsets = entry["data_offsets"];
  if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
      !offsets[1].is_number_unsigned())
    bad_tensor(fmt::format("data_offsets {} are not 2 non-negative integers", offsets.dump()));
  info.begin = offsets[0].get<uint64_t>();
  info.end = offsets[1].get<uint64_t>();
  if (info.begin > info.end)
    bad_tensor(fmt::format("data_offsets begin {} > end {}", info.begin, info.end));
  if (info.end > data_size)
    bad_tensor(fmt::format("data_offsets end {} is past the end of the data section ({} bytes)", info.end, data_size));
  if (info.end - info.begin != expected_bytes)
    bad_tensor(fmt::format("data_offsets cover {} bytes but shape {} of {} needs {} bytes", info.end - info.begin,
                           shape.dump(), dtype_name(info.dtype), expected_bytes));
  return info;
}

// The tensors must tile the data section exactly: sorted by position, each starts where the last ended.
void SafetensorsFile::Impl::check_coverage() const {
  std::vector<const TensorInfo*> by_position;
  for (const auto& [name, info] : tensors) by_position.push_back(&info);
  std::sort(by_position.begin(), by_position.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t covered_to = 0;
  const TensorInfo* previous = nullptr;
  for (const TensorInfo* info : by_position) {
    if (info->begin < covered_to)
      bad(fmt::format("tensors '{}' and '{}' overlap (bytes {}..{} and {}..{})", previous->name, info->name,
                      previous->begin, previous->end, info->begin, info->end));
    if (info->begin > covered_to)
      bad(fmt::format("hole in the data section: bytes {}..{} before tensor '{}' belong to no tensor", covered_to,
                      info->begin, info->name));
    covered_to = info->end;
    previous = info;
  }
  if (covered_to != data_size)
    bad(fmt::format("hole in the data section: bytes {}..{} at its end belong to no tensor", covered_to, data_size));
}

void SafetensorsFile::Impl::parse_header(std::string_view header) {
  if (header.empty() || header.front() != '{') bad("header does not start with '{'");
  nlohmann::json json;
  try {
    json = parse_untrusted_json(path.string() + ": header", header.begin(), header.end());
  } catch (const nlohmann::json::parse_error& e) {
    bad(fmt::format("header is not valid UTF-8 JSON: {}", e.what()));
  }
  if (!json.is_object()) bad("header is not a JSON object");
  for (const auto& [name, entry] : json.items()) {
    if (name == "__metadata__") {
      if (!entry.is_object()) bad("__metadata__ is not a JSON object");
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string())
          bad(fmt::format("__metadata__ value of '{}' is {}, not a string", key, value.dump()));
        metadata.emplace(key, value.get<std::string>());
      }
      continue;
    }
    tensors.emplace(name, parse_tensor(name, entry));
  }
}

SafetensorsFile SafetensorsFile::open(const std::filesystem::path& path) {
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  impl->map_file();

  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | static_cast<uint8_t>(impl->mapping.base[i]);
  if (header_size > kMaxHeaderBytes)
    impl->bad(fmt::format("header length {} exceeds the limit of {} bytes", header_size, kMaxHeaderBytes));
  if (header_size > impl->mapping.size - 8)
    impl->bad(fmt::format("header length {} runs past the end of the file ({} bytes)", header_size,
                          impl->mapping.size));
  impl->data = impl->mapping.base + 8 + header_size;
  impl->data_size = impl->mapping.size - 8 - header_size;
  impl->parse_header({reinterpret_cast<const char*>(impl->mapping.base + 8), header_size});
  impl->check_coverage();
  return SafetensorsFile(std::move(impl));
}

SafetensorsFile::SafetensorsFile(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SafetensorsFile::SafetensorsFile(SafetensorsFile&&) noexcept = default;
SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&&) noexcept = default;
SafetensorsFile::~SafetensorsFile() = default;

const std::filesystem::path& SafetensorsFile::path() const { return impl_->path; }

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> names;
  for (const auto& [name, info] : impl_->tensors) names.push_back(name);
  return names;
}

bool SafetensorsFile::contains(std::string_view name) const { return impl_->tensors.contains(name); }

const TensorInfo& SafetensorsFile::info(std::string_view name) const {
  auto found = impl_->tensors.find(name);
  if (found == impl_->tensors.end()) fail("{}: no tensor '{}'", impl_->path.string(), name);
  return found->second;
}

std::span<const std::byte> SafetensorsFile::bytes(std::string_view name) const {
  const TensorInfo& tensor = info(name);
  return {impl_->data + tensor.begin, tensor.end - tensor.begin};
}

const std::map<std::string, std::string>& SafetensorsFile::metadata() const { return impl_->metadata; }

namespace {

template <typename T>
void read_floating(const SafetensorsFile& file, std::string_view name, std::span<const int64_t> expected_shape,
                   T* out) {
  const TensorInfo& tensor = file.float_info(name, expected_shape);
  std::span<const std::byte> bytes = file.bytes(name);
  size_t n = static_cast<size_t>(tensor.numel());
  // Tensors follow each other unpadded, so one may start misaligned for its type.
  if (reinterpret_cast<uintptr_t>(bytes.data()) % dtype_size(tensor.dtype) != 0) {
    std::vector<std::byte> aligned(bytes.begin(), bytes.end());
    if constexpr (std::is_same_v<T, float>) convert_to_float(tensor.dtype, aligned.data(), n, out);
    else convert_to_double(tensor.dtype, aligned.data(), n, out);
    return;
  }
  if constexpr (std::is_same_v<T, float>) convert_to_float(tensor.dtype, bytes.data(), n, out);
  else convert_to_double(tensor.dtype, bytes.data(), n, out);
}

}  // namespace

const TensorInfo& SafetensorsFile::float_info(std::string_view name, std::span<const int64_t> expected_shape) const {
  const TensorInfo& tensor = info(name);
  if (!std::equal(tensor.shape.begin(), tensor.shape.end(), expected_shape.begin(), expected_shape.end()))
    fail("{}: tensor '{}' has shape {}, expected {}", impl_->path.string(), name, tensor.shape, expected_shape);
  if (!is_floating_point(tensor.dtype))
    fail("{}: tensor '{}' has dtype {}, expected a floating-point dtype (F16, BF16, F32, F64)", impl_->path.string(),
         name, dtype_name(tensor.dtype));
  return tensor;
}

void SafetensorsFile::read_float(std::string_view name, std::span<const int64_t> expected_shape, float* out) const {
  read_floating(*this, name, expected_shape, out);
}

void SafetensorsFile::read_double(std::string_view name, std::span<const int64_t> expected_shape,
                                  double* out) const {
  read_floating(*this, name, expected_shape, out);
}

namespace {

// Element count of a tensor handed to the writer; a negative or overflowing shape is the caller's error.
size_t writer_element_count(const std::string& name, const std::vector<int64_t>& shape) {
  for (int64_t dim : shape)
    if (dim < 0) fail("safetensors writer: tensor '{}' has a negative dimension in shape {}", name, shape);
  std::optional<int64_t> numel = checked_numel(shape);
  if (!numel) fail("safetensors writer: tensor '{}' shape {} is too large", name, shape);
  return static_cast<size_t>(*numel);
}

}  // namespace

void SafetensorsWriter::add(std::string name, DType dtype, std::vector<int64_t> shape, const void* data) {
  if (name == "__metadata__") fail("safetensors writer: tensor name '__metadata__' is reserved");
  if (names_.contains(name)) fail("safetensors writer: duplicate tensor '{}'", name);
  size_t size = writer_element_count(name, shape) * dtype_size(dtype);
  const std::byte* first = static_cast<const std::byte*>(data);
  names_.insert(name);
  entries_.push_back({std::move(name), dtype, std::move(shape), std::vector<std::byte>(first, first + size)});
}

void SafetensorsWriter::add_float_as(std::string name, DType dtype, std::vector<int64_t> shape, const float* data) {
  const size_t n = writer_element_count(name, shape);
  if (dtype == DType::F32) {
    add(std::move(name), dtype, std::move(shape), data);
    return;
  }
  if (dtype != DType::F64 && dtype != DType::BF16 && dtype != DType::F16)
    fail("safetensors writer: tensor '{}': cannot store float data as {}", name, dtype_name(dtype));
  // Widening to double is exact, so convert_from_double rounds each value as a float-to-dtype cast would.
  const std::vector<double> widened(data, data + n);
  std::vector<std::byte> converted(n * dtype_size(dtype));
  convert_from_double(widened.data(), n, dtype, converted.data());
  add(std::move(name), dtype, std::move(shape), converted.data());
}

void SafetensorsWriter::set_metadata(std::string key, std::string value) { metadata_[std::move(key)] = std::move(value); }

void SafetensorsWriter::write(const std::filesystem::path& path) const {
  std::vector<PlannedTensor> planned;
  planned.reserve(entries_.size());
  for (const Entry& entry : entries_)
    planned.push_back({entry.name, entry.dtype, entry.shape, [&entry](std::span<std::byte> out) {
                         std::copy(entry.bytes.begin(), entry.bytes.end(), out.begin());
                       }});
  write_safetensors(path, planned, metadata_);
}

uint64_t PlannedTensor::byte_size() const { return writer_element_count(name, shape) * dtype_size(dtype); }

void write_safetensors(const std::filesystem::path& path, std::span<const PlannedTensor> tensors,
                       const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const PlannedTensor& tensor : tensors) {
    if (tensor.name == "__metadata__") fail("{}: tensor name '__metadata__' is reserved", path.string());
    if (header.contains(tensor.name)) fail("{}: duplicate tensor '{}'", path.string(), tensor.name);
    const uint64_t size = tensor.byte_size();
    header[tensor.name] = {{"dtype", dtype_name(tensor.dtype)},
                           {"shape", tensor.shape},
                           {"data_offsets", {offset, offset + size}}};
    offset += size;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {  // a name or metadata string that is not UTF-8
    fail("{}: cannot encode the safetensors header: {}", path.string(), e.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');

  std::byte length[8];
  for (int i = 0; i < 8; ++i) length[i] = static_cast<std::byte>((text.size() >> (8 * i)) & 0xff);
  write_file_atomically(path, [&](std::FILE* file) {
    std::fwrite(length, 1, 8, file);
    std::fwrite(text.data(), 1, text.size(), file);
    std::vector<std::byte> buffer;
    for (const PlannedTensor& tensor : tensors) {
      buffer.assign(tensor.byte_size(), std::byte{0});
      tensor.fill(buffer);
      if (!buffer.empty()) std::fwrite(buffer.data(), 1, buffer.size(), file);
    }
  });
}

}  // namespace ssmtune
