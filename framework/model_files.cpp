#include "framework/model_files.h"

#include <set>

#include "framework/error.h"

namespace ssmtune {

ModelFiles ModelFiles::open(const std::filesystem::path& dir) {
  ModelFiles files;
  files.dir_ = dir;
  files.config_ = load_mamba_config(files.config_path());
  nlohmann::json& extra = files.config_.extra;
  if (extra.contains("quantization_config")) {
    check_bnb_nf4_config(extra["quantization_config"], files.config_path().string());
    files.prequantized_ = true;
    extra.erase("quantization_config");
  }
  files.tensors_ = ShardedSafetensors::open_dir(dir);
  return files;
}

std::string ModelFiles::stored_name(const MambaTensor& t) const {
  if (t.kind == MambaTensor::Kind::embedding && !tensors_.contains(t.name) && tensors_.contains(kMambaSsmEmbeddingName))
    return kMambaSsmEmbeddingName;
  return t.name;
}

std::vector<std::string> ModelFiles::other_tensors() const {
  std::set<std::string> accounted;
  for (const MambaTensor& t : layout()) {
    accounted.insert(stored_name(t));
    if (t.kind == MambaTensor::Kind::projection && is_bnb_4bit(tensors_, t.name))
      for (std::string& part : bnb_nf4_component_names(t.name)) accounted.insert(std::move(part));
  }
  std::vector<std::string> others;
  for (std::string& name : tensors_.names())
    if (!accounted.contains(name)) others.push_back(std::move(name));
  return others;
}

std::optional<Nf4HostWeight> ModelFiles::stored_nf4(const MambaTensor& projection) const {
  if (!is_bnb_4bit(tensors_, projection.name)) return std::nullopt;
  if (!prequantized_)
    fail("{}: '{}' is stored quantized by bitsandbytes, but {} has no quantization_config", tensors_.origin().string(),
         projection.name, config_path().string());
  return read_bnb_nf4(tensors_, projection.name, projection.shape[0], projection.shape[1]);
}

Nf4HostWeight ModelFiles::projection_nf4(const MambaTensor& projection) const {
  if (std::optional<Nf4HostWeight> stored = stored_nf4(projection)) return std::move(*stored);
  std::vector<float> weight(static_cast<size_t>(projection.shape[0] * projection.shape[1]));
  tensors_.read_float(projection.name, projection.shape, weight.data());
  return nf4_quantize_host(weight.data(), static_cast<int64_t>(weight.size()));
}

}  // namespace ssmtune
