"""Tokenizers for preprocessing and for megatron-core's ``GPTDataset``.

One small interface: ``vocab_size``, ``eod``, ``tokenize(text) -> list[int]``,
``detokenize(ids) -> str``, plus the ``unique_identifiers`` that megatron-core's
datasets hash into their index-cache names. ``build_tokenizer`` takes Megatron-LM's
``--tokenizer-type`` names:

* ``ByteLevel``: UTF-8 bytes 0..255 and the end-of-document id 256 (ours; needs no files).
* ``GPT2BPETokenizer``: GPT-2 byte-level BPE from ``--vocab-file`` (encoder.json: token ->
  id) and ``--merge-file`` (merges.txt: one ``left right`` pair per line, best first).
"""

import functools
import json
import os
import re
import sys
import unicodedata

TOKENIZER_TYPES = ("ByteLevel", "GPT2BPETokenizer")


class ByteLevel:
    """UTF-8 bytes as ids 0..255; ``eod`` = 256, so ``vocab_size`` = 257."""

    vocab_size = 257
    eod = 256

    @property
    def unique_identifiers(self) -> dict:
        return {"class": type(self).__name__}

    def tokenize(self, text: str) -> list:
        return list(text.encode("utf-8"))

    def detokenize(self, ids) -> str:
        """Bytes back to text; ``eod`` is dropped, invalid UTF-8 becomes U+FFFD."""
        return bytes(i for i in ids if i != self.eod).decode("utf-8", errors="replace")


def _byte_symbols() -> list:
    """GPT-2's printable stand-in for each byte value, indexed by byte.

    Bytes that are visible Latin-1 characters stand for themselves; the others
    (controls, space, soft hyphen, ...) take the code points 256, 257, ... in byte order.
    """
    visible = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) \
        | set(range(0xAE, 0xFF + 1))
    symbols, extra = [], 0
    for b in range(256):
        if b in visible:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def _char_class(category_initial: str) -> str:
    """A regex character class body of all code points whose Unicode category starts so."""
    ranges, start, prev = [], None, None
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp))[0] == category_initial:
            if start is None:
                start = cp
            prev = cp
        elif start is not None:
            ranges.append((start, prev))
            start = None
    if start is not None:
        ranges.append((start, prev))
    return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
                   for a, b in ranges)


@functools.lru_cache(maxsize=1)
def _pretokenizer() -> "re.Pattern":
    """GPT-2's pre-tokenization pattern, with ``\\p{L}`` / ``\\p{N}`` spelled out for ``re``."""
    letter, number = _char_class("L"), _char_class("N")
    return re.compile(
        rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{letter}]+| ?[{number}]+| ?[^\s{letter}{number}]+"
        r"|\s+(?!\S)|\s+"
    )


class GPT2BPETokenizer:
    """GPT-2 byte-level BPE: pre-tokenize, map bytes to symbols, merge pairs by rank."""

    EOD_TOKEN = "<|endoftext|>"

    def __init__(self, vocab_file: str, merge_file: str):
        self.vocab_file, self.merge_file = os.path.abspath(vocab_file), os.path.abspath(merge_file)
        with open(vocab_file, encoding="utf-8") as f:
            self.encoder = json.load(f)
        if not isinstance(self.encoder, dict):
            raise ValueError(f"{vocab_file}: expected a JSON object mapping tokens to ids")
        if self.EOD_TOKEN not in self.encoder:
            raise ValueError(f"{vocab_file}: no {self.EOD_TOKEN!r} token (the end-of-document id)")
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.ranks = {}
        with open(merge_file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line or (lineno == 1 and line.startswith("#version")):
                    continue
                pair = tuple(line.split(" "))
                if len(pair) != 2:
                    raise ValueError(f"{merge_file}:{lineno}: expected 'left right', got {line!r}")
                self.ranks.setdefault(pair, len(self.ranks))
        self.byte_symbols = _byte_symbols()
        self.symbol_bytes = {s: b for b, s in enumerate(self.byte_symbols)}
        self.pattern = _pretokenizer()
        self.cache = {}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @property
    def eod(self) -> int:
        return self.encoder[self.EOD_TOKEN]

    @property
    def unique_identifiers(self) -> dict:
        return {"class": type(self).__name__, "vocab_file": self.vocab_file,
                "merge_file": self.merge_file}

    def bpe(self, word: str) -> list:
        """Merge the symbols of one pre-token: always the adjacent pair of lowest rank first."""
        if word in self.cache:
            return self.cache[word]
        parts = list(word)
        while len(parts) > 1:
            rank, pair = min((self.ranks.get(p, float("inf")), p) for p in zip(parts, parts[1:]))
            if rank == float("inf"):
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = parts
        return parts

    def tokenize(self, text: str) -> list:
        ids = []
        for piece in self.pattern.findall(text):
            word = "".join(self.byte_symbols[b] for b in piece.encode("utf-8"))
            for token in self.bpe(word):
                if token not in self.encoder:
                    raise ValueError(f"{self.vocab_file}: BPE token {token!r} is not in the vocab")
                ids.append(self.encoder[token])
        return ids

    def detokenize(self, ids) -> str:
        """Ids back to text; invalid UTF-8 becomes U+FFFD."""
        symbols = "".join(self.decoder[i] for i in ids)
        return bytes(self.symbol_bytes[s] for s in symbols).decode("utf-8", errors="replace")


def build_tokenizer(tokenizer_type: str, vocab_file=None, merge_file=None):
    """The tokenizer for Megatron-LM's ``--tokenizer-type``, ``--vocab-file``, ``--merge-file``."""
    if tokenizer_type == "ByteLevel":
        if vocab_file or merge_file:
            raise ValueError("--tokenizer-type ByteLevel takes no --vocab-file / --merge-file")
        return ByteLevel()
    if tokenizer_type == "GPT2BPETokenizer":
        if not vocab_file or not merge_file:
            raise ValueError("--tokenizer-type GPT2BPETokenizer needs --vocab-file and "
                             "--merge-file")
        return GPT2BPETokenizer(vocab_file, merge_file)
    raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}; "
                     f"choose from {', '.join(TOKENIZER_TYPES)}")
