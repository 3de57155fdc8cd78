#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets under tests/fuzz/corpus/<target>/: small valid inputs and
near-valid ones that each spoil one thing, so that fuzzing starts next to every check of the readers.
Deterministic: rerun after changing it (files it did not write, such as the inputs of past findings,
stay).

Usage: python3 tests/fuzz/make_corpus.py [--ssmtune BUILD/recipes/ssmtune]
  --ssmtune: also writes raw HDF5 seeds for token_dataset with `ssmtune demo-data` (committed ones stay
  otherwise).
"""
import argparse
import json
import pathlib
import struct
import subprocess
import tempfile

CORPUS = pathlib.Path(__file__).resolve().parent / "corpus"


def write(target, name, data):
    path = CORPUS / target / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


# --- safetensors: 8-byte little-endian header length, JSON header, data -----------------------------
def safetensors(header, data=b"", declared=None):
    text = json.dumps(header, separators=(",", ":")).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(text) if declared is None else declared) + text + data


def tensors_file(entries, metadata=None):
    """entries: [(name, dtype, shape, raw bytes)], packed back to back."""
    header, data = {}, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return safetensors(header, data)


def safetensors_seeds():
    f32 = struct.pack("<6f", 1.5, -2, 3.25, 0, -0.5, 7)
    write("safetensors", "valid_f32_bf16", tensors_file(
        [("a.weight", "F32", [2, 3], f32), ("b", "BF16", [3], bytes([0xC0, 0x3F, 0x10, 0xC0, 0x40, 0x40]))],
        {"format": "pt"}))
    write("safetensors", "valid_every_dtype", tensors_file([
        ("f16", "F16", [2], struct.pack("<2e", 1.0, -2.5)), ("f64", "F64", [1, 1], struct.pack("<d", 1 / 3)),
        ("i64", "I64", [2], struct.pack("<2q", -1, 1 << 40)), ("u8", "U8", [3], b"\x01\x02\x03"),
        ("scalar", "F32", [], struct.pack("<f", 4)), ("empty", "F32", [0, 5], b""),
        ("misaligned", "F32", [1], struct.pack("<f", 9))]))
    write("safetensors", "no_tensors", safetensors({"__metadata__": {"k": "v"}}))
    one = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    write("safetensors", "end_past_data", safetensors({"t": one}, b"\0" * 4))
    write("safetensors", "hole", safetensors({"t": one}, b"\0" * 12))
    write("safetensors", "overlap", safetensors({"t": one, "u": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
                                                b"\0" * 8))
    write("safetensors", "shape_mismatch", safetensors({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
                                                       b"\0" * 8))
    write("safetensors", "terabyte_tensor", safetensors(
        {"t": {"dtype": "F32", "shape": [500000, 500000], "data_offsets": [0, 1000000000000]}}, b"\0" * 8))
    write("safetensors", "shape_overflow", safetensors(
        {"t": {"dtype": "F64", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}}))
    write("safetensors", "bad_dtype", safetensors({"t": {"dtype": "F8", "shape": [1], "data_offsets": [0, 1]}}, b"\0"))
    write("safetensors", "negative_dim", safetensors({"t": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}}, b"\0"))
    write("safetensors", "metadata_not_string", safetensors({"__metadata__": {"k": 1}}))
    write("safetensors", "header_past_end", safetensors({"t": one}, b"\0" * 8, declared=4096))
    write("safetensors", "header_not_object", safetensors(b"[1,2]   "))
    write("safetensors", "header_not_utf8", safetensors(b'{"\xff":1}'))
    write("safetensors", "short", b"\x10\0\0")


# --- recipes: YAML text, then each override after a NUL byte -----------------------------------------
MINIMAL = "model:\n  path: m\ndata:\n  path: d.h5\ntrain:\n  output_dir: out\n"


def recipe_seeds():
    demo = (pathlib.Path(__file__).resolve().parents[2] / "recipes" / "configs" / "demo.yaml").read_text()
    write("recipe", "demo", demo)
    write("recipe", "demo_overrides", "\0".join([demo, "train.max_steps=5", "lora.targets=[in_proj, x_proj]",
                                                 "device=cpu", "data.val_path=v.h5", "eval.every=2"]))
    write("recipe", "minimal", MINIMAL)
    write("recipe", "flow_style", "{model: {path: m}, data: {path: d, seq_len: 64}, train: {output_dir: o, lr: 1e-4}}")
    write("recipe", "anchors", MINIMAL + "lora: &l\n  rank: 8\nmemory:\n  <<: *l\n")
    write("recipe", "unknown_key", MINIMAL + "train2:\n  x: 1\n")
    write("recipe", "wrong_types", MINIMAL + "lora:\n  rank: four\n  rslora: maybe\n  targets: in_proj\n")
    write("recipe", "dotted_key", MINIMAL + "train.lr: 1\n")
    write("recipe", "bad_overrides", "\0".join([MINIMAL, "=1", "nokey", "train.lr=[1", "x.y=2", "lora.targets=[]"]))
    write("recipe", "huge_numbers", MINIMAL + "train:\n  max_steps: 99999999999999999999\n  seed: -1\n  lr: .nan\n")
    write("recipe", "not_a_mapping", "- a\n- b\n")
    write("recipe", "syntax_error", "model: [\n")
    write("recipe", "tags_and_documents", "--- !!map\nmodel: !!str {path: m}\n...\n---\nx: 1\n")


# --- tokenizer.json, then the text to encode after a NUL byte ----------------------------------------
def byte_level_alphabet():
    """GPT-2's bytes_to_unicode: byte -> the character that spells it in vocab keys."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 256
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(extra)
            extra += 1
    return table


def tokenizer_file(**changes):
    alphabet = byte_level_alphabet()
    vocab = {alphabet[b]: b for b in range(256)}
    merges = [["Ġ", "t"], ["h", "e"], ["Ġt", "he"], ["l", "l"], ["e", "ll"], ["ell", "o"]]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    file = {
        "version": "1.0",
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
        "added_tokens": [
            {"id": len(vocab), "content": "<|endoftext|>", "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True},
            {"id": len(vocab) + 1, "content": "  ", "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": True, "special": False}],
    }
    for path, value in changes.items():
        *parents, key = path.split(".")
        node = file
        for parent in parents:
            node = node[parent]
        if value is None:
            del node[key]
        else:
            node[key] = value
    return json.dumps(file, ensure_ascii=False, separators=(",", ":"))


def tokenizer_seeds():
    text = "\0" + "Hello the world<|endoftext|>  caf\u00e9 e\u0301 123 it's\xff\n"
    write("tokenizer", "valid", tokenizer_file() + "\0" + text)
    write("tokenizer", "string_merges", tokenizer_file(**{"model.merges": ["Ġ t", "h e", "Ġt he"]}) + text)
    write("tokenizer", "no_normalizer_no_regex", tokenizer_file(
        **{"normalizer": json.loads("null"), "pre_tokenizer.use_regex": False, "model.ignore_merges": True}) + text)
    write("tokenizer", "sparse_ids", tokenizer_file(**{"added_tokens": [
        {"id": 2147483647, "content": "<big>", "normalized": False}]}) + text)
    write("tokenizer", "added_id_max", tokenizer_file(**{"added_tokens": [
        {"id": 4294967295, "content": "<max>", "normalized": True}]}) + text)
    write("tokenizer", "merge_unknown", tokenizer_file(**{"model.merges": [["Ġ", "zz"]]}) + text)
    write("tokenizer", "unsupported", tokenizer_file(**{"model.type": "WordPiece"}))
    write("tokenizer", "not_json", '{"model": {"vocab": [1, 2')


# --- token_dataset: structured recipes (see fuzz_token_dataset.cpp) and raw files ('R' + bytes) ------
def token_dataset_seeds(ssmtune):
    # FuzzedDataProvider reads integers from the end of the input, so these are byte patterns that
    # pick different datasets, types and lengths; the fuzzer's mutations take it from there.
    for i, pattern in enumerate([b"\x01" * 64, b"\x07\x00\x13\x40" * 24, bytes(range(1, 128)),
                                 b"\xff\x10" * 40, b"\x02\x03\x05\x08\x0d\x15" * 12]):
        write("token_dataset", f"recipe_{i}", pattern)
    if ssmtune:
        with tempfile.TemporaryDirectory() as tmp:
            path = pathlib.Path(tmp) / "demo.h5"
            subprocess.run([ssmtune, "demo-data", "--out", str(path), "--documents", "2", "--seed", "3"], check=True,
                           stdout=subprocess.DEVNULL)
            write("token_dataset", "raw_demo", b"R" + path.read_bytes())


# --- jsonl: a format byte (0 text, 1 instruction, 2 chat), then JSONL lines ---------------------------
def jsonl_seeds():
    def lines(*records):
        return "\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records) + "\n"
    write("jsonl", "text", "\0" + lines({"text": "Hello, world."}, {"text": "caf\u00e9 \u65e5\u672c"}, "", "  ",
                                       {"text": ""}, {"text": 1}, {"other": "x"}, [1, 2], "{\"text\": \"unclosed",
                                       '{"text": "a\\ud800 lone surrogate"}'))
    write("jsonl", "instruction", "\1" + lines(
        {"instruction": "Add.", "input": "1 and 2", "output": "3"}, {"instruction": "Say {input}", "output": "ok"},
        {"instruction": "x", "input": None, "output": "y"}, {"instruction": "x"}, {"instruction": "", "output": "y"}))
    write("jsonl", "chat", "\2" + lines(
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}]},
        {"messages": [{"role": "user", "content": "Hi"}]}, {"messages": []},
        {"messages": [{"role": "robot", "content": "x"}]}, {"messages": [1]}, {"messages": "no"}))
    write("jsonl", "invalid_utf8", b"\0{\"text\": \"\xff\xfe\"}\n\xc3\n")
    write("jsonl", "deep", "\2" + "[" * 200 + "]" * 200 + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ssmtune", help="the ssmtune binary, for raw HDF5 seeds")
    args = parser.parse_args()
    safetensors_seeds()
    recipe_seeds()
    tokenizer_seeds()
    token_dataset_seeds(args.ssmtune)
    jsonl_seeds()


if __name__ == "__main__":
    main()
