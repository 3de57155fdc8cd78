#!/usr/bin/env python3
"""Reads an `ssmtune quantize` output as bitsandbytes-serialized NF4 (REFERENCE.md section 3), with a
reader written from that description (nf4.py), and checks it three ways.

    nf4_reader.py QUANTIZED_DIR SOURCE_DIR MERGED_ZERO_DIR

  1. The format: config.json's quantization_config; for every projection the six tensors with their
     dtypes and shapes, quant_map = the NF4 code and nested_quant_map = bitsandbytes' signed dynamic map
     (bit for bit), the quant_state JSON (nf4, blocks of 64, nested blocks of 256, the weight's shape).
  2. The bytes: nf4.py's quantization of SOURCE_DIR's weights gives the same packed codes, absmax codes,
     nested absmax and offset; every other tensor is SOURCE_DIR's, dtype and bytes.
  3. The values: nf4.py's dequantization of the file equals, bit for bit, ssmtune's own dequantization,
     which MERGED_ZERO_DIR holds: `ssmtune export --format merged --dtype f32` of a checkpoint whose
     adapters are all zero on the quantized base is W' = dequantize(NF4(W)) + 0, rounded once to fp32.
Exits 1 on the first kind of failure, naming the tensor.
"""
import argparse
import json
import os
import struct
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nf4  # noqa: E402

PROJECTIONS = ("in_proj", "x_proj", "dt_proj", "out_proj")
COMPONENTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4")


class Failure(Exception):
    pass


def expect(condition, message):
    if not condition:
        raise Failure(message)


def read_model(directory):
    """Every tensor of a model directory: model.safetensors, or the shards its index lists."""
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    tensors = {}
    for shard in shards:
        tensors.update(load_file(os.path.join(directory, shard)))
    return tensors


def float32_of(value):
    return struct.unpack("<f", struct.pack("<f", value))[0]


def check_quantization_config(directory):
    with open(os.path.join(directory, "config.json")) as f:
        q = json.load(f).get("quantization_config")
    expect(q is not None, f"{directory}/config.json: no quantization_config")
    for key, value in (("quant_method", "bitsandbytes"), ("load_in_4bit", True), ("bnb_4bit_quant_type", "nf4"),
                       ("bnb_4bit_use_double_quant", True)):
        expect(q.get(key) == value, f"{directory}/config.json: quantization_config.{key} is {q.get(key)!r}, "
                                    f"expected {value!r}")
    expect(q.get("bnb_4bit_quant_storage", "uint8") == "uint8",
           f"{directory}/config.json: bnb_4bit_quant_storage {q.get('bnb_4bit_quant_storage')!r}, expected uint8")


def read_projection(tensors, name, shape):
    """The serialized NF4 weight `name` ([out, in]) as nf4.py's quantize() returns it, its format checked."""
    numel = shape[0] * shape[1]
    blocks = (numel + nf4.BLOCK - 1) // nf4.BLOCK
    nested_blocks = (blocks + nf4.NESTED_BLOCK - 1) // nf4.NESTED_BLOCK
    expected = {name: (torch.uint8, [numel // 2, 1]), name + ".absmax": (torch.uint8, [blocks]),
                name + ".quant_map": (torch.float32, [16]), name + ".nested_absmax": (torch.float32, [nested_blocks]),
                name + ".nested_quant_map": (torch.float32, [256])}
    for key, (dtype, tensor_shape) in expected.items():
        expect(key in tensors, f"missing tensor {key}")
        expect(tensors[key].dtype == dtype and list(tensors[key].shape) == tensor_shape,
               f"{key}: {tensors[key].dtype} {list(tensors[key].shape)}, expected {dtype} {tensor_shape}")
    expect(torch.equal(tensors[name + ".quant_map"].view(torch.int32), nf4.NF4_CODE.view(torch.int32)),
           f"{name}.quant_map is not the NF4 code")
    expect(torch.equal(tensors[name + ".nested_quant_map"].view(torch.int32),
                       nf4.signed_dynamic_map().view(torch.int32)),
           f"{name}.nested_quant_map is not bitsandbytes' signed dynamic map")
    state_key = name + ".quant_state.bitsandbytes__nf4"
    expect(state_key in tensors and tensors[state_key].dtype == torch.uint8, f"missing U8 tensor {state_key}")
    state = json.loads(bytes(tensors[state_key].tolist()).decode("utf-8"))
    for key, value in (("quant_type", "nf4"), ("blocksize", nf4.BLOCK), ("shape", list(shape)),
                       ("nested_blocksize", nf4.NESTED_BLOCK), ("nested_dtype", "float32")):
        expect(state.get(key) == value, f"{state_key}: {key} is {state.get(key)!r}, expected {value!r}")
    expect(isinstance(state.get("nested_offset"), (int, float)), f"{state_key}: no numeric nested_offset")
    return {"packed": tensors[name].reshape(-1), "absmax": tensors[name + ".absmax"],
            "nested_absmax": tensors[name + ".nested_absmax"], "nested_offset": float32_of(state["nested_offset"])}


def is_projection(name):
    return any(name.endswith(f"mixer.{p}.weight") for p in PROJECTIONS)


def check(quantized_dir, source_dir, merged_dir):
    check_quantization_config(quantized_dir)
    quantized, source, merged = read_model(quantized_dir), read_model(source_dir), read_model(merged_dir)
    projections = [name for name in source if is_projection(name)]
    expect(projections, f"{source_dir}: no projection weights")
    accounted = set()
    for name in projections:
        shape = tuple(source[name].shape)
        stored = read_projection(quantized, name, shape)
        accounted.update([name] + [f"{name}.{c}" for c in COMPONENTS])

        ours = nf4.quantize(source[name].float())
        for part in ("packed", "absmax", "nested_absmax"):
            expect(torch.equal(stored[part], ours[part]), f"{name}: {part} differs from nf4.py's quantization "
                                                           f"of {source_dir}'s weight")
        expect(stored["nested_offset"] == ours["nested_offset"],
               f"{name}: nested_offset {stored['nested_offset']!r}, nf4.py has {ours['nested_offset']!r}")

        expect(merged[name].dtype == torch.float32, f"{merged_dir}: {name} is {merged[name].dtype}; the check needs "
                                                    f"a merged export in f32")
        values = nf4.dequantize(stored["packed"], stored["absmax"], stored["nested_absmax"], stored["nested_offset"],
                                shape, quantized[name + ".quant_map"], quantized[name + ".nested_quant_map"])
        mismatch = (values != merged[name]).sum().item()
        expect(mismatch == 0, f"{name}: {mismatch} of {values.numel()} dequantized values differ from ssmtune's "
                              f"(max difference {(values - merged[name]).abs().max().item():.3e})")

    for name, tensor in source.items():
        if name in accounted:
            continue
        expect(name in quantized, f"{quantized_dir}: {name} is missing")
        expect(quantized[name].dtype == tensor.dtype and torch.equal(quantized[name], tensor),
               f"{quantized_dir}: {name} is not {source_dir}'s tensor")
        accounted.add(name)
    extra = sorted(set(quantized) - accounted)
    expect(not extra, f"{quantized_dir}: tensors that are neither the source's nor NF4 state: {extra[:5]}")
    return len(projections)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("quantized_dir")
    parser.add_argument("source_dir")
    parser.add_argument("merged_zero_dir")
    parser.add_argument("--name", default="", help="a name for the printed line (the config)")
    args = parser.parse_args()
    name = args.name or os.path.basename(os.path.abspath(args.quantized_dir))
    try:
        count = check(args.quantized_dir, args.source_dir, args.merged_zero_dir)
    except Failure as failure:
        print(f"nf4-reader {name}: FAILED: {failure}")
        sys.exit(1)
    print(f"nf4-reader {name}: {count} projections: format as described, bytes equal to nf4.py's quantization of "
          f"the source, dequantized values equal to ssmtune's bit for bit")


if __name__ == "__main__":
    main()
