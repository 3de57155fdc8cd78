// NF4 on the GPU (the math is in kernels/cpu/nf4.h): quantization, the counterpart of
// cpu::nf4_quantize with byte-identical output, and dequantization, both levels in one kernel, into a
// bf16 workspace (the counterpart of cpu::nf4_dequantize).
// A plain header: no CUDA types, so host code compiled by g++ can call it.
#pragma once
#include <cstddef>
#include <cstdint>

namespace ssmtune::cuda {

// Copies the NF4 code, its thresholds and the signed dynamic map into constant memory; call once per
// device, before the ops below.
void nf4_upload_tables();

// Scratch of nf4_quantize: the fp32 absmax of every 64-block.
size_t nf4_quantize_workspace_bytes(int64_t numel);

// Quantizes w (device fp32 [numel], numel even) into device buffers of cpu::nf4_sizes(numel): packed,
// absmax_codes and nested_absmax, equal byte for byte to cpu::nf4_quantize; *nested_offset (host)
// gets the same offset. The offset is the CPU's own mean (cpu::nf4_absmax_mean) of the block absmax
// values, so the call copies them to the host and synchronizes `stream` once; the second level is
// then enqueued on `stream` and may still run when the call returns.
void nf4_quantize(const float* w, int64_t numel, uint8_t* packed, uint8_t* absmax_codes, float* nested_absmax,
                  float* nested_offset, void* workspace, void* stream);

// out: numel bf16 values (as raw uint16 bits) on the device; all pointers device pointers.
// Runs on `stream` (a cudaStream_t, passed as void* to keep CUDA types out of this header).
void nf4_dequantize_bf16(const uint8_t* packed, const uint8_t* absmax_codes, const float* nested_absmax,
                         float nested_offset, int64_t numel, uint16_t* out, void* stream);

// The same for a weight of rows x cols into out with row stride ld, the columns past cols untouched (the
// LoRA up-projection goes there: framework/backend.h, h_in_x_columns). cols and ld must be multiples
// of 8 (whole 16-byte stores).
void nf4_dequantize_bf16_rows(const uint8_t* packed, const uint8_t* absmax_codes, const float* nested_absmax,
                              float nested_offset, int64_t rows, int64_t cols, int64_t ld, uint16_t* out,
                              void* stream);

}  // namespace ssmtune::cuda
