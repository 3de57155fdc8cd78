// The manifest of a checkpoint directory: manifest.json lists every other file of the checkpoint with
// its size in bytes and its CRC-32 (zlib's crc32, the checksum of gzip and PNG), and it is the last
// file written. A checkpoint is complete exactly when its manifest is there and every file it lists
// matches it; a truncated, partly copied or bit-flipped file becomes an error naming that file instead
// of training that silently continues from damaged state.
#pragma once
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace ssmtune {

inline constexpr const char* kManifestFile = "manifest.json";

// The CRC-32 of a file's bytes; an Error naming the file when it cannot be read.
uint32_t file_crc32(const std::filesystem::path& path);

// Writes dir/manifest.json (atomically, synced) listing `files`, names inside dir, as they are on disk.
void write_manifest(const std::filesystem::path& dir, const std::vector<std::string>& files);

class CheckpointManifest {
 public:
  // Reads dir/manifest.json. Error naming it when it is missing (the save that wrote the directory did
  // not finish) or is not a manifest.
  static CheckpointManifest read(const std::filesystem::path& dir);

  // Error naming dir/file when the manifest does not list it, or it is missing, or its size or CRC-32
  // differ from the manifest's.
  void verify(const std::string& file) const;
  // verify() for every listed file.
  void verify_all() const;

 private:
  struct Entry {
    uint64_t bytes = 0;
    uint32_t crc32 = 0;
  };
  std::filesystem::path dir_;
  std::map<std::string, Entry> files_;
};

}  // namespace ssmtune
