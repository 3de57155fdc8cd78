#include "framework/atomic_directory.h"

#include <fcntl.h>
#include <unistd.h>

#include <string>
#include <system_error>

#include "framework/error.h"

namespace ssmtune {

namespace fs = std::filesystem;

void write_directory_atomically(const fs::path& dir, const std::function<void(const fs::path&)>& write) {
  const fs::path target = dir.has_filename() ? dir : dir.parent_path();  // "out/" names "out"
  if (target.empty()) fail("output directory: empty path");
  std::error_code error;
  if (fs::exists(target) && !(fs::is_directory(target) && fs::is_empty(target)))
    fail("{}: already exists and is not an empty directory; remove it or choose another output directory",
         target.string());
  const fs::path parent = target.parent_path();
  if (!parent.empty() && !fs::create_directories(parent, error) && error)
    fail("{}: cannot create directory: {}", parent.string(), error.message());

  const fs::path temporary = parent / ("." + target.filename().string() + ".tmp." + std::to_string(::getpid()));
  fs::remove_all(temporary, error);
  if (!fs::create_directory(temporary, error))
    fail("{}: cannot create temporary directory {}: {}", target.string(), temporary.string(), error.message());
  try {
    write(temporary);
  } catch (...) {
    fs::remove_all(temporary, error);
    throw;
  }
  // Every file in it was synced as it was written (write_file_atomically); the rename over an empty
  // directory is atomic, and syncing the parent makes it durable.
  fs::rename(temporary, target, error);
  if (error) {
    const std::string reason = error.message();
    fs::remove_all(temporary, error);
    fail("{}: cannot rename {} to it: {}", target.string(), temporary.string(), reason);
  }
  const int fd = ::open(parent.empty() ? "." : parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  const bool synced = fd >= 0 && ::fsync(fd) == 0;
  if (fd >= 0) ::close(fd);
  if (!synced) fail("{}: written, but cannot sync directory {}", target.string(), parent.string());
}

}  // namespace ssmtune
