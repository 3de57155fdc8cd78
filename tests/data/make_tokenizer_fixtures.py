#!/usr/bin/env python3
"""Writes the tokenizer golden fixtures under tests/data/fixtures/tokenizer/ with HF `tokenizers`.

tokenizer.json: a byte-level BPE trained here in GPT-NeoX's (Mamba's) configuration: NFC normalizer,
ByteLevel pre-tokenizer (add_prefix_space false, GPT-2 regex), ByteLevel decoder, the special tokens
<|endoftext|> and <|padding|> (matched on raw text) and a normalized whitespace added token as
GPT-NeoX has. golden.json: {"cases": [{"text", "ids", "normalized"}]} for strings chosen to reach every
branch of the split pattern, NFC, added-token matching and BPE. Deterministic: rerun after changing it.

Usage: python make_tokenizer_fixtures.py  (needs tokenizers==0.23.3)
"""
import json
import pathlib

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

OUT = pathlib.Path(__file__).resolve().parent / "fixtures" / "tokenizer"

CORPUS = """
The quick brown fox jumps over the lazy dog. It's a dog's life; they'll say we've seen I'm fine, you'd agree.
Mamba is a selective state space model: h_t = exp(dt * A) h_{t-1} + dt * B x_t, y_t = C h_t + D x_t.
def train(model, data):
    for step, batch in enumerate(data):
        loss = model(batch)
        loss.backward()
\tindented with a tab\t\tand two tabs
Numbers: 0 1 2 3 42 1234567890 3.14159 2026-11-22 1e-5 0x7fff 100,000
Café, naïve, résumé, façade, Ångström, über, señor, crème brûlée, Øresund, Łódź.
Русский текст для проверки, Ελληνικά γράμματα, עברית, العربية.
日本語のテキストと中文文本，还有한국어 문장。
Emoji: 🙂 🚀 👍🏽 🇩🇪 ❤️ — “quotes” ‘single’ «guillemets» … ellipsis.
Mixed    spaces   and\n\nnewlines\r\nwindows line endings.
URL https://example.com/path?q=1&r=2#frag and e-mail someone@example.org.
JSON {"key": [1, 2, 3], "nested": {"a": null}} and C++ std::vector<int> v{1, 2};
Additional prose: whenever a tokenizer meets text it has never seen, it falls back to smaller pieces.
Byte pair encoding merges the most frequent adjacent pairs first; ranks decide the order of merges.
Spaces    before words, tabs		between them, and trailing whitespace   
are the corner cases that the split pattern's lookahead \s+(?!\S) exists for.
""" * 6

SPECIAL = ["<|endoftext|>", "<|padding|>"]
WHITESPACE_ADDED = ["        "]  # long runs only, so shorter runs still exercise \s+(?!\S)

CASES = [
    "",
    "hello",
    "Hello world",
    " leading space",
    "trailing space ",
    "two  spaces",
    "many        spaces then word",
    "   ",
    "\t",
    "a\tb\t\tc",
    "line\nbreak\n\n\nthree",
    "win\r\ndows",
    " \n \n",
    "space before newline \nnext",
    "It's they'll we've I'm you'd she's don't",
    "'s't're've'm'll'd",
    "CAPS IT'S",
    "123 4567 89012345 3.14 -7",
    "x1y22z333",
    "Café naïve résumé",
    "Cafe\u0301 decomposed e\u0301 and A\u030a",
    "\u212b angstrom sign and \u2126 ohm",
    "日本語のテキスト",
    "中文文本，标点。",
    "한국어 문장",
    "Русский текст",
    "🙂🚀 👍🏽 🇩🇪 ❤️",
    "“quotes” — dash … ellipsis",
    "\u00a0nbsp\u00a0between\u3000ideographic",
    "<|endoftext|>",
    "before<|endoftext|>after",
    "text <|endoftext|> text<|padding|><|padding|>",
    "<|endoftext|><|endoftext|>",
    "<|endoftext",
    "a    b",
    "x   y",
    "end   ",
    "tab\t\tx",
    "nl \nx",
    "  lead two",
    "a \t b",
    "aaaaaaaa",
    "ab ab ab abab",
    "\u0085next line\u2028sep",
    "a        b",
    "a     b",
    "  x  ",
    "def f():\n    return 1\n",
    "JSON {\"key\": [1, 2]}",
    "https://example.com/path?q=1&r=2#frag",
    "!!!???...,,,;;;",
    "Ωmega µ ß ﬁ ligature",
    "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
    "The quick brown fox jumps over the lazy dog.",
]


def build():
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    tok.add_tokens([AddedToken(t, normalized=True) for t in WHITESPACE_ADDED])
    return tok


def main():
    tok = build()
    OUT.mkdir(parents=True, exist_ok=True)
    tok.save(str(OUT / "tokenizer.json"))
    cases = []
    for text in CASES:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text or tok.normalizer.normalize_str(text) != text
        cases.append({"text": text, "ids": ids, "normalized": tok.normalizer.normalize_str(text)})
    with open(OUT / "golden.json", "w", encoding="utf-8") as f:
        json.dump({"tokenizers_version": __import__("tokenizers").__version__, "cases": cases}, f,
                  ensure_ascii=False, indent=0)
        f.write("\n")
    print(f"{len(cases)} cases, vocab {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
