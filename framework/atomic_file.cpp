#include "framework/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "framework/error.h"

namespace ssmtune {
namespace {

std::string errno_text(int error_number) { return std::strerror(error_number); }

// Owns the temporary until it has been renamed: closes and deletes it on every early exit.
class TemporaryFile {
 public:
  explicit TemporaryFile(std::filesystem::path path) : path_(std::move(path)) {}
  TemporaryFile(const TemporaryFile&) = delete;
  TemporaryFile& operator=(const TemporaryFile&) = delete;
  ~TemporaryFile() {
    if (file_) std::fclose(file_);
    if (!renamed_) ::unlink(path_.c_str());
  }

  // fopen may fail after creating nothing; the destructor's unlink is then a harmless ENOENT.
  std::FILE* open() {
    file_ = std::fopen(path_.c_str(), "wb");
    return file_;
  }
  // Returns 0, or the errno of the first failing step.
  int flush_sync_close() {
    int error_number = 0;
    if (std::fflush(file_) != 0 || std::ferror(file_)) error_number = errno ? errno : EIO;
    if (error_number == 0 && ::fsync(::fileno(file_)) != 0) error_number = errno;
    std::FILE* file = file_;
    file_ = nullptr;
    if (std::fclose(file) != 0 && error_number == 0) error_number = errno;
    return error_number;
  }
  void mark_renamed() { renamed_ = true; }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  std::FILE* file_ = nullptr;
  bool renamed_ = false;
};

// A rename is durable only once the directory entry is on disk.
int sync_directory(const std::filesystem::path& directory) {
  int fd = ::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return errno;
  int error_number = ::fsync(fd) != 0 ? errno : 0;
  ::close(fd);
  return error_number;
}

}  // namespace

void write_file_atomically(const std::filesystem::path& path, const std::function<void(std::FILE*)>& write) {
  std::filesystem::path temporary_path = path;
  temporary_path += ".tmp." + std::to_string(::getpid());
  TemporaryFile temporary(temporary_path);

  std::FILE* file = temporary.open();
  if (!file) fail("{}: cannot create temporary file {}: {}", path.string(), temporary_path.string(), errno_text(errno));
  errno = 0;  // so that a stream error found later reports the failing write's errno, not an older one
  write(file);
  if (int error_number = temporary.flush_sync_close())
    fail("{}: cannot write temporary file {}: {}", path.string(), temporary_path.string(), errno_text(error_number));
  if (std::rename(temporary_path.c_str(), path.c_str()) != 0)
    fail("{}: cannot rename {} over it: {}", path.string(), temporary_path.string(), errno_text(errno));
  temporary.mark_renamed();

  std::filesystem::path directory = path.parent_path();
  if (directory.empty()) directory = ".";
  if (int error_number = sync_directory(directory))
    fail("{}: written, but cannot sync directory {}: {}", path.string(), directory.string(), errno_text(error_number));
}

void write_file_atomically(const std::filesystem::path& path, std::span<const std::byte> bytes) {
  write_file_atomically(path, [&](std::FILE* file) {
    // A short write sets the stream's error flag, which the caller checks after flushing.
    if (!bytes.empty()) std::fwrite(bytes.data(), 1, bytes.size(), file);
  });
}

std::string read_text_file(const std::filesystem::path& path) {
  std::FILE* file = std::fopen(path.c_str(), "rb");
  if (!file) fail("{}: cannot open: {}", path.string(), errno_text(errno));
  std::string text;
  char buffer[1 << 16];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof buffer, file)) > 0) text.append(buffer, n);
  int error_number = std::ferror(file) ? (errno ? errno : EIO) : 0;
  std::fclose(file);
  if (error_number) fail("{}: cannot read: {}", path.string(), errno_text(error_number));
  return text;
}

}  // namespace ssmtune
