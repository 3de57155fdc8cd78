// Output directories that appear complete or not at all (exported and quantized models): everything is
// written into a temporary sibling `.<name>.tmp.<pid>`, which is renamed to the target once every file
// is on disk. An interrupted run leaves at most that temporary behind, never a half-written model
// where a complete one is expected.
#pragma once
#include <filesystem>
#include <functional>

namespace ssmtune {

// Runs `write` on the temporary directory, then renames it to `dir`. `dir` must not exist yet or be an
// empty directory, so nothing a user had is replaced; otherwise an Error says so before anything is
// written. An exception from `write` removes the temporary and propagates.
void write_directory_atomically(const std::filesystem::path& dir,
                                const std::function<void(const std::filesystem::path& temporary)>& write);

}  // namespace ssmtune
