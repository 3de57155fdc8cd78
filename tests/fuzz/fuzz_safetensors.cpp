// Fuzz target: framework/safetensors on any file. Opening must either give a file whose every tensor
// can be read, or throw ssmtune::Error; anything else (another exception, a crash, a read out of
// bounds, an allocation beyond what the file holds) is a finding.
#include <vector>

#include "framework/error.h"
#include "framework/safetensors.h"
#include "tests/fuzz/fuzz_input.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace ssmtune;
  const std::string& path = fuzz::input_file(data, size, ".safetensors");
  try {
    const SafetensorsFile file = SafetensorsFile::open(path);
    for (const auto& [key, value] : file.metadata()) (void)key.size(), (void)value.size();
    for (const std::string& name : file.names()) {
      const TensorInfo& info = file.info(name);
      std::span<const std::byte> bytes = file.bytes(name);
      volatile std::byte sink{};
      if (!bytes.empty()) sink = bytes.front() ^ bytes.back();  // the first and last byte are mapped
      if (!is_floating_point(info.dtype)) continue;
      // The element count is bounded by the file's size, so reading every tensor allocates no more.
      std::vector<double> values(static_cast<size_t>(info.numel()));
      file.read_double(name, info.shape, values.data());
      std::vector<float> floats(values.size());
      file.read_float(name, info.shape, floats.data());
      std::vector<int64_t> other_shape = info.shape;
      other_shape.push_back(1);
      try {
        file.float_info(name, other_shape);
        std::abort();  // a shape that differs must be refused
      } catch (const Error&) {
      }
    }
  } catch (const Error&) {
  }
  return 0;
}
