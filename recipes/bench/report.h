// What the benchmark measured, and the two ways it reports it: short tables (one line per entry, read
// from the tail of the output) and a JSON file with every number, for the notes.
#pragma once
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace ssmtune::bench {

struct DeviceInfo {
  std::string name;
  int sm_count = 0;
  size_t l2_bytes = 0, memory_bytes = 0;
  int runtime_version = 0, driver_version = 0;
};

struct Ceilings {
  double copy_seconds = 0, copy_bytes = 0;    // one device-to-device copy, bytes read + written
  double gemm_seconds = 0, gemm_flops = 0;    // one bf16 GEMM 8192^3
  double copy_bytes_per_second() const { return copy_seconds > 0 ? copy_bytes / copy_seconds : 0; }
  double gemm_flops_per_second() const { return gemm_seconds > 0 ? gemm_flops / gemm_seconds : 0; }
  std::string error;  // set when a ceiling could not be measured; the fractions then print "-"
};

// Whether an entry is judged by the bytes it must move or by the arithmetic it must do.
enum class Bound { bytes, flops };

// The name of the row recipes/bench/nf4.cpp records beside the dequantize: a device-to-device copy of
// the same bytes, which the target table (targets.cpp) sets the dequantize against.
inline constexpr const char* kSameBytesCopy = "d2d copy, same bytes";

struct KernelResult {
  std::string name, shape;
  Bound bound = Bound::bytes;
  double amount = 0;                  // the minimum bytes moved (each input read once, each output
                                      // written once), or the FLOPs
  std::vector<double> seconds;        // every timed repetition
  double median_seconds = 0;
  std::optional<double> peer_seconds;
  std::string error;                  // set when the entry failed; the other fields are then unset

  double rate() const { return median_seconds > 0 ? amount / median_seconds : 0; }
  // Achieved rate over the ceiling of its kind measured in this run; 0 when that ceiling is unknown.
  double fraction_of_ceiling(const Ceilings& c) const;
};

struct StepResult {
  std::string model;
  bool recompute = false;
  int64_t checkpoint_every = 1;      // memory.checkpoint_every (with recompute)
  bool keep_layer_outputs = false;   // memory.keep_layer_outputs (with checkpoint_every > 1)
  bool packed = false;               // rows packing documents (doc_start), else one sequence per row
  int64_t batch = 0, seq_len = 0;
  std::vector<double> step_seconds;  // each timed step, synchronised at both ends
  double median_seconds = 0;
  std::vector<double> losses;        // mean token loss of every step, warm-up included
  size_t planned_bytes = 0;          // Backend::allocated_bytes: weights, adapters, activations
  size_t weights_bytes = 0, adapter_params = 0, activation_bytes = 0;
  size_t in_use_bytes = 0;           // cudaMemGetInfo total - free after the timed steps
  double model_flops_per_token = 0;  // forward + backward as `ssmtune info` counts them (framework/model_info.h),
                                     // without the recomputation: what model FLOPs utilisation counts
  std::optional<double> hf_tokens_per_second, hf_peak_bytes;
  std::string error;

  // "off", "on", or "on/k2" with checkpoint_every 2, "on/k2+out" keeping the layer outputs.
  std::string recompute_label() const;
  double tokens_per_second() const {
    return median_seconds > 0 ? static_cast<double>(batch * seq_len) / median_seconds : 0;
  }
  // Model FLOPs utilisation against a GEMM rate: nearly all of the model FLOPs are GEMMs.
  double mfu(double gemm_flops_per_second) const {
    return gemm_flops_per_second > 0 ? tokens_per_second() * model_flops_per_token / gemm_flops_per_second : 0;
  }
};

void print_kernel_table(const Ceilings& ceilings, const std::vector<KernelResult>& kernels);
// MFU against this run's GEMM ceiling, or REFERENCE.md's where it was not measured.
void print_step_table(const Ceilings& ceilings, const std::vector<StepResult>& steps);
void write_json(const std::filesystem::path& path, const DeviceInfo& device, const Ceilings& ceilings,
                const std::vector<KernelResult>& kernels, const std::vector<StepResult>& steps);

}  // namespace ssmtune::bench
