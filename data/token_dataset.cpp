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
  opened.length = length;
  return opened;
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

void write_vector(hid_t file, const std::string& path, const char* name, hid_t file_type,
                  hid_t memory_type, uint64_t length, const void* data) {
  const hsize_t size = length;
  Hid space = checked(H5Screate_simple(1, &size, nullptr), H5Sclose, path, "create a dataspace");
  Hid creation = checked(H5Pcreate(H5P_DATASET_CREATE), H5Pclose, path, "create a property list");
  // A chunk may not exceed a fixed-size dataset, and an empty one stays contiguous.
  if (length > 0) {
    const hsize_t chunk = std::min(size, kChunkElements);
    check(H5Pset_chunk(creation.get(), 1, &chunk), path, "set the chunk size");
  }
  Hid dataset = checked(H5Dcreate2(file, name, file_type, space.get(), H5P_DEFAULT, creation.get(),
                                   H5P_DEFAULT),
                        H5Dclose, path, fmt::format("create /{}", name));
  if (length > 0)
    check(H5Dwrite(dataset.get(), memory_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data), path,
          fmt::format("write /{}", name));
}

void write_u32_attribute(hid_t file, const std::string& path, const char* name, uint32_t value) {
  Hid space = checked(H5Screate(H5S_SCALAR), H5Sclose, path, "create a dataspace");
  Hid attribute = checked(H5Acreate2(file, name, H5T_STD_U32LE, space.get(), H5P_DEFAULT, H5P_DEFAULT),
                          H5Aclose, path, fmt::format("create attribute {}", name));
  check(H5Awrite(attribute.get(), H5T_NATIVE_UINT32, &value), path,
        fmt::format("write attribute {}", name));
}

// The checks that open() makes, applied before writing so the writer never produces a file the
// reader rejects.
void validate_contents(const std::string& path, const TokenDatasetContents& contents) {
  const uint64_t num_tokens = contents.tokens.size();
  const auto& offsets = contents.doc_offsets;
  if (contents.vocab_size == 0) fail("{}: cannot write a dataset with vocab_size 0", path);
  if (contents.eos_id >= contents.vocab_size)
    fail("{}: eos_id {} is not below vocab_size {}", path, contents.eos_id, contents.vocab_size);
  if (offsets.empty() || offsets.front() != 0 || offsets.back() != num_tokens)
    fail("{}: doc_offsets must start at 0 and end at the {} tokens", path, num_tokens);
  for (size_t d = 1; d < offsets.size(); ++d)
    if (offsets[d] < offsets[d - 1]) fail("{}: doc_offsets decrease at entry {}", path, d);
  if (contents.loss_mask && contents.loss_mask->size() != num_tokens)
    fail("{}: loss_mask has {} entries, expected {} (one per token)", path, contents.loss_mask->size(),
         num_tokens);
  for (uint64_t i = 0; i < num_tokens; ++i)
    if (contents.tokens[i] >= contents.vocab_size)
      fail("{}: token id {} at position {} is not below vocab_size {}", path, contents.tokens[i], i,
           contents.vocab_size);
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
  impl->file = checked(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose, path,
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

void write_token_dataset(const std::string& path, const TokenDatasetContents& contents) {
  silence_hdf5_errors();
  validate_contents(path, contents);
  const std::string temporary = path + ".tmp";
  try {
    Hid file = checked(H5Fcreate(temporary.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), H5Fclose,
                       temporary, "create the file");
    const hid_t token_type = contents.vocab_size <= 65536 ? H5T_STD_U16LE : H5T_STD_U32LE;
    write_vector(file.get(), temporary, "tokens", token_type, H5T_NATIVE_UINT32, contents.tokens.size(),
                 contents.tokens.data());
    write_vector(file.get(), temporary, "doc_offsets", H5T_STD_U64LE, H5T_NATIVE_UINT64,
                 contents.doc_offsets.size(), contents.doc_offsets.data());
    if (contents.loss_mask)
      write_vector(file.get(), temporary, "loss_mask", H5T_STD_U8LE, H5T_NATIVE_UINT8,
                   contents.loss_mask->size(), contents.loss_mask->data());
    write_u32_attribute(file.get(), temporary, "vocab_size", contents.vocab_size);
    write_u32_attribute(file.get(), temporary, "eos_id", contents.eos_id);
    check(H5Fflush(file.get(), H5F_SCOPE_GLOBAL), temporary, "flush the file");
  } catch (...) {
    std::error_code ignored;
    std::filesystem::remove(temporary, ignored);
    throw;
  }
  std::error_code error;
  std::filesystem::rename(temporary, path, error);
  if (error) fail("{}: could not rename {} into place: {}", path, temporary, error.message());
}

SequenceSampler::SequenceSampler(const TokenDataset& dataset, int64_t seq_len, uint64_t seed)
    : dataset_(&dataset), seq_len_(seq_len), seed_(seed) {
  if (seq_len <= 0) fail("{}: sequence length must be positive, got {}", dataset.path(), seq_len);
  const uint64_t num_tokens = dataset.info().num_tokens;
  if (num_tokens < static_cast<uint64_t>(seq_len) + 1)
    fail("{}: has {} tokens, fewer than one sequence of seq_len+1 = {}", dataset.path(), num_tokens,
         seq_len + 1);
  shuffle_epoch();
}

uint64_t SequenceSampler::sequences_per_epoch() const {
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

void SequenceSampler::next(uint32_t* tokens, uint8_t* target_mask) {
  const uint64_t start = order_[position_.index] * static_cast<uint64_t>(seq_len_);
  dataset_->read_tokens(start, static_cast<uint64_t>(seq_len_) + 1, tokens);
  dataset_->read_loss_mask(start + 1, static_cast<uint64_t>(seq_len_), target_mask);
  skip(1);
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
