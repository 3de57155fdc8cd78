// NF4 quantization with double-quantized block scales, in the byte layout bitsandbytes stores in Hugging
// Face checkpoints (REFERENCE.md §3). The weight is flattened row-major and cut into blocks of 64 (the
// last may be shorter; a block may span rows):
//   A_b      = max_i |w_i| over block b                          (fp32)
//   nibble_i = index of the NF4 code nearest to w_i / A_b          (ties by bitsandbytes' threshold tree)
//   packed[j] = nibble_{2j} << 4 | nibble_{2j+1}                   (even element in the high nibble)
// Double quantization of the scales, in blocks of 256 scales:
//   offset   = mean_b A_b;   v_b = A_b - offset
//   A2_c     = max |v_b| over nested block c
//   q_b      = index of the signed dynamic map entry nearest to v_b / A2_{b/256}
// Dequantization, both levels, every product and sum rounded to fp32 as bitsandbytes rounds it:
//   A'_b = map[q_b] * A2_{b/256} + offset;   w'_i = NF4[nibble_i] * A'_{i/64}
#pragma once
#include <cstdint>

namespace ssmtune::cpu {

inline constexpr int64_t kNf4BlockSize = 64;         // elements per absmax
inline constexpr int64_t kNf4NestedBlockSize = 256;  // absmax values per second-level absmax

// The 16 NF4 code values, index 0..15 (bitsandbytes' quant_map for "nf4").
extern const float kNf4Code[16];

// The 256 sorted fp32 entries of bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7,
// total_bits=8), the nested_quant_map of a double-quantized checkpoint. Built once, thread-safe.
const float* signed_dynamic_map();

struct Nf4Sizes {
  int64_t numel, packed_bytes, blocks, nested_blocks;
};

// numel must be even (two elements per byte); the last block may be partial.
Nf4Sizes nf4_sizes(int64_t numel);

// The 15 ascending decision thresholds between adjacent NF4 codes (fp32 midpoints as bitsandbytes
// writes them; nf4.cpp says where they differ from the exact midpoints).
extern const float kNf4Thresholds[15];

// Nibble for a value already divided by its block's absmax: bitsandbytes' dQuantizeNF4 tree, which
// sends x to the upper code only when x is strictly above the fp32 midpoint between the two codes,
// i.e. the number of kNf4Thresholds strictly below x (0 for NaN).
uint8_t nf4_encode(float normalized);

// Index into signed_dynamic_map() for a value already divided by its block's absmax: the binary search
// of bitsandbytes' dQuantize (non-stochastic), which breaks an exact fp32 midpoint tie towards the even
// index.
uint8_t dynamic_map_encode(float normalized);

// The offset of the double quantization, mean_b A_b over `blocks` block absmax values: summed in
// double over a fixed split of the blocks into 64 ranges, then over the ranges in order, and rounded
// to fp32. The fixed order makes it independent of the thread count; the GPU quantizer calls this on
// the absmax values it computed, so both give the same offset.
float nf4_absmax_mean(const float* block_absmax, int64_t blocks);

// Quantizes w (row-major flattened, numel even) with double quantization of the absmax. Outputs:
// packed [numel/2], absmax_codes [blocks], nested_absmax [nested_blocks], *nested_offset.
// Holds the block absmax values (blocks floats) between its two passes. The result does not depend on
// the thread count.
void nf4_quantize(const float* w, int64_t numel, uint8_t* packed, uint8_t* absmax_codes, float* nested_absmax,
                  float* nested_offset);

// Inverse of nf4_quantize (formula above), computed in fp32 and then converted to T, so float and
// double outputs hold the same values. Instantiated for float and double.
template <typename T>
void nf4_dequantize(const uint8_t* packed, const uint8_t* absmax_codes, const float* nested_absmax, float nested_offset,
                    int64_t numel, T* out);

}  // namespace ssmtune::cpu
