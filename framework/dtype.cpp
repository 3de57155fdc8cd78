#include "framework/dtype.h"

#include <array>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

namespace ssmtune {
namespace {

struct DTypeInfo {
  DType dtype;
  std::string_view name;
  size_t size;
  std::string_view torch_name;
};

constexpr std::array<DTypeInfo, 13> kDTypes{{
    {DType::BOOL, "BOOL", 1, "bool"},         {DType::U8, "U8", 1, "uint8"},     {DType::I8, "I8", 1, "int8"},
    {DType::I16, "I16", 2, "int16"},          {DType::U16, "U16", 2, "uint16"},  {DType::F16, "F16", 2, "float16"},
    {DType::BF16, "BF16", 2, "bfloat16"},     {DType::I32, "I32", 4, "int32"},   {DType::U32, "U32", 4, "uint32"},
    {DType::F32, "F32", 4, "float32"},        {DType::F64, "F64", 8, "float64"}, {DType::I64, "I64", 8, "int64"},
    {DType::U64, "U64", 8, "uint64"},
}};

const DTypeInfo& info(DType dtype) { return kDTypes[static_cast<size_t>(dtype)]; }

template <typename Out>
void convert(DType dtype, const void* src, size_t n, Out* dst) {
  switch (dtype) {
    case DType::F32: {
      const float* s = static_cast<const float*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = static_cast<Out>(s[i]);
      return;
    }
    case DType::F64: {
      const double* s = static_cast<const double*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = static_cast<Out>(s[i]);
      return;
    }
    case DType::BF16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = static_cast<Out>(bf16_to_float(s[i]));
      return;
    }
    case DType::F16: {
      const uint16_t* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = static_cast<Out>(f16_to_float(s[i]));
      return;
    }
    default:
      throw std::invalid_argument("convert_to_float: not a floating-point dtype: " +
                                  std::string(dtype_name(dtype)));
  }
}

}  // namespace

size_t dtype_size(DType dtype) { return info(dtype).size; }
std::string_view dtype_name(DType dtype) { return info(dtype).name; }
std::string_view torch_dtype_name(DType dtype) { return info(dtype).torch_name; }

bool is_floating_point(DType dtype) {
  return dtype == DType::F16 || dtype == DType::BF16 || dtype == DType::F32 || dtype == DType::F64;
}

std::optional<DType> dtype_from_name(std::string_view name) {
  for (const DTypeInfo& d : kDTypes)
    if (d.name == name) return d.dtype;
  return std::nullopt;
}

float bf16_to_float(uint16_t bits) {
  uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, 4);
  return value;
}

uint16_t float_to_bf16(float value) {
  uint32_t word;
  std::memcpy(&word, &value, 4);
  if ((word & 0x7f800000u) == 0x7f800000u && (word & 0x007fffffu))  // NaN stays a quiet NaN
    return static_cast<uint16_t>((word >> 16) | 0x0040u);
  word += 0x7fffu + ((word >> 16) & 1u);
  return static_cast<uint16_t>(word >> 16);
}

// IEEE binary16 by hand, as a cast to and from _Float16 converts (checked on every float against gcc's
// _Float16): clang before 15 has no _Float16 on x86-64, and the sanitizer and fuzz builds use clang.
float f16_to_float(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1fu, mantissa = bits & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return sign ? -magnitude : magnitude;
  }
  uint32_t word = sign | (mantissa << 13);
  word |= exponent == 0x1f ? 0x7f800000u | (mantissa ? 0x00400000u : 0u)  // infinity; NaN made quiet
                           : (exponent + 112) << 23;                       // rebias 15 -> 127
  float value;
  std::memcpy(&value, &word, 4);
  return value;
}

uint16_t float_to_f16(float value) {
  uint32_t word;
  std::memcpy(&word, &value, 4);
  const auto sign = static_cast<uint16_t>((word >> 16) & 0x8000u);
  const uint32_t magnitude = word & 0x7fffffffu;
  if (magnitude > 0x7f800000u)  // NaN: quiet, keeping the top of the payload
    return sign | 0x7e00u | static_cast<uint16_t>((magnitude >> 13) & 0x3ffu);
  if (magnitude >= 0x477ff000u) return sign | 0x7c00u;  // 65520 and up round to infinity
  if (magnitude >= 0x38800000u)  // normal in f16: round the mantissa to 10 bits, nearest even
    return sign | static_cast<uint16_t>((magnitude + 0xfffu + ((magnitude >> 13) & 1u) - 0x38000000u) >> 13);
  // Subnormal or zero in f16: |value| * 2^24 < 1024 is exact and rounds to the nearest even integer;
  // 1024 is the encoding of the smallest normal.
  return sign | static_cast<uint16_t>(std::nearbyint(std::fabs(value) * 0x1p24f));
}

void convert_to_float(DType dtype, const void* src, size_t n, float* dst) { convert(dtype, src, n, dst); }
void convert_to_double(DType dtype, const void* src, size_t n, double* dst) { convert(dtype, src, n, dst); }

void convert_from_double(const double* src, size_t n, DType dtype, void* dst) {
  switch (dtype) {
    case DType::F64: std::memcpy(dst, src, n * 8); return;
    case DType::F32:
      for (size_t i = 0; i < n; ++i) static_cast<float*>(dst)[i] = static_cast<float>(src[i]);
      return;
    case DType::BF16:
      for (size_t i = 0; i < n; ++i) static_cast<uint16_t*>(dst)[i] = float_to_bf16(static_cast<float>(src[i]));
      return;
    case DType::F16:
      for (size_t i = 0; i < n; ++i) static_cast<uint16_t*>(dst)[i] = float_to_f16(static_cast<float>(src[i]));
      return;
    default:
      throw std::invalid_argument("convert_from_double: not a floating-point dtype: " +
                                  std::string(dtype_name(dtype)));
  }
}

}  // namespace ssmtune
