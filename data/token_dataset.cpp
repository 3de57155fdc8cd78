#include "data/token_dataset.h"

#include <hdf5.h>

#include <algorithm>
#include <filesystem>
#include <mutex>
#include <numeric>
#include <utility>

#include "framework/error.h"
#include "kernels/common/counter_rng.h"

namespace ssmtune {
namespace {

// 64 Ki elements per chunk: 128-256 KiB of tokens, large enough for fast sequential writes and
// small enough that reading one training sequence touches one or two chunks.
constexpr hsize_t kChunkElements = 64 * 1024;
// Per open dataset: 16 MiB holds 64-128 token chunks; HDF5 asks for a prime slot count about
// 100 times the number of chunks that fit.
constexpr size_t kChunkCacheBytes = 16u << 20;
constexpr size_t kChunkCacheSlots = 12799;

// Every HDF5 failure becomes one ssmtune::Error naming the file; HDF5's own multi-line error stack
// printed to stderr would only bury that line.
void silence_hdf5_errors() {
  static std::once_flag once;
  std::call_once(once, [] { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); });
}

// Owns one HDF5 identifier and closes it with the matching H5?close.
class Hid {
 public:
  Hid() = default;
  Hid(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  Hid(Hid&& other) noexcept : id_(std::exchange(other.id_, H5I_INVALID_HID)), close_(other.close_) {}
  Hid& operator=(Hid&& other) noexcept {
    std::swap(id_, other.id_);
    std::swap(close_, other.close_);
    return *this;
  }
  Hid(const Hid&) = delete;
  Hid& operator=(const Hid&) = delete;
  ~Hid() {
    if (id_ >= 0) close_(id_);
  }
  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }
  // Gives up ownership, for a close whose result must be checked.
  hid_t release() { return std::exchange(id_, H5I_INVALID_HID); }

 private:
  hid_t id_ = H5I_INVALID_HID;
  herr_t (*close_)(hid_t) = nullptr;
};

// Returns id wrapped, or fails with "<path>: HDF5 could not <what>".
Hid checked(hid_t id, herr_t (*close)(hid_t), const std::string& path, std::string_view what) {
  if (id < 0) fail("{}: HDF5 could not {}", path, what);
  return Hid(id, close);
}

void check(herr_t status, const std::string& path, std::string_view what) {
  if (status < 0) fail("{}: HDF5 could not {}", path, what);
}

// "uint16", "int64", "float32", ... for messages about a wrong dtype.
std::string describe_type(hid_t type) {
  const size_t bits = H5Tget_size(type) * 8;
  switch (H5Tget_class(type)) {
    case H5T_INTEGER:
      return fmt::format("{}int{}", H5Tget_sign(type) == H5T_SGN_NONE ? "u" : "", bits);
    case H5T_FLOAT:
      return fmt::format("float{}", bits);
    case H5T_ENUM:
      return "an enum (h5py writes bool arrays this way)";
    default:
      return "a non-numeric type";
  }
}

bool is_unsigned_integer(hid_t type, size_t bytes) {
  return H5Tget_class(type) == H5T_INTEGER && H5Tget_sign(type) == H5T_SGN_NONE &&
         H5Tget_size(type) == bytes;
}

// Opens the 1-D dataset `name` whose element type passes `accept`; returns it and its length.
struct OpenedDataset {
  Hid dataset;
  Hid type;
  uint64_t length = 0;
};
OpenedDataset open_vector(hid_t file, const std::string& path, const char* name,
                          bool (*accept)(hid_t), std::string_view expected) {
  if (H5Lexists(file, name, H5P_DEFAULT) <= 0) fail("{}: no /{} dataset", path, name);
  Hid access = checked(H5Pcreate(H5P_DATASET_ACCESS), H5Pclose, path, "create an access list");
  check(H5Pset_chunk_cache(access.get(), kChunkCacheSlots, kChunkCacheBytes, 0.75), path,
        "set the chunk cache");
  OpenedDataset opened;
  opened.dataset = Hid(H5Dopen2(file, name, access.get()), H5Dclose);
  if (!opened.dataset.valid()) fail("{}: /{} is not a dataset", path, name);
  opened.type = checked(H5Dget_type(opened.dataset.get()), H5Tclose, path, "read a dataset type");
  if (!accept(opened.type.get()))
    fail("{}: /{} has type {}, expected {}", path, name, describe_type(opened.type.get()), expected);
  Hid space = checked(H5Dget_space(opened.dataset.get()), H5Sclose, path, "read a dataspace");
  const int rank = H5Sget_simple_extent_ndims(space.get());
  if (rank != 1) fail("{}: /{} has {} dimensions, expected 1", path, name, rank);
  hsize_t length = 0;
  check(H5Sget_simple_extent_dims(space.get(), &length, nullptr), path, "read a dataset size");
  // Storage never written reads as the fill value (zeros): without this, a file whose writer stopped
  // midway would pass for a valid one, and a few bytes could declare 2^40 entries to allocate.
  // A chunked dataset allocates a chunk when it is first written (HDF5 reports even a complete one whose
  // length is no multiple of the chunk as "partly allocated"), so count its chunks; other layouts
  // allocate their storage whole.
  Hid create = checked(H5Dget_create_plist(opened.dataset.get()), H5Pclose, path, "read a dataset's layout");
  bool none = false, complete = true;
  if (length > 0 && H5Pget_layout(create.get()) == H5D_CHUNKED) {
    hsize_t chunk = 0, chunks = 0;
    if (H5Pget_chunk(create.get(), 1, &chunk) != 1 || chunk == 0) fail("{}: /{} has an unreadable chunk layout", path, name);
    check(H5Dget_num_chunks(opened.dataset.get(), space.get(), &chunks), path, "count a dataset's chunks");
    none = chunks == 0;
    complete = chunks == (length + chunk - 1) / chunk;
  } else if (length > 0) {
    H5D_space_status_t storage = H5D_SPACE_STATUS_ERROR;
    check(H5Dget_space_status(opened.dataset.get(), &storage), path, "read a dataset's storage status");
    none = storage == H5D_SPACE_STATUS_NOT_ALLOCATED;
    complete = storage == H5D_SPACE_STATUS_ALLOCATED;
  }
  if (!complete)
    fail("{}: /{} declares {} entries but {} of them were written (an incomplete file?)", path, name, length,
         none ? "none" : "only some");
  opened.length = length;
  return opened;
}

// File access for readers. Every rank opens the file read-only; HDF5 >= 1.10.7 would also take a
// file lock, which fails on filesystems without flock (some NFS and Lustre mounts) and is useless for
// a file nobody writes, so it is switched off. With an older HDF5 set HDF5_USE_FILE_LOCKING=FALSE
// (data/README.md).
Hid read_only_access(const std::string& path) {
  Hid access = checked(H5Pcreate(H5P_FILE_ACCESS), H5Pclose, path, "create a file access list");
#if H5_VERSION_GE(1, 12, 1) || (H5_VERS_MAJOR == 1 && H5_VERS_MINOR == 10 && H5_VERS_RELEASE >= 7)
  check(H5Pset_file_locking(access.get(), false, true), path, "switch file locking off");
#endif
  return access;
}

// Reads a non-negative integer root attribute that must fit in uint32.
uint32_t read_u32_attribute(hid_t file, const std::string& path, const char* name) {
  if (H5Aexists(file, name) <= 0) fail("{}: missing root attribute {} (uint32)", path, name);
  Hid attribute = checked(H5Aopen(file, name, H5P_DEFAULT), H5Aclose, path, "open an attribute");
  Hid type = checked(H5Aget_type(attribute.get()), H5Tclose, path, "read an attribute type");
  Hid space = checked(H5Aget_space(attribute.get()), H5Sclose, path, "read an attribute space");
  if (H5Tget_class(type.get()) != H5T_INTEGER || H5Sget_simple_extent_npoints(space.get()) != 1)
    fail("{}: root attribute {} must be one integer, found {}", path, name, describe_type(type.get()));
  // Read signed attributes (h5py's default for Python ints) as signed so that -1 is not clipped to 0.
  int64_t value = 0;
  if (H5Tget_sign(type.get()) == H5T_SGN_NONE) {
    uint64_t unsigned_value = 0;
    check(H5Aread(attribute.get(), H5T_NATIVE_UINT64, &unsigned_value), path, "read an attribute");
    value = unsigned_value > UINT32_MAX ? -1 : static_cast<int64_t>(unsigned_value);
  } else {
    check(H5Aread(attribute.get(), H5T_NATIVE_INT64, &value), path, "read an attribute");
  }
  if (value < 0 || value > UINT32_MAX) fail("{}: root attribute {} is out of the uint32 range", path, name);
  return static_cast<uint32_t>(value);
}

// Reads elements [begin, begin+count) of a 1-D dataset, converted to memory_type.
void read_range(hid_t dataset, hid_t memory_type, uint64_t begin, uint64_t count, void* out,
                const std::string& path) {
  if (count == 0) return;
  Hid file_space = checked(H5Dget_space(dataset), H5Sclose, path, "read a dataspace");
  const hsize_t start = begin, size = count;
  check(H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, &start, nullptr, &size, nullptr), path,
        "select a range");
  Hid memory_space = checked(H5Screate_simple(1, &size, nullptr), H5Sclose, path, "create a dataspace");
  check(H5Dread(dataset, memory_type, memory_space.get(), file_space.get(), H5P_DEFAULT, out), path,
        fmt::format("read elements [{}, {})", begin, begin + count));
}

template <typename T>
hid_t native_type();
template <>
hid_t native_type<uint8_t>() { return H5T_NATIVE_UINT8; }
template <>
hid_t native_type<uint32_t>() { return H5T_NATIVE_UINT32; }
template <>
hid_t native_type<uint64_t>() { return H5T_NATIVE_UINT64; }

// A 1-D dataset written one chunk at a time: elements gather in a buffer of one chunk, which is
// appended to the (extendible) dataset when full, so chunks are written whole and in order. The
// dataset is created at the first write: its chunk is then min(length, 64 Ki), so a small file is
// not padded to a whole chunk, and an empty dataset is a contiguous one of length 0.
template <typename T>
class AppendableVector {
 public:
  AppendableVector(const char* name, hid_t file_type) : name_(name), file_type_(file_type) {
    buffer_.reserve(kChunkElements);
  }
  void push(T value, hid_t file, const std::string& path) {
    buffer_.push_back(value);
    if (buffer_.size() == kChunkElements) flush(file, path);
  }
  // Writes what is buffered and creates the dataset if nothing was written yet.
  void finish(hid_t file, const std::string& path) {
    if (!buffer_.empty()) flush(file, path);
    if (!dataset_.valid()) create(file, path, 0);
    dataset_ = Hid();
  }
  uint64_t length() const { return written_ + buffer_.size(); }

 private:
  void create(hid_t file, const std::string& path, hsize_t chunk) {
    const hsize_t size = 0, unlimited = H5S_UNLIMITED;
    Hid space = checked(H5Screate_simple(1, &size, chunk > 0 ? &unlimited : nullptr), H5Sclose, path,
                        "create a dataspace");
    Hid creation = checked(H5Pcreate(H5P_DATASET_CREATE), H5Pclose, path, "create a property list");
    if (chunk > 0) check(H5Pset_chunk(creation.get(), 1, &chunk), path, "set the chunk size");
    dataset_ = checked(H5Dcreate2(file, name_, file_type_, space.get(), H5P_DEFAULT, creation.get(), H5P_DEFAULT),
                       H5Dclose, path, fmt::format("create /{}", name_));
  }
  void flush(hid_t file, const std::string& path) {
    const hsize_t count = buffer_.size(), start = written_, length = written_ + count;
    if (!dataset_.valid()) create(file, path, std::min<hsize_t>(count, kChunkElements));
    check(H5Dset_extent(dataset_.get(), &length), path, fmt::format("extend /{}", name_));
    Hid file_space = checked(H5Dget_space(dataset_.get()), H5Sclose, path, "read a dataspace");
    check(H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, &start, nullptr, &count, nullptr), path,
          "select a range");
    Hid memory_space = checked(H5Screate_simple(1, &count, nullptr), H5Sclose, path, "create a dataspace");
    check(H5Dwrite(dataset_.get(), native_type<T>(), memory_space.get(), file_space.get(), H5P_DEFAULT,
                   buffer_.data()),
          path, fmt::format("write /{} (is the disk full?)", name_));
    written_ = length;
    buffer_.clear();
  }

  const char* name_;
  hid_t file_type_;
  std::vector<T> buffer_;
  uint64_t written_ = 0;
  Hid dataset_;
};

void write_u32_attribute(hid_t file, const std::string& path, const char* name, uint32_t value) {
  Hid space = checked(H5Screate(H5S_SCALAR), H5Sclose, path, "create a dataspace");
  Hid attribute = checked(H5Acreate2(file, name, H5T_STD_U32LE, space.get(), H5P_DEFAULT, H5P_DEFAULT),
                          H5Aclose, path, fmt::format("create attribute {}", name));
  check(H5Awrite(attribute.get(), H5T_NATIVE_UINT32, &value), path,
        fmt::format("write attribute {}", name));
}

// The checks of the whole contents' shape that open() makes; TokenDatasetWriter checks the values.
void validate_contents(const std::string& path, const TokenDatasetContents& contents) {
  const uint64_t num_tokens = contents.tokens.size();
  const auto& offsets = contents.doc_offsets;
  if (offsets.empty() || offsets.front() != 0 || offsets.back() != num_tokens)
    fail("{}: doc_offsets must start at 0 and end at the {} tokens", path, num_tokens);
  for (size_t d = 1; d < offsets.size(); ++d)
    if (offsets[d] < offsets[d - 1]) fail("{}: doc_offsets decrease at entry {}", path, d);
  if (contents.loss_mask && contents.loss_mask->size() != num_tokens)
    fail("{}: loss_mask has {} entries, expected {} (one per token)", path, contents.loss_mask->size(),
         num_tokens);
}

}  // namespace

struct TokenDataset::Impl {
  std::string path;
  TokenDatasetInfo info;
  std::vector<uint64_t> doc_offsets;
  Hid file;
  Hid tokens;
  Hid loss_mask;  // invalid when the file has none
};

TokenDataset::TokenDataset(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
TokenDataset::TokenDataset(TokenDataset&&) noexcept = default;
TokenDataset& TokenDataset::operator=(TokenDataset&&) noexcept = default;
TokenDataset::~TokenDataset() = default;

TokenDataset TokenDataset::open(const std::string& path) {
  silence_hdf5_errors();
  if (!std::filesystem::is_regular_file(path)) fail("{}: no such dataset file", path);
  if (H5Fis_hdf5(path.c_str()) <= 0) fail("{}: not an HDF5 file", path);

  auto impl = std::make_unique<Impl>();
  impl->path = path;
  impl->file = checked(H5Fopen(path.c_str(), H5F_ACC_RDONLY, read_only_access(path).get()), H5Fclose, path,
                       "open the file");
  const hid_t file = impl->file.get();
  TokenDatasetInfo& info = impl->info;
  OpenedDataset tokens = open_vector(
      file, path, "tokens", [](hid_t t) { return is_unsigned_integer(t, 2) || is_unsigned_integer(t, 4); },
      "uint16 or uint32");
  impl->tokens = std::move(tokens.dataset);
  info.num_tokens = tokens.length;

  info.vocab_size = read_u32_attribute(file, path, "vocab_size");
  info.eos_id = read_u32_attribute(file, path, "eos_id");
  if (info.vocab_size == 0) fail("{}: root attribute vocab_size is 0", path);
  if (info.eos_id >= info.vocab_size)
    fail("{}: eos_id {} is not below vocab_size {}", path, info.eos_id, info.vocab_size);

  OpenedDataset offsets = open_vector(
      file, path, "doc_offsets", [](hid_t t) { return is_unsigned_integer(t, 8); }, "uint64");
  if (offsets.length == 0)
    fail("{}: /doc_offsets is empty, expected num_documents+1 entries starting at 0", path);
  impl->doc_offsets.resize(offsets.length);
  read_range(offsets.dataset.get(), H5T_NATIVE_UINT64, 0, offsets.length, impl->doc_offsets.data(), path);
  const auto& doc_offsets = impl->doc_offsets;
  if (doc_offsets.front() != 0) fail("{}: /doc_offsets[0] is {}, expected 0", path, doc_offsets.front());
  for (size_t d = 1; d < doc_offsets.size(); ++d)
    if (doc_offsets[d] < doc_offsets[d - 1])
      fail("{}: /doc_offsets decreases at entry {} ({} after {})", path, d, doc_offsets[d],
           doc_offsets[d - 1]);
  if (doc_offsets.back() != info.num_tokens)
    fail("{}: /doc_offsets ends at {}, expected the number of tokens {}", path, doc_offsets.back(),
         info.num_tokens);
  info.num_documents = doc_offsets.size() - 1;

  if (H5Lexists(file, "loss_mask", H5P_DEFAULT) > 0) {
    OpenedDataset mask = open_vector(
        file, path, "loss_mask", [](hid_t t) { return is_unsigned_integer(t, 1); }, "uint8");
    if (mask.length != info.num_tokens)
      fail("{}: /loss_mask has {} entries, expected {} (one per token)", path, mask.length,
           info.num_tokens);
    impl->loss_mask = std::move(mask.dataset);
    info.has_loss_mask = true;
  }
  return TokenDataset(std::move(impl));
}

const std::string& TokenDataset::path() const { return impl_->path; }
const TokenDatasetInfo& TokenDataset::info() const { return impl_->info; }
const std::vector<uint64_t>& TokenDataset::doc_offsets() const { return impl_->doc_offsets; }

void TokenDataset::read_tokens(uint64_t begin, uint64_t count, uint32_t* out) const {
  const TokenDatasetInfo& info = impl_->info;
  if (begin > info.num_tokens || count > info.num_tokens - begin)
    fail("{}: tokens [{}, {}) are past the end ({} tokens)", impl_->path, begin, begin + count,
         info.num_tokens);
  read_range(impl_->tokens.get(), H5T_NATIVE_UINT32, begin, count, out, impl_->path);
  for (uint64_t i = 0; i < count; ++i)
    if (out[i] >= info.vocab_size)
      fail("{}: token id {} at position {} is not below vocab_size {}", impl_->path, out[i], begin + i,
           info.vocab_size);
}

void TokenDataset::read_loss_mask(uint64_t begin, uint64_t count, uint8_t* out) const {
  const TokenDatasetInfo& info = impl_->info;
  if (begin > info.num_tokens || count > info.num_tokens - begin)
    fail("{}: loss mask [{}, {}) is past the end ({} tokens)", impl_->path, begin, begin + count,
         info.num_tokens);
  if (!info.has_loss_mask) {
    std::fill_n(out, count, uint8_t{1});
    return;
  }
  read_range(impl_->loss_mask.get(), H5T_NATIVE_UINT8, begin, count, out, impl_->path);
  for (uint64_t i = 0; i < count; ++i)
    if (out[i] > 1)
      fail("{}: /loss_mask holds {} at position {}, expected 0 or 1", impl_->path, out[i], begin + i);
}

// Removes the temporary file when the writer is destroyed unfinished. Declared before the file and
// datasets in Impl, so that they are closed before it runs.
struct RemoveUnlessFinished {
  std::string path;
  bool finished = false;
  ~RemoveUnlessFinished() {
    std::error_code ignored;
    if (!finished) std::filesystem::remove(path, ignored);
  }
};

struct TokenDatasetWriter::Impl {
  std::string path;
  RemoveUnlessFinished temporary;
  uint32_t vocab_size, eos_id;
  bool with_loss_mask;
  bool closed = false;  // close() succeeded
  Hid file;
  AppendableVector<uint32_t> tokens;
  AppendableVector<uint64_t> doc_offsets{"doc_offsets", H5T_STD_U64LE};
  AppendableVector<uint8_t> loss_mask{"loss_mask", H5T_STD_U8LE};

  Impl(const std::string& path_, uint32_t vocab_size_, uint32_t eos_id_, bool with_loss_mask_)
      : path(path_), temporary{path_ + ".tmp"}, vocab_size(vocab_size_), eos_id(eos_id_),
        with_loss_mask(with_loss_mask_), tokens("tokens", vocab_size_ <= 65536 ? H5T_STD_U16LE : H5T_STD_U32LE) {}
};

TokenDatasetWriter::TokenDatasetWriter(const std::string& path, uint32_t vocab_size, uint32_t eos_id,
                                       bool with_loss_mask) {
  silence_hdf5_errors();
  if (vocab_size == 0) fail("{}: cannot write a dataset with vocab_size 0", path);
  if (eos_id >= vocab_size) fail("{}: eos_id {} is not below vocab_size {}", path, eos_id, vocab_size);
  impl_ = std::make_unique<Impl>(path, vocab_size, eos_id, with_loss_mask);
  impl_->file = checked(H5Fcreate(impl_->temporary.path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), H5Fclose,
                        impl_->temporary.path, "create the file (does its directory exist and is it writable?)");
  impl_->doc_offsets.push(0, impl_->file.get(), impl_->temporary.path);
}
TokenDatasetWriter::TokenDatasetWriter(TokenDatasetWriter&&) noexcept = default;
TokenDatasetWriter& TokenDatasetWriter::operator=(TokenDatasetWriter&&) noexcept = default;
TokenDatasetWriter::~TokenDatasetWriter() = default;

void TokenDatasetWriter::append(std::span<const uint32_t> tokens, std::span<const uint8_t> loss_mask) {
  Impl& w = *impl_;
  if (!w.file.valid()) fail("{}: append after close", w.path);
  if (loss_mask.size() != (w.with_loss_mask ? tokens.size() : 0))
    fail("{}: document {} has {} tokens and {} loss mask entries, expected {}", w.path, num_documents(),
         tokens.size(), loss_mask.size(), w.with_loss_mask ? "one per token" : "none (the file has no mask)");
  // Everything is checked before anything is appended, so a rejected document leaves the writer as it was.
  for (size_t i = 0; i < tokens.size(); ++i)
    if (tokens[i] >= w.vocab_size)
      fail("{}: token id {} at position {} is not below vocab_size {}", w.path, tokens[i], w.tokens.length() + i,
           w.vocab_size);
  for (size_t i = 0; i < loss_mask.size(); ++i)
    if (loss_mask[i] > 1)
      fail("{}: loss mask value {} at position {}, expected 0 or 1", w.path, loss_mask[i], w.tokens.length() + i);
  const hid_t file = w.file.get();
  for (uint32_t token : tokens) w.tokens.push(token, file, w.temporary.path);
  for (uint8_t m : loss_mask) w.loss_mask.push(m, file, w.temporary.path);
  w.doc_offsets.push(w.tokens.length(), file, w.temporary.path);
}

void TokenDatasetWriter::close() {
  Impl& w = *impl_;
  if (!w.file.valid()) fail("{}: the writer is closed", w.path);
  const hid_t file = w.file.get();
  w.tokens.finish(file, w.temporary.path);
  w.doc_offsets.finish(file, w.temporary.path);
  if (w.with_loss_mask) w.loss_mask.finish(file, w.temporary.path);
  write_u32_attribute(file, w.temporary.path, "vocab_size", w.vocab_size);
  write_u32_attribute(file, w.temporary.path, "eos_id", w.eos_id);
  // Closing writes HDF5's metadata; its failure (a full disk) must not be renamed into place.
  check(H5Fclose(w.file.release()), w.temporary.path, "close the file (is the disk full?)");
  w.closed = true;
}

void TokenDatasetWriter::finish() {
  Impl& w = *impl_;
  if (w.temporary.finished) fail("{}: finish called twice", w.path);
  if (!w.closed) close();  // fails if an earlier close failed: such a file is never renamed into place
  std::error_code error;
  std::filesystem::rename(w.temporary.path, w.path, error);
  if (error) fail("{}: could not rename {} into place: {}", w.path, w.temporary.path, error.message());
  w.temporary.finished = true;
}

const std::string& TokenDatasetWriter::path() const { return impl_->path; }
uint64_t TokenDatasetWriter::num_tokens() const { return impl_->tokens.length(); }
uint64_t TokenDatasetWriter::num_documents() const { return impl_->doc_offsets.length() - 1; }

void write_token_dataset(const std::string& path, const TokenDatasetContents& contents) {
  validate_contents(path, contents);
  TokenDatasetWriter writer(path, contents.vocab_size, contents.eos_id, contents.loss_mask.has_value());
  const std::span<const uint32_t> tokens(contents.tokens);
  const std::span<const uint8_t> mask = contents.loss_mask ? std::span<const uint8_t>(*contents.loss_mask)
                                                           : std::span<const uint8_t>();
  const auto& offsets = contents.doc_offsets;
  for (size_t d = 0; d + 1 < offsets.size(); ++d) {
    const size_t begin = offsets[d], count = offsets[d + 1] - offsets[d];
    writer.append(tokens.subspan(begin, count), mask.empty() ? mask : mask.subspan(begin, count));
  }
  writer.finish();
}

SequenceSampler::SequenceSampler(const TokenDataset& dataset, int64_t seq_len, uint64_t seed, bool packing)
    : dataset_(&dataset), seq_len_(seq_len), seed_(seed), packing_(packing) {
  if (seq_len <= 0) fail("{}: sequence length must be positive, got {}", dataset.path(), seq_len);
  const uint64_t num_tokens = dataset.info().num_tokens;
  if (packing && num_tokens < static_cast<uint64_t>(seq_len) + 1)
    fail("{}: has {} tokens, fewer than one sequence of seq_len+1 = {}", dataset.path(), num_tokens,
         seq_len + 1);
  if (!packing) {
    // A document of n tokens has n-1 targets: pieces of up to seq_len of them, seq_len tokens apart.
    const auto& offsets = dataset.doc_offsets();
    for (size_t d = 0; d + 1 < offsets.size(); ++d) {
      for (uint64_t start = offsets[d]; start + 1 < offsets[d + 1]; start += static_cast<uint64_t>(seq_len))
        piece_starts_.push_back(start);
    }
    if (piece_starts_.empty())
      fail("{}: no document has the 2 tokens (an input and its target) that a training sequence needs without "
           "packing",
           dataset.path());
  }
  shuffle_epoch();
}

uint64_t SequenceSampler::sequences_per_epoch() const {
  if (!packing_) return piece_starts_.size();
  return (dataset_->info().num_tokens - 1) / static_cast<uint64_t>(seq_len_);
}

// Fisher-Yates from the last index down, each swap partner drawn from (seed, epoch, i). The
// modulo's bias is below (i+1)/2^64, far beneath anything a training run could notice.
void SequenceSampler::shuffle_epoch() {
  order_.resize(sequences_per_epoch());
  std::iota(order_.begin(), order_.end(), uint64_t{0});
  for (uint64_t i = order_.size(); i-- > 1;) {
    const uint64_t j = counter_random_u64(seed_, position_.epoch, i) % (i + 1);
    std::swap(order_[i], order_[j]);
  }
}

void SequenceSampler::next(uint32_t* tokens, uint8_t* target_mask, int32_t* doc_start) {
  const uint64_t sequence = order_[position_.index];
  if (packing_) {
    next_packed(sequence * static_cast<uint64_t>(seq_len_), tokens, target_mask, doc_start);
  } else {
    next_piece(piece_starts_[sequence], tokens, target_mask, doc_start);
  }
  skip(1);
}

// Tokens [start, start+seq_len]. A target that is a document's first token is masked: it would be
// predicted from the previous document, which the restart hides, so the sequence trains exactly the
// targets its documents would train alone.
void SequenceSampler::next_packed(uint64_t start, uint32_t* tokens, uint8_t* target_mask, int32_t* doc_start) const {
  const auto L = static_cast<uint64_t>(seq_len_);
  dataset_->read_tokens(start, L + 1, tokens);
  dataset_->read_loss_mask(start + 1, L, target_mask);
  const auto& offsets = dataset_->doc_offsets();
  // The documents that start inside the sequence (empty ones share their offset with the next).
  auto next_start = std::upper_bound(offsets.begin(), offsets.end(), start);
  uint64_t current = start;  // where the document of the current token starts, clipped to the sequence
  for (uint64_t t = 0; t < L; ++t) {
    if (next_start != offsets.end() && *next_start == start + t) {
      current = start + t;
      while (next_start != offsets.end() && *next_start == current) ++next_start;
    }
    if (doc_start) doc_start[t] = static_cast<int32_t>(current - start);
    if (next_start != offsets.end() && *next_start == start + t + 1) target_mask[t] = 0;
  }
}

// Tokens [start, min(start+seq_len+1, end of the document)), then eos_id to fill seq_len+1; targets past
// the document are masked.
void SequenceSampler::next_piece(uint64_t start, uint32_t* tokens, uint8_t* target_mask, int32_t* doc_start) const {
  const auto L = static_cast<uint64_t>(seq_len_);
  const auto& offsets = dataset_->doc_offsets();
  const uint64_t end = *std::upper_bound(offsets.begin(), offsets.end(), start);
  const uint64_t count = std::min(L + 1, end - start);
  dataset_->read_tokens(start, count, tokens);
  dataset_->read_loss_mask(start + 1, count - 1, target_mask);
  std::fill(tokens + count, tokens + L + 1, dataset_->info().eos_id);
  std::fill(target_mask + count - 1, target_mask + L, uint8_t{0});
  if (doc_start) std::fill(doc_start, doc_start + L, 0);
}

// Keeps the position canonical (index < sequences_per_epoch) so that position() names the epoch
// the next sequence comes from.
void SequenceSampler::skip(uint64_t n) {
  const uint64_t per_epoch = order_.size();
  while (n > 0) {
    const uint64_t step = std::min(n, per_epoch - position_.index);
    position_.index += step;
    n -= step;
    if (position_.index == per_epoch) {
      position_ = {position_.epoch + 1, 0};
      shuffle_epoch();
    }
  }
}

SamplerPosition SequenceSampler::position() const { return position_; }

void SequenceSampler::restore(const SamplerPosition& position) {
  if (position.index > order_.size())
    fail("{}: sampler position {} is past the {} sequences of an epoch (was the checkpoint made with "
         "another dataset or seq_len?)",
         dataset_->path(), position.index, order_.size());
  position_ = {position.epoch, 0};
  shuffle_epoch();
  skip(position.index);
}

}  // namespace ssmtune
