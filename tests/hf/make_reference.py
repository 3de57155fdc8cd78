#!/usr/bin/env python3
"""Reference outputs of Hugging Face transformers and PEFT themselves, for the tests in tests/hf.

    make_reference.py OUTDIR [--configs tiny tiny_untied tiny_falcon m130] [--device cpu|cuda] [--fixtures]

For each config, a randomly initialised model (torch.manual_seed) goes into OUTDIR/<config>/:
  model/          save_pretrained, fp32 safetensors; "tiny" also as model_bf16/ (every tensor bf16) and
                  model_sharded/ (fp32 in several shards with model.safetensors.index.json)
  model_nf4/      the same model with each projection replaced by its NF4 round trip (fp32), for
                  check_exports.py; not written with --fixtures
  adapter/        a PEFT LoRA adapter (PEFT's own save_pretrained) on in_proj and x_proj
  reference.json  where and with which versions it was made
  reference.safetensors, F32 unless said:
    tokens                   I32 [2, 33]: one batch; HF logits at position t predict token t+1
    adapter.<PEFT key>       the dt_proj and out_proj adapters (see "LoRA" below)
    <v>logits                [2, 33, vocab] of the model with all four adapters
    <v>loss                  [] mean cross-entropy over the 2*32 shifted positions (labels = tokens)
    <v>grad.<PEFT key>       d loss / d every lora_A and lora_B, all four projections
  for the variants <v> = "" (the fp32 weights as saved), "nf4." (every projection weight replaced by its
  NF4 round trip, nf4.py: what ssmtune computes with after quantizing on load) and, for "tiny",
  "bf16.nf4." (every tensor rounded to bf16 as model_bf16/ stores it, then the NF4 round trip).

Random initialisation: HF initialises norm weights, D and the conv bias to constants and A_log to the
same row for every channel, which would hide a weight that is skipped or transposed; so every parameter
is drawn here, from the distributions randomize() lists.

LoRA (r=4, alpha=8, dropout 0, scale 2): A as PEFT initialises it (U(-1/sqrt(in), 1/sqrt(in))), B drawn
non-zero so that every gradient is non-zero. transformers 5.17 computes dt_proj as
`self.dt_proj.weight @ x` (so a PEFT adapter on dt_proj changes nothing) and PEFT refuses out_proj on
Mamba models; so PEFT carries the in_proj and x_proj adapters, and the dt_proj and out_proj adapters are
merged into those weights, W + scale*B@A, whose gradient G (from HF's own backward) gives
dA = scale*B^T G and dB = scale*G A^T.

Everything runs in fp32: on the CPU by default (deterministic: the committed fixtures), or on CUDA with
TF32 off.
"""
import argparse
import json
import math
import os
import shutil
import sys

import torch
import transformers
import peft
from safetensors.torch import save_file
from transformers import FalconMambaConfig, FalconMambaForCausalLM, MambaConfig, MambaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nf4  # noqa: E402

BATCH, LENGTH = 2, 33
LORA_RANK, LORA_ALPHA = 4, 8
LORA_SCALE = LORA_ALPHA / LORA_RANK
PEFT_TARGETS = ["in_proj", "x_proj"]
MERGED_TARGETS = ["dt_proj", "out_proj"]
PROJECTIONS = PEFT_TARGETS + MERGED_TARGETS

# hidden 64 with dt_rank 5 (not a multiple of 64, so x_proj's 37-row output and dt_proj's 5 columns
# cut NF4 blocks across rows); m130 is the mamba-130m shape (dt_rank "auto" = 48).
CONFIGS = {
    "tiny": dict(falcon=False, hidden_size=64, num_hidden_layers=2, state_size=16, time_step_rank=5,
                 vocab_size=96, tie_word_embeddings=True, seed=1),
    "tiny_untied": dict(falcon=False, hidden_size=64, num_hidden_layers=2, state_size=16, time_step_rank=5,
                        vocab_size=96, tie_word_embeddings=False, seed=2),
    "tiny_falcon": dict(falcon=True, hidden_size=64, num_hidden_layers=2, state_size=16, time_step_rank=5,
                        vocab_size=96, tie_word_embeddings=False, seed=3),
    "m130": dict(falcon=False, hidden_size=768, num_hidden_layers=24, state_size=16, time_step_rank="auto",
                 vocab_size=50280, tie_word_embeddings=True, seed=4),
}
FIXTURE_CONFIGS = ["tiny", "tiny_untied", "tiny_falcon"]
LOADER_VARIANTS_CONFIG = "tiny"  # the one also saved in bf16 and sharded
SHARD_SIZE = "64KB"  # splits tiny's 0.28 MB into several shards


def make_model(spec):
    fields = {k: v for k, v in spec.items() if k not in ("falcon", "seed")}
    fields.update(expand=2, conv_kernel=4, use_bias=False, use_conv_bias=True, residual_in_fp32=True)
    if spec["falcon"]:
        return FalconMambaForCausalLM(FalconMambaConfig(mixer_rms_eps=1e-6, **fields))
    return MambaForCausalLM(MambaConfig(**fields))


@torch.no_grad()
def randomize(model):
    """Draws every parameter (names as save_pretrained writes them), in named_parameters order."""
    c = model.config
    n_layer = c.num_hidden_layers

    def uniform(p, bound):
        p.uniform_(-bound, bound)

    for name, p in model.named_parameters():
        leaf = ".".join(name.split(".")[-2:])  # "in_proj.weight", "mixer.A_log", ...
        if name.endswith("embeddings.weight") or name == "lm_head.weight":
            # std 1/sqrt(hidden): logits of about unit spread for a unit-RMS final state at any width
            # (HF's 0.1 gives mamba-130m a tied head that scores the input token itself about 77 above
            # the rest: a saturated softmax whose gradients no longer depend on most logits).
            p.normal_(0.0, c.hidden_size ** -0.5)
        elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
            p.uniform_(0.8, 1.2)  # 1 in HF: perturbed so a skipped norm weight shows
        elif leaf == "in_proj.weight":
            uniform(p, 1 / math.sqrt(c.hidden_size))
        elif leaf == "x_proj.weight":
            uniform(p, 1 / math.sqrt(c.intermediate_size))
        elif leaf == "dt_proj.weight":
            uniform(p, c.time_step_rank ** -0.5)
        elif leaf == "out_proj.weight":
            uniform(p, 1 / math.sqrt(c.intermediate_size) / math.sqrt(n_layer))
        elif leaf in ("conv1d.weight", "conv1d.bias"):
            uniform(p, 1 / math.sqrt(c.conv_kernel))  # the bias is 0 in HF
        elif leaf == "dt_proj.bias":  # softplus^-1 of dt ~ exp(U(log 1e-3, log 0.1)), as HF
            dt = torch.exp(torch.rand(p.shape) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            p.copy_(dt + torch.log(-torch.expm1(-dt)))
        elif leaf == "mixer.A_log":  # log(n+1) in HF, the same for every channel
            n = torch.arange(1, c.state_size + 1, dtype=torch.float32)
            p.copy_(torch.log(n)[None, :] + torch.empty(p.shape).uniform_(-0.2, 0.2))
        elif leaf == "mixer.D":
            p.uniform_(0.5, 1.5)  # 1 in HF
        else:
            raise ValueError(f"no initialisation for parameter {name}")


def peft_key(layer, projection, matrix):
    return f"base_model.model.backbone.layers.{layer}.mixer.{projection}.lora_{matrix}.weight"


def draw_lora_B(shape):
    # Non-zero (PEFT starts B at 0, which hides A's gradient), small enough that the adapters change
    # the outputs by a fraction of the base weights' effect.
    return torch.randn(shape) * 0.05


def make_merged_adapters(model):
    """The dt_proj and out_proj adapters: {peft key: tensor}, A as PEFT draws it, B non-zero."""
    adapters = {}
    for i, layer in enumerate(model.backbone.layers):
        for proj in MERGED_TARGETS:
            out_features, in_features = getattr(layer.mixer, proj).weight.shape
            a = torch.empty(LORA_RANK, in_features).uniform_(-1 / math.sqrt(in_features), 1 / math.sqrt(in_features))
            adapters[peft_key(i, proj, "A")] = a
            adapters[peft_key(i, proj, "B")] = draw_lora_B((out_features, LORA_RANK))
    return adapters


def is_projection(name):
    return any(name.endswith(f"mixer.{proj}.weight") for proj in PROJECTIONS)


def nf4_weights(weights):
    """The base weights with every projection replaced by its NF4 round trip."""
    return {k: nf4.roundtrip(v) if is_projection(k) else v for k, v in weights.items()}


def bf16_weights(weights):
    return {k: v.to(torch.bfloat16).to(torch.float32) for k, v in weights.items()}


class Reference:
    """The HF model with PEFT adapters on in_proj and x_proj and merged ones on dt_proj and out_proj."""

    def __init__(self, model, merged_adapters, device):
        # The Parameter objects of the base model; PEFT wraps the modules but keeps these.
        self.base = dict(model.named_parameters())
        self.merged = merged_adapters
        self.n_layer = model.config.num_hidden_layers
        self.peft_model = peft.get_peft_model(
            model, peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                   target_modules=PEFT_TARGETS))
        with torch.no_grad():
            for name, p in self.peft_model.named_parameters():
                if ".lora_B." in name:
                    p.copy_(draw_lora_B(p.shape))
        self.peft_model.to(device).eval()  # eval: dropout is 0 anyway; no training-only branches
        self.device = device

    def run(self, weights, tokens):
        """Logits, loss and adapter gradients with the given fp32 base weights ({save_pretrained name:
        tensor})."""
        with torch.no_grad():
            for name, p in self.base.items():
                w = weights[name]
                proj = name.split(".")[-2]
                if proj in MERGED_TARGETS and is_projection(name):
                    layer = int(name.split(".")[2])
                    a, b = self.merged[peft_key(layer, proj, "A")], self.merged[peft_key(layer, proj, "B")]
                    w = w + LORA_SCALE * (b @ a)
                p.copy_(w.to(self.device))
                p.requires_grad_(is_projection(name) and proj in MERGED_TARGETS)
        self.peft_model.zero_grad(set_to_none=True)
        out = self.peft_model(input_ids=tokens.to(self.device), labels=tokens.to(self.device))
        out.loss.backward()
        grads = {}
        for name, p in self.peft_model.named_parameters():
            if ".lora_" in name:
                grads[name.replace(".default.weight", ".weight")] = p.grad.detach().cpu()
        for name, p in self.base.items():
            if p.requires_grad:
                layer, proj = int(name.split(".")[2]), name.split(".")[-2]
                g = p.grad.detach().cpu().double()
                a = self.merged[peft_key(layer, proj, "A")].double()
                b = self.merged[peft_key(layer, proj, "B")].double()
                grads[peft_key(layer, proj, "A")] = (LORA_SCALE * b.T @ g).float()
                grads[peft_key(layer, proj, "B")] = (LORA_SCALE * g @ a.T).float()
                p.requires_grad_(False)
        expected = 2 * len(PROJECTIONS) * self.n_layer
        assert len(grads) == expected, f"{len(grads)} adapter gradients, expected {expected}"
        for key, g in grads.items():
            assert g.abs().max() > 0, f"the gradient of {key} is zero: the reference would not test it"
        return out.logits.detach().float().cpu(), out.loss.detach().float().cpu(), grads


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def make_config(outdir, name, spec, device, fixtures):
    torch.manual_seed(spec["seed"])
    model = make_model(spec).float()
    randomize(model)
    merged = make_merged_adapters(model)
    tokens = torch.randint(0, spec["vocab_size"], (BATCH, LENGTH), dtype=torch.int64)
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}

    target = os.path.join(outdir, name)
    shutil.rmtree(target, ignore_errors=True)
    os.makedirs(target)
    model.save_pretrained(os.path.join(target, "model"))
    variants = {"": weights, "nf4.": nf4_weights(weights)}
    if name == LOADER_VARIANTS_CONFIG:
        model.save_pretrained(os.path.join(target, "model_sharded"), max_shard_size=SHARD_SIZE)
        # named_parameters: a tied head is the embedding, stored once as save_pretrained stores it.
        model.save_pretrained(os.path.join(target, "model_bf16"),
                              state_dict={k: v.detach().to(torch.bfloat16) for k, v in model.named_parameters()})
        variants["bf16.nf4."] = nf4_weights(bf16_weights(weights))
    if not fixtures:
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(variants["nf4."][k])
        model.save_pretrained(os.path.join(target, "model_nf4"))

    reference = Reference(model, merged, device)
    reference.peft_model.save_pretrained(os.path.join(target, "adapter"))
    tensors = {"tokens": tokens.to(torch.int32)}
    tensors.update({"adapter." + k: v for k, v in merged.items()})
    results = {}
    for prefix, variant_weights in variants.items():
        logits, loss, grads = reference.run(variant_weights, tokens)
        results[prefix] = (logits, loss)
        tensors[prefix + "logits"] = logits
        tensors[prefix + "loss"] = loss.reshape(())
        tensors.update({prefix + "grad." + k: v for k, v in grads.items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(target, "reference.safetensors"),
              metadata={"format": "pt"})
    # Provenance beside it, not in the safetensors metadata, whose key order varies from run to run.
    provenance = {"config": name, "seed": spec["seed"], "device": device, "torch": torch.__version__,
                  "transformers": transformers.__version__, "peft": peft.__version__}
    with open(os.path.join(target, "reference.json"), "w") as f:
        json.dump(provenance, f, indent=2, sort_keys=True)
        f.write("\n")

    (logits, loss), (nf4_logits, nf4_loss) = results[""], results["nf4."]
    print(f"{name}: loss {loss.item():.6f}, NF4 loss {nf4_loss.item():.6f}; NF4 round trip changes the logits by "
          f"{relative_error(nf4_logits, logits):.3e} of max|logit| and the loss by "
          f"{abs(nf4_loss.item() - loss.item()) / loss.item():.3e} (relative)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("outdir")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--fixtures", action="store_true",
                        help="only what the committed CPU test reads (no model_nf4/)")
    args = parser.parse_args()
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    os.makedirs(args.outdir, exist_ok=True)
    for name in args.configs:
        make_config(args.outdir, name, CONFIGS[name], args.device, args.fixtures)


if __name__ == "__main__":
    main()
