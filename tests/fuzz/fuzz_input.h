// Shared by the fuzz targets: the input as a file (for readers that take a path, as users' files
// reach them) and the input cut into parts at NUL bytes (for targets that take several strings).
#pragma once
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace ssmtune::fuzz {

// This process's scratch file for inputs (under the temp directory, removed at exit).
inline const std::string& input_path(const char* suffix) {
  struct File {
    std::string path;
    ~File() { std::remove(path.c_str()); }
  };
  static const File file{(std::filesystem::temp_directory_path() /
                          ("ssmtune-fuzz-" + std::to_string(::getpid()) + suffix)).string()};
  return file.path;
}

// Writes data[size] to input_path(suffix) and returns the path. Aborts when it cannot: a fuzzer that
// reads nothing would only pretend to run.
inline const std::string& input_file(const uint8_t* data, size_t size, const char* suffix) {
  const std::string& path = input_path(suffix);
  std::FILE* out = std::fopen(path.c_str(), "wb");
  if (!out || std::fwrite(data, 1, size, out) != size || std::fclose(out) != 0) {
    std::perror(path.c_str());
    std::abort();
  }
  return path;
}

// The parts of data[size] between NUL bytes (one part when there is none); at most max_parts, the
// last one keeping any further NUL bytes.
inline std::vector<std::string> split_at_nul(const uint8_t* data, size_t size, size_t max_parts) {
  std::vector<std::string> parts(1);
  for (size_t i = 0; i < size; ++i) {
    if (data[i] == 0 && parts.size() < max_parts) parts.emplace_back();
    else parts.back().push_back(static_cast<char>(data[i]));
  }
  return parts;
}

}  // namespace ssmtune::fuzz
