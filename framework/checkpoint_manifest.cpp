#include "framework/checkpoint_manifest.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <zlib.h>

#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <memory>

#include "framework/atomic_file.h"
#include "framework/error.h"
#include "framework/untrusted_json.h"

namespace ssmtune {
namespace {

namespace fs = std::filesystem;

constexpr const char* kManifestFormat = "ssmtune-manifest-1";

std::string hex(uint32_t value) { return fmt::format("{:08x}", value); }

}  // namespace

uint32_t file_crc32(const fs::path& path) {
  const std::unique_ptr<std::FILE, int (*)(std::FILE*)> file(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!file) fail("{}: cannot open: {}", path.string(), std::strerror(errno));
  std::vector<unsigned char> buffer(1 << 20);
  uLong crc = crc32_z(0, Z_NULL, 0);
  size_t n;
  while ((n = std::fread(buffer.data(), 1, buffer.size(), file.get())) > 0) crc = crc32_z(crc, buffer.data(), n);
  if (std::ferror(file.get())) fail("{}: cannot read: {}", path.string(), std::strerror(errno ? errno : EIO));
  return static_cast<uint32_t>(crc);
}

void write_manifest(const fs::path& dir, const std::vector<std::string>& files) {
  nlohmann::json listed = nlohmann::json::object();
  for (const std::string& name : files)
    listed[name] = {{"bytes", fs::file_size(dir / name)}, {"crc32", hex(file_crc32(dir / name))}};
  const nlohmann::json json = {{"format", kManifestFormat}, {"files", listed}};
  const std::string text = json.dump(2) + "\n";
  write_file_atomically(dir / kManifestFile, std::as_bytes(std::span(text)));
}

CheckpointManifest CheckpointManifest::read(const fs::path& dir) {
  const fs::path path = dir / kManifestFile;
  if (!fs::exists(path))
    fail("{}: missing: the checkpoint is incomplete (its save did not finish) or was written by an older "
         "ssmtune",
         path.string());
  CheckpointManifest manifest;
  manifest.dir_ = dir;
  try {
    const nlohmann::json json = parse_untrusted_json(path.string(), read_text_file(path));
    if (json.at("format").get<std::string>() != kManifestFormat)
      fail("{}: format '{}', this version of ssmtune reads '{}'", path.string(), json.at("format").get<std::string>(),
           kManifestFormat);
    for (const auto& [name, entry] : json.at("files").items()) {
      if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos)
        fail("{}: '{}' is not the name of a file in the checkpoint directory", path.string(), name);
      const std::string crc = entry.at("crc32").get<std::string>();
      uint32_t value = 0;
      const auto [end, error] = std::from_chars(crc.data(), crc.data() + crc.size(), value, 16);
      if (crc.size() != 8 || error != std::errc() || end != crc.data() + crc.size())
        fail("{}: '{}': crc32 '{}' is not 8 hex digits", path.string(), name, crc);
      manifest.files_[name] = {entry.at("bytes").get<uint64_t>(), value};
    }
  } catch (const nlohmann::json::exception& e) {
    fail("{}: not a checkpoint manifest: {}", path.string(), e.what());
  }
  return manifest;
}

void CheckpointManifest::verify(const std::string& file) const {
  const fs::path path = dir_ / file;
  const auto it = files_.find(file);
  if (it == files_.end()) fail("{}: not listed in {}", path.string(), (dir_ / kManifestFile).string());
  std::error_code error;
  const uint64_t bytes = fs::file_size(path, error);
  if (error) fail("{}: listed in {} but cannot be read: {}", path.string(), kManifestFile, error.message());
  if (bytes != it->second.bytes)
    fail("{}: {} bytes, {} says {}: the file was truncated or changed after the checkpoint was written",
         path.string(), bytes, kManifestFile, it->second.bytes);
  const uint32_t crc = file_crc32(path);
  if (crc != it->second.crc32)
    fail("{}: CRC-32 {}, {} says {}: the file is corrupt", path.string(), hex(crc), kManifestFile,
         hex(it->second.crc32));
}

void CheckpointManifest::verify_all() const {
  for (const auto& [name, entry] : files_) verify(name);
}

}  // namespace ssmtune
