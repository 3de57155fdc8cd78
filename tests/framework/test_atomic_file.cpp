#include "framework/atomic_file.h"

#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

#include "framework/error.h"
#include "tests/catch.h"
#include "tests/framework/error_message.h"
#include "tests/framework/scratch_dir.h"

using ssmtune::read_text_file;
using ssmtune::write_file_atomically;
using ssmtune::test::ScratchDir;

namespace {

std::span<const std::byte> as_bytes(const std::string& text) { return std::as_bytes(std::span(text)); }

std::vector<std::string> directory_listing(const std::filesystem::path& directory) {
  std::vector<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(directory))
    names.push_back(entry.path().filename().string());
  return names;
}

using ssmtune::test::contains;
using ssmtune::test::error_message;

}  // namespace

TEST_CASE("write_file_atomically creates and replaces a file, leaving no temporary") {
  ScratchDir dir("atomic");
  const auto target = dir / "out.bin";
  write_file_atomically(target, as_bytes("first version, longer than the second"));
  CHECK(read_text_file(target) == "first version, longer than the second");
  write_file_atomically(target, as_bytes("second"));
  CHECK(read_text_file(target) == "second");
  CHECK(directory_listing(dir.path()) == std::vector<std::string>{"out.bin"});
}

TEST_CASE("write_file_atomically with a callback streams content and writes empty files") {
  ScratchDir dir("atomic");
  const auto target = dir / "big.bin";
  std::string block(1 << 16, 'x');
  write_file_atomically(target, [&](std::FILE* file) {
    for (int i = 0; i < 16; ++i) std::fwrite(block.data(), 1, block.size(), file);
  });
  CHECK(std::filesystem::file_size(target) == 16u * block.size());

  const auto empty = dir / "empty.bin";
  write_file_atomically(empty, std::span<const std::byte>());
  CHECK(std::filesystem::file_size(empty) == 0u);
  CHECK(directory_listing(dir.path()).size() == 2);
}

TEST_CASE("write_file_atomically into a missing directory is an Error naming the path and leaves nothing") {
  ScratchDir dir("atomic");
  const auto missing_dir = dir / "no_such_dir";
  const auto target = missing_dir / "out.bin";
  std::string message = error_message([&] { write_file_atomically(target, as_bytes("data")); });
  INFO(message);
  CHECK(contains(message, target.string()));
  CHECK(contains(message, "No such file or directory"));
  CHECK(!std::filesystem::exists(missing_dir));
  CHECK(directory_listing(dir.path()).empty());
}

TEST_CASE("an exception from the callback keeps the old file and removes the temporary") {
  ScratchDir dir("atomic");
  const auto target = dir / "keep.txt";
  write_file_atomically(target, as_bytes("old"));
  CHECK_THROWS_AS(write_file_atomically(target,
                                        [](std::FILE* file) {
                                          std::fputs("partial new content", file);
                                          throw std::runtime_error("producer failed");
                                        }),
                  std::runtime_error);
  CHECK(read_text_file(target) == "old");
  CHECK(directory_listing(dir.path()) == std::vector<std::string>{"keep.txt"});
}

TEST_CASE("renaming over a directory fails cleanly") {
  ScratchDir dir("atomic");
  const auto target = dir / "occupied";
  std::filesystem::create_directories(target / "child");
  std::string message = error_message([&] { write_file_atomically(target, as_bytes("data")); });
  INFO(message);
  CHECK(contains(message, target.string()));
  CHECK(contains(message, "cannot rename"));
  CHECK(directory_listing(dir.path()) == std::vector<std::string>{"occupied"});
}

TEST_CASE("read_text_file of a missing file is an Error naming it") {
  ScratchDir dir("atomic");
  const auto missing = dir / "absent.json";
  std::string message = error_message([&] { read_text_file(missing); });
  INFO(message);
  CHECK(contains(message, missing.string()));
  CHECK(contains(message, "No such file or directory"));
}
