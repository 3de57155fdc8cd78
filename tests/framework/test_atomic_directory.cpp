// write_directory_atomically: the target appears complete or not at all, and never replaces anything a
// user had.
#include "framework/atomic_directory.h"

#include <fstream>
#include <stdexcept>

#include "framework/atomic_file.h"
#include "tests/catch.h"
#include "tests/framework/error_message.h"
#include "tests/framework/scratch_dir.h"

using namespace ssmtune;
using test::contains;
using test::error_message;
namespace fs = std::filesystem;

namespace {

size_t entries(const fs::path& dir) {
  return static_cast<size_t>(std::distance(fs::directory_iterator(dir), fs::directory_iterator()));
}

void write_two_files(const fs::path& dir) {
  std::ofstream(dir / "a.txt") << "a";
  std::ofstream(dir / "b.txt") << "b";
}

}  // namespace

TEST_CASE("the directory appears with everything written into it, and no temporary is left") {
  test::ScratchDir scratch("atomic-dir");
  write_directory_atomically(scratch / "nested/out/", write_two_files);  // parents created, "out/" names out
  CHECK(read_text_file(scratch / "nested/out/a.txt") == "a");
  CHECK(read_text_file(scratch / "nested/out/b.txt") == "b");
  CHECK(entries(scratch / "nested") == 1);

  fs::create_directories(scratch / "empty");
  write_directory_atomically(scratch / "empty", write_two_files);
  CHECK(entries(scratch / "empty") == 2);
}

TEST_CASE("a failing write leaves neither the directory nor its temporary") {
  test::ScratchDir scratch("atomic-dir");
  auto failing = [](const fs::path& dir) {
    write_two_files(dir);
    throw std::runtime_error("disk full");
  };
  CHECK_THROWS_WITH(write_directory_atomically(scratch / "out", failing), "disk full");
  CHECK(entries(scratch.path()) == 0);
}

TEST_CASE("an existing file or non-empty directory is refused before anything is written") {
  test::ScratchDir scratch("atomic-dir");
  fs::create_directories(scratch / "taken");
  std::ofstream(scratch / "taken/mine.txt") << "mine";
  std::ofstream(scratch / "file") << "mine too";
  bool wrote = false;
  for (const std::string name : {"taken", "file"}) {
    const std::string message =
        error_message([&] { write_directory_atomically(scratch / name, [&](const fs::path&) { wrote = true; }); });
    CHECK(contains(message, (scratch / name).string()));
    CHECK(contains(message, "already exists and is not an empty directory"));
  }
  CHECK(!wrote);
  CHECK(read_text_file(scratch / "taken/mine.txt") == "mine");
  CHECK(read_text_file(scratch / "file") == "mine too");
  CHECK(entries(scratch.path()) == 2);
}
