// Checkpoints pre-quantized by bitsandbytes, as transformers saves a model loaded with load_in_4bit
// (REFERENCE.md §3): each 4-bit Linear `<m>` becomes
//   <m>.weight                                 U8  [numel/2, 1]  packed NF4, even element high
//   <m>.weight.absmax                          U8  [blocks]      double-quantized block absmax
//   <m>.weight.quant_map                       F32 [16]          the NF4 code
//   <m>.weight.nested_absmax                   F32 [nested blocks]
//   <m>.weight.nested_quant_map                F32 [256]         bitsandbytes' signed dynamic map
//   <m>.weight.quant_state.bitsandbytes__nf4   U8  [bytes]       UTF-8 JSON: quant_type, blocksize,
//                                                                dtype, shape, nested_blocksize,
//                                                                nested_dtype, nested_offset
// and config.json carries quantization_config. We support exactly what Nf4Weight holds and our
// quantizer writes: NF4, blocks of 64, double quantization in blocks of 256 with the signed dynamic map,
// uint8 storage. Anything else (8-bit, FP4, no double quantization, another code) is refused with the
// file and key or tensor at fault: without double quantization the absmax is one fp32 per block,
// which Nf4Weight has no place for, and another code or map would dequantize to other values.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "framework/dtype.h"
#include "framework/safetensors.h"

namespace ssmtune {

class ShardedSafetensors;

// An NF4 weight on the host, laid out as Nf4Weight and bitsandbytes lay it out.
struct Nf4HostWeight {
  std::vector<uint8_t> packed;        // numel/2 bytes
  std::vector<uint8_t> absmax_codes;  // one per 64-block
  std::vector<float> nested_absmax;   // one per 256 blocks
  float nested_offset = 0;
};

// cpu::nf4_quantize of w[numel] into a new host weight.
Nf4HostWeight nf4_quantize_host(const float* w, int64_t numel);

// Checks config.json's quantization_config: quant_method "bitsandbytes", load_in_4bit true,
// bnb_4bit_quant_type "nf4", bnb_4bit_use_double_quant true, bnb_4bit_quant_storage "uint8" when
// given (missing keys take BitsAndBytesConfig's defaults, which are fp4 without double quantization).
// An Error names `source`, the key and what we support.
void check_bnb_nf4_config(const nlohmann::json& quantization_config, const std::string& source);

// quantization_config as transformers' BitsAndBytesConfig.to_dict() writes it for NF4 with double
// quantization, bfloat16 compute and uint8 storage.
nlohmann::json bnb_nf4_config();

// "<weight>.quant_state.bitsandbytes__nf4", whose presence marks a stored NF4 weight.
std::string bnb_nf4_state_name(const std::string& weight_name);
// Whether the tensors hold `weight_name` as bitsandbytes 4-bit (NF4 or FP4) state.
bool is_bnb_4bit(const ShardedSafetensors& tensors, const std::string& weight_name);
// The five tensors bitsandbytes stores beside "<m>.weight".
std::vector<std::string> bnb_nf4_component_names(const std::string& weight_name);

// Reads `weight_name` of shape [out, in] and checks every part against the layout above and our
// NF4 code and signed dynamic map; an Error names the shard and tensor, or the quant_state key, and
// what was expected.
Nf4HostWeight read_bnb_nf4(const ShardedSafetensors& tensors, const std::string& weight_name, int64_t out,
                           int64_t in);

// The six tensors bitsandbytes writes for a weight of shape [out, in] that was `original_dtype`
// before quantization (quant_state's "dtype"), "<weight>" first. The quant_state JSON needs the
// (finite) offset now; the packed data is taken from `get` when each tensor is written, so a caller can
// quantize the weight then rather than hold every weight of a model quantized at once.
std::vector<PlannedTensor> bnb_nf4_tensors(const std::string& weight_name, int64_t out, int64_t in,
                                           DType original_dtype, float nested_offset,
                                           std::function<std::shared_ptr<const Nf4HostWeight>()> get);

}  // namespace ssmtune
