// Files that are either the old version or the complete new one, never half written: a crash or a full
// disk while a checkpoint is saved must not destroy the previous checkpoint. The bytes go to
// `<path>.tmp.<pid>` in the same directory (so the rename stays on one filesystem), are flushed and
// fsync'ed, the temporary is renamed over the target, and the directory is fsync'ed so the rename
// itself survives a power cut.
#pragma once
#include <cstddef>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <span>
#include <string>

namespace ssmtune {

// Replaces `path` with `bytes`. On failure the temporary is removed, the old file is left as it was, and
// an ssmtune::Error names the path and the system's reason.
void write_file_atomically(const std::filesystem::path& path, std::span<const std::byte> bytes);

// As above, with the content produced by `write` into the open temporary file, so that a large file
// need not be assembled in memory first. An exception from `write` removes the temporary and
// propagates unchanged; write errors on the FILE* are detected afterwards.
void write_file_atomically(const std::filesystem::path& path, const std::function<void(std::FILE*)>& write);

// The whole file as a string; an ssmtune::Error naming the file when it cannot be read.
std::string read_text_file(const std::filesystem::path& path);

}  // namespace ssmtune
