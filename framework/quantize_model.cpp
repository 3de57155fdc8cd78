#include "framework/quantize_model.h"

#include <cmath>
#include <memory>

#include "framework/atomic_directory.h"
#include "framework/atomic_file.h"
#include "framework/error.h"
#include "framework/model_files.h"
#include "framework/nf4_checkpoint.h"

namespace ssmtune {
namespace {

// The projection quantized last. Planning quantizes each projection once for the offset its
// quant_state JSON records; writing quantizes it again for the data, so that only one projection is
// held quantized at a time (the parts of one projection are written one after another).
class LastQuantized {
 public:
  explicit LastQuantized(const ModelFiles& files) : files_(files) {}
  std::shared_ptr<const Nf4HostWeight> get(const MambaTensor& projection) {
    if (name_ != projection.name) {
      value_ = std::make_shared<const Nf4HostWeight>(files_.projection_nf4(projection));
      name_ = projection.name;
    }
    return value_;
  }

 private:
  const ModelFiles& files_;
  std::string name_;
  std::shared_ptr<const Nf4HostWeight> value_;
};

}  // namespace

void write_quantized_model(const std::filesystem::path& model_dir, const std::filesystem::path& out_dir,
                           uint64_t max_shard_bytes) {
  const ModelFiles files = ModelFiles::open(model_dir);
  if (files.prequantized())
    fail("{}: the model is already quantized (config.json has quantization_config)", model_dir.string());
  const ShardedSafetensors& tensors = files.tensors();

  auto last = std::make_shared<LastQuantized>(files);
  std::vector<PlannedTensor> planned;
  for (const MambaTensor& t : files.layout()) {
    const std::string stored = files.stored_name(t);
    const TensorInfo& info = tensors.float_info(stored, t.shape);
    if (t.kind != MambaTensor::Kind::projection) {
      planned.push_back(tensors.copy_as(stored, t.name));
      continue;
    }
    const float offset = last->get(t)->nested_offset;
    if (!std::isfinite(offset))
      fail("{}: tensor '{}' has values that are not finite; it cannot be quantized",
           tensors.file_of(stored).path().string(), stored);
    for (PlannedTensor& part :
         bnb_nf4_tensors(t.name, t.shape[0], t.shape[1], info.dtype, offset, [last, t] { return last->get(t); }))
      planned.push_back(std::move(part));
  }
  for (const std::string& name : files.other_tensors()) planned.push_back(tensors.copy_as(name, name));

  nlohmann::json config = mamba_config_to_json(files.config());
  config["quantization_config"] = bnb_nf4_config();
  const std::string config_text = config.dump(2) + "\n";
  write_directory_atomically(out_dir, [&](const std::filesystem::path& temporary) {
    write_sharded_safetensors(temporary, planned, max_shard_bytes);
    write_file_atomically(temporary / kConfigName, std::as_bytes(std::span(config_text)));
  });
}

}  // namespace ssmtune
