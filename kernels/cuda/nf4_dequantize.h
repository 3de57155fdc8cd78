// NF4 dequantization on the GPU, both levels in one kernel, into a bf16 workspace (the CUDA
// counterpart of ssmtune::cpu::nf4_dequantize in kernels/cpu/nf4.h, whose header has the math).
// A plain header: no CUDA types, so host code compiled by g++ can call it.
#pragma once
#include <cstdint>

namespace ssmtune::cuda {

// Copies the NF4 code and the signed dynamic map into constant memory; call once per device.
void nf4_upload_tables();

// out: numel bf16 values (as raw uint16 bits) on the device; all pointers device pointers.
// Runs on `stream` (a cudaStream_t, passed as void* to keep CUDA types out of this header).
void nf4_dequantize_bf16(const uint8_t* packed, const uint8_t* absmax_codes, const float* nested_absmax,
                         float nested_offset, int64_t numel, uint16_t* out, void* stream);

}  // namespace ssmtune::cuda
