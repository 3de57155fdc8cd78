// Element types as safetensors names them; the tensors of the model and the files share this list.
#pragma once
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace ssmtune {

enum class DType { BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64 };

size_t dtype_size(DType dtype);
std::string_view dtype_name(DType dtype);  // "F32", "BF16", ...
// torch's name, as config.json ("dtype") and bitsandbytes' quant_state write it: "float32", "bfloat16", ...
std::string_view torch_dtype_name(DType dtype);
std::optional<DType> dtype_from_name(std::string_view name);

bool is_floating_point(DType dtype);  // F16, BF16, F32, F64

// bf16 and fp16 <-> fp32, round to nearest even, as torch converts.
float bf16_to_float(uint16_t bits);
uint16_t float_to_bf16(float value);
float f16_to_float(uint16_t bits);
uint16_t float_to_f16(float value);

// Converts n elements of a floating-point dtype (F16, BF16, F32, F64) to float or double.
void convert_to_float(DType dtype, const void* src, size_t n, float* dst);
void convert_to_double(DType dtype, const void* src, size_t n, double* dst);
// Converts n doubles to a floating-point dtype, rounding to nearest even.
void convert_from_double(const double* src, size_t n, DType dtype, void* dst);

}  // namespace ssmtune
