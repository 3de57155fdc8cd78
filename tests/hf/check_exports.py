#!/usr/bin/env python3
"""Loads ssmtune's exports with transformers and PEFT and checks that they compute ssmtune's logits.

    check_exports.py MODEL_DIR PEFT_ADAPTER_DIR MERGED_DIR SSMTUNE_LOGITS

  MODEL_DIR + PEFT_ADAPTER_DIR   AutoModelForCausalLM.from_pretrained + PeftModel.from_pretrained (the
                                 `ssmtune export --format peft` of a checkpoint holding in_proj and x_proj
                                 adapters, the ones HF applies), against SSMTUNE_LOGITS' logits.peft
  MERGED_DIR                     AutoModelForCausalLM.from_pretrained (the `ssmtune export --format merged`
                                 of a checkpoint with adapters on all four projections), against logits.all

SSMTUNE_LOGITS is what tests/hf/hf_dump wrote: tokens [batch, length] and ssmtune's fp64 logits for
tokens[:, :-1]. MODEL_DIR must be the base model as ssmtune computes with it, i.e. with its projections
NF4 round-tripped (make_reference.py's model_nf4/): against the unquantized base the NF4 error would
dominate. HF runs in fp32 on the CPU. Exits 1 when an error is above its tolerance.
"""
import argparse
import glob
import os
import sys

import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

# max|HF - ssmtune| / max|ssmtune| over the logits. HF computes in fp32 and ssmtune in fp64 from the
# same fp32 weights, so fp32 rounding on HF's side is the floor (test_hf_reference.cpp measures it);
# a merged export stored in 16 bits adds the rounding of every merged weight (2^-9 relative in bf16,
# 2^-12 in f16), which the logits carry at about that size times a few.
TOLERANCE_FP32 = 2e-5
TOLERANCE_BY_DTYPE = {"F32": TOLERANCE_FP32, "BF16": 3e-2, "F16": 5e-3}


def relative_error(hf, ssmtune):
    return ((hf - ssmtune).abs().max() / ssmtune.abs().max()).item()


def merged_dtype(merged_dir):
    """The dtype the merged export stores its projections in."""
    for path in sorted(glob.glob(os.path.join(merged_dir, "*.safetensors"))):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                if name.endswith("mixer.in_proj.weight"):
                    return f.get_slice(name).get_dtype()
    sys.exit(f"{merged_dir}: no mixer.in_proj.weight in any *.safetensors")


@torch.no_grad()
def logits_of(model, inputs):
    return model.float().eval()(input_ids=inputs).logits.double()


def report(what, error, tolerance):
    verdict = "ok" if error <= tolerance else "ABOVE TOLERANCE"
    print(f"check-exports {what}: logits {error:.2e} of max|logit| (tolerance {tolerance:.0e}) {verdict}")
    return error <= tolerance


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("peft_adapter_dir")
    parser.add_argument("merged_dir")
    parser.add_argument("ssmtune_logits")
    parser.add_argument("--name", default="", help="a name for the printed lines (the config)")
    args = parser.parse_args()

    ours = load_file(args.ssmtune_logits)
    inputs = ours["tokens"][:, :-1].to(torch.int64)
    name = args.name or os.path.basename(os.path.dirname(os.path.abspath(args.ssmtune_logits)))
    ok = True

    base = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, args.peft_adapter_dir)
    ok &= report(f"{name} peft", relative_error(logits_of(with_adapter, inputs), ours["logits.peft"]), TOLERANCE_FP32)

    dtype = merged_dtype(args.merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(args.merged_dir, dtype=torch.float32)
    ok &= report(f"{name} merged ({dtype})", relative_error(logits_of(merged, inputs), ours["logits.all"]),
                 TOLERANCE_BY_DTYPE[dtype])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
