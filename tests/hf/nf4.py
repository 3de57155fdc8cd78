"""NF4 with double-quantized block scales, written from the description of bitsandbytes' layout in
REFERENCE.md section 3 (not from ssmtune's C++), so that the tests check ssmtune's quantizer and its
files against an independent implementation.

Every step is fp32 arithmetic on torch CPU tensors, one rounding per operation, as the description has
it: the block scale is applied as a multiplication by the fp32 reciprocal of the absmax, a value goes to
the upper of two neighbouring codes only when it is strictly above their fp32 midpoint, and the
dequantization rounds map*absmax2, +offset and code*absmax separately. Two conventions the description
leaves open are fixed here as ssmtune fixes them (kernels/cpu/nf4.h says why): the offset is the mean of
the block absmax values taken in double and rounded to fp32, and an all-zero block is stored with the
code of 0.0 (nibble 7), so that it dequantizes to zeros.
"""
from fractions import Fraction
import struct

import torch

BLOCK = 64  # elements per absmax
NESTED_BLOCK = 256  # absmax values per second-level absmax

# The 16 NF4 code values, index 0..15 (REFERENCE.md section 3).
NF4_CODE = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0], dtype=torch.float32)
ZERO_NIBBLE = 7  # the code 0.0


def _float32_bits(value):
    return struct.unpack("<I", struct.pack("<f", value))[0]


def _float32_from_bits(bits):
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def nearest_float32(decimal):
    """The fp32 value nearest to a decimal literal, as a C compiler reads "<decimal>f" (correctly rounded,
    not through a double)."""
    exact = Fraction(decimal)
    guess = _float32_bits(float(decimal))
    candidates = [_float32_from_bits(b) for b in (guess - 1, guess, guess + 1)]
    return min(candidates, key=lambda c: abs(Fraction(c) - exact))


def nf4_thresholds():
    """The 15 decision thresholds between adjacent codes: bitsandbytes writes each midpoint as the shortest
    decimal of the exact (double) midpoint followed by f, so the threshold is that decimal read as fp32."""
    codes = NF4_CODE.double().tolist()
    return torch.tensor([nearest_float32(repr((a + b) / 2)) for a, b in zip(codes, codes[1:])],
                        dtype=torch.float32)


def signed_dynamic_map():
    """bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), fp32, sorted:
    for decade i = 0..6 the means of adjacent points of linspace(0.1, 1, 2**i + 1) (fp32) times 10**(i-6)
    (an fp32 multiply), with both signs; then 0 and 1. 127 + 127 + 2 = 256 entries."""
    values = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        decade = torch.tensor(10.0 ** (i - 6), dtype=torch.float32)
        values += (decade * means).tolist()
        values += (-(decade * means)).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


def _nearest_index(x, points):
    """Index of the entry of sorted `points` nearest to each x (fp32): above a midpoint (fp32, an add then
    a multiply by 0.5) means the upper entry; exactly on one, the even index of the two."""
    midpoints = (points[:-1] + points[1:]) * 0.5
    index = torch.searchsorted(midpoints, x, right=False)  # number of midpoints strictly below x
    on_midpoint = torch.zeros_like(x, dtype=torch.bool)
    inside = index < midpoints.numel()
    on_midpoint[inside] = midpoints[index[inside]] == x[inside]
    return torch.where(on_midpoint & (index % 2 == 1), index + 1, index)


def _pad_to(x, multiple):
    pad = (-x.numel()) % multiple
    return torch.cat([x, x.new_zeros(pad)]) if pad else x


def quantize(weight):
    """Quantizes a weight (any shape, flattened row-major, even element count) as bitsandbytes stores it.
    Returns a dict of the serialized tensors' contents: packed uint8 [n/2], absmax uint8 [blocks],
    nested_absmax fp32 [ceil(blocks/256)], nested_offset (a float)."""
    flat = weight.detach().to(torch.float32).reshape(-1).cpu()
    n = flat.numel()
    assert n % 2 == 0, "NF4 packs two elements per byte"
    blocks = (n + BLOCK - 1) // BLOCK
    # A partial last block is padded with zeros, which change neither its absmax nor its other codes.
    grid = _pad_to(flat, BLOCK).view(blocks, BLOCK)
    absmax = grid.abs().amax(dim=1)
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    scaled = grid * inverse[:, None]
    nibbles = torch.searchsorted(nf4_thresholds(), scaled.reshape(-1), right=False)  # thresholds strictly below
    nibbles = nibbles.view(blocks, BLOCK)
    nibbles[absmax == 0] = ZERO_NIBBLE
    nibbles = nibbles.reshape(-1)[:n].to(torch.uint8)
    packed = (nibbles[0::2] << 4) | nibbles[1::2]  # the even element in the high nibble

    offset = float(torch.tensor(absmax.double().mean().item(), dtype=torch.float32))
    centred = absmax - torch.tensor(offset, dtype=torch.float32)
    nested_blocks = (blocks + NESTED_BLOCK - 1) // NESTED_BLOCK
    centred_grid = _pad_to(centred, NESTED_BLOCK).view(nested_blocks, NESTED_BLOCK)
    nested_absmax = centred_grid.abs().amax(dim=1)
    nested_inverse = torch.where(nested_absmax > 0, 1.0 / nested_absmax, torch.zeros_like(nested_absmax))
    normalized = (centred_grid * nested_inverse[:, None]).reshape(-1)[:blocks]
    codes = _nearest_index(normalized, signed_dynamic_map())
    # A nested block with nothing to scale (absmax2 = 0) dequantizes to the offset whatever its codes.
    codes[(nested_absmax == 0).repeat_interleave(NESTED_BLOCK)[:blocks]] = 0
    return {"packed": packed, "absmax": codes.to(torch.uint8), "nested_absmax": nested_absmax,
            "nested_offset": offset}


def dequantize(packed, absmax_codes, nested_absmax, nested_offset, shape,
               quant_map=None, nested_quant_map=None):
    """The fp32 weight of the given shape: absmax_b = map[q_b] * absmax2[b/256] + offset;
    w_i = NF4[nibble_i] * absmax_{i/64}. The maps default to NF4_CODE and signed_dynamic_map()."""
    quant_map = NF4_CODE if quant_map is None else quant_map
    nested_quant_map = signed_dynamic_map() if nested_quant_map is None else nested_quant_map
    packed = packed.reshape(-1).to(torch.int64)
    nibbles = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)
    n = nibbles.numel()
    blocks = absmax_codes.numel()
    scaled = nested_quant_map[absmax_codes.to(torch.int64)] * nested_absmax.repeat_interleave(NESTED_BLOCK)[:blocks]
    block_absmax = scaled + torch.tensor(nested_offset, dtype=torch.float32)
    values = quant_map[nibbles] * block_absmax.repeat_interleave(BLOCK)[:n]
    return values.view(shape)


def roundtrip(weight):
    """What a model computes with after NF4 quantization: dequantize(quantize(weight)), fp32."""
    q = quantize(weight)
    return dequantize(q["packed"], q["absmax"], q["nested_absmax"], q["nested_offset"], tuple(weight.shape))
