"""Tokenizers for preprocessing and for megatron-core's ``GPTDataset``, and BPE training.

One small interface: ``vocab_size``, ``eod``, ``tokenize(text) -> list[int]``,
``detokenize(ids) -> str``, plus the ``unique_identifiers`` that megatron-core's
datasets hash into their index-cache names. ``build_tokenizer`` takes Megatron-LM's
``--tokenizer-type`` names:

* ``ByteLevel``: UTF-8 bytes 0..255 and the end-of-document id 256 (ours; needs no files).
* ``GPT2BPETokenizer``: GPT-2 byte-level BPE from ``--vocab-file`` (encoder.json: token ->
  id) and ``--merge-file`` (merges.txt: one ``left right`` pair per line, best first).
* ``HuggingFaceTokenizer``: a HuggingFace ``tokenizer.json`` (``--tokenizer-model``) whose
  model is byte-level BPE, the GPT-2 / RoBERTa / Llama 3 / Qwen2 / SmolLM2 layout.

Both BPE tokenizers share ``_ByteLevelBPE``. ``train_bpe`` learns a GPT-2 style vocab and
merges from text and ``save_bpe`` / ``write_bpe`` write them as GPT2BPETokenizer's files.
"""

import collections
import functools
import heapq
import json
import os
import re
import sys
import unicodedata
from pathlib import Path

TOKENIZER_TYPES = ("ByteLevel", "GPT2BPETokenizer", "HuggingFaceTokenizer")
EOD_TOKEN = "<|endoftext|>"


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


BYTE_SYMBOLS = _byte_symbols()
SYMBOL_BYTES = {s: b for b, s in enumerate(BYTE_SYMBOLS)}
_TO_SYMBOLS = str.maketrans({chr(b): s for b, s in enumerate(BYTE_SYMBOLS)})


def _symbols(piece: str) -> str:
    """``piece``'s UTF-8 bytes spelled in byte symbols."""
    return piece.encode("utf-8").decode("latin-1").translate(_TO_SYMBOLS)


_FROM_SYMBOLS = str.maketrans({s: chr(b) for b, s in enumerate(BYTE_SYMBOLS)})


def _decode_symbols(tokens) -> str:
    """Byte-symbol tokens back to text (other characters as their UTF-8; bad UTF-8 as U+FFFD)."""
    latin1 = "".join(tokens).translate(_FROM_SYMBOLS)
    try:
        data = latin1.encode("latin-1")
    except UnicodeEncodeError:  # a token spelled outside the byte symbols
        data = b"".join(c.encode("latin-1" if c < "\u0100" else "utf-8") for c in latin1)
    return data.decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=None)
def _char_class(category: str) -> str:
    """A regex character class body of all code points whose Unicode category starts so."""
    ranges, start, prev = [], None, None
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp)).startswith(category):
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


class _ByteLevelBPE:
    """Byte-level BPE: pre-tokenize, spell bytes as symbols, merge adjacent pairs by rank.

    ``encoder`` maps tokens to ids, ``merges`` lists ``(left, right)`` pairs best first;
    ``source`` names the file in errors. With ``ignore_merges`` a pre-token that is itself a
    vocab entry is taken whole (Llama 3); ``unk_id`` stands for tokens missing from the vocab.
    """

    def __init__(self, encoder: dict, merges, eod: int, source: str, ignore_merges=False,
                 unk_id=None):
        self.encoder, self.eod, self.source = encoder, eod, source
        self.decoder = {i: t for t, i in encoder.items()}
        self.ranks = {}
        for pair in merges:
            self.ranks.setdefault(tuple(pair), len(self.ranks))
        self.ignore_merges, self.unk_id = ignore_merges, unk_id
        self.byte_symbols, self.symbol_bytes = BYTE_SYMBOLS, SYMBOL_BYTES
        self.pattern = _pretokenizer()
        self.cache = {}

    def bpe(self, word: str) -> list:
        """Merge the symbols of one pre-token: always the adjacent pair of lowest rank first."""
        if word in self.cache:
            return self.cache[word]
        if self.ignore_merges and word in self.encoder:
            return [word]
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

    def _pieces(self, text: str) -> list:
        """Pre-tokens of ``text``."""
        return self.pattern.findall(text)

    def tokenize(self, text: str) -> list:
        ids = []
        for piece in self._pieces(text):
            for token in self.bpe(_symbols(piece)):
                i = self.encoder.get(token, self.unk_id)
                if i is None:
                    raise ValueError(f"{self.source}: BPE token {token!r} is not in the vocab")
                ids.append(i)
        return ids

    def detokenize(self, ids) -> str:
        """Ids back to text; invalid UTF-8 becomes U+FFFD."""
        return _decode_symbols(self.decoder[i] for i in ids)


class GPT2BPETokenizer(_ByteLevelBPE):
    """GPT-2 byte-level BPE from an encoder.json and a merges.txt."""

    EOD_TOKEN = EOD_TOKEN

    def __init__(self, vocab_file: str, merge_file: str):
        self.vocab_file, self.merge_file = os.path.abspath(vocab_file), os.path.abspath(merge_file)
        with open(vocab_file, encoding="utf-8") as f:
            encoder = json.load(f)
        if not isinstance(encoder, dict):
            raise ValueError(f"{vocab_file}: expected a JSON object mapping tokens to ids")
        if self.EOD_TOKEN not in encoder:
            raise ValueError(f"{vocab_file}: no {self.EOD_TOKEN!r} token (the end-of-document id)")
        merges = []
        with open(merge_file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line or (lineno == 1 and line.startswith("#version")):
                    continue
                pair = tuple(line.split(" "))
                if len(pair) != 2:
                    raise ValueError(f"{merge_file}:{lineno}: expected 'left right', got {line!r}")
                merges.append(pair)
        super().__init__(encoder, merges, encoder[self.EOD_TOKEN], self.vocab_file)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @property
    def unique_identifiers(self) -> dict:
        return {"class": type(self).__name__, "vocab_file": self.vocab_file,
                "merge_file": self.merge_file}


def _python_regex(pattern: str, where: str) -> str:
    """A HuggingFace (Oniguruma) pre-tokenizer regex for ``re``: ``\\p{..}`` spelled out."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            m = re.match(r"\\([pP])\{(\w+)\}", pattern[i:])
            if m and m[1] == "p" and len(m[2]) <= 2 and m[2][0] in "LMNPSZC":
                body = _char_class(m[2])
                out.append(body if in_class else f"[{body}]")
                i += m.end()
                continue
            if m:
                raise ValueError(f"{where}: pre-tokenizer regex: {m[0]} is not supported")
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
        elif c == "]" and in_class:
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)


def _split_isolated(pattern: "re.Pattern", text: str) -> list:
    """``text`` cut into the matches of ``pattern`` and the (non-empty) gaps between them."""
    pieces, start = [], 0
    for m in pattern.finditer(text):
        if m.start() > start:
            pieces.append(text[start:m.start()])
        if m.end() > m.start():
            pieces.append(m.group())
        start = m.end()
    if start < len(text):
        pieces.append(text[start:])
    return pieces


NORMALIZERS = ("NFC", "NFD", "NFKC", "NFKD", "Lowercase")


def _normalizers(spec, where: str) -> list:
    """A tokenizer.json ``normalizer`` as a list of NORMALIZERS names."""
    if spec is None:
        return []
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "Sequence":
        return [n for s in spec.get("normalizers", []) for n in _normalizers(s, where)]
    if kind not in NORMALIZERS:
        raise ValueError(f"{where}: normalizer {kind!r} is not supported "
                         f"(supported: {', '.join(NORMALIZERS)})")
    return [kind]


def _pretokenizer_steps(spec, where: str) -> list:
    """A tokenizer.json ``pre_tokenizer`` as steps: None (add a prefix space) or a pattern
    (split off its matches and the gaps between them)."""
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "Sequence":
        return [s for p in spec.get("pretokenizers", []) for s in _pretokenizer_steps(p, where)]
    if kind == "ByteLevel":
        return ([None] if spec.get("add_prefix_space") else []) \
            + ([_pretokenizer()] if spec.get("use_regex", True) else [])
    if kind == "Digits":  # SmolLM2: digits split off (each one alone, or runs of them)
        number = _char_class("N")
        return [re.compile(f"[{number}]" if spec.get("individual_digits") else f"[{number}]+")]
    if kind == "Split":
        pattern = spec.get("pattern") or {}
        if spec.get("behavior") != "Isolated" or spec.get("invert"):
            raise ValueError(f"{where}: Split pre-tokenizer with behavior "
                             f"{spec.get('behavior')!r}, invert {spec.get('invert')!r} is not "
                             f"supported (only 'Isolated', not inverted)")
        if "Regex" in pattern:
            return [re.compile(_python_regex(pattern["Regex"], where))]
        if "String" in pattern:
            return [re.compile(re.escape(pattern["String"]))]
        raise ValueError(f"{where}: Split pre-tokenizer without a Regex or String pattern")
    raise ValueError(f"{where}: pre-tokenizer {kind!r} is not supported; only byte-level BPE is "
                     f"(ByteLevel, optionally after Split or Digits)")


def _types(spec) -> list:
    """The ``type`` of a tokenizer.json component and of the components in its Sequence."""
    if not isinstance(spec, dict):
        return []
    inner = spec.get("pretokenizers") or spec.get("normalizers") or []
    return [spec.get("type")] + [t for s in inner for t in _types(s)]


def _load_json(path, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column "
                         f"{e.colno}); expected {what}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 (byte {e.start}); expected {what}") from None


class HuggingFaceTokenizer(_ByteLevelBPE):
    """A HuggingFace ``tokenizer.json`` whose model is byte-level BPE (GPT-2, RoBERTa, Llama 3).

    ``tokenizer_model`` is the file or a directory holding it. The end-of-document token is
    ``eod_token``, else the ``eos_token`` of a ``tokenizer_config.json`` beside the file, else
    the first of EOD_TOKENS it has. As in HuggingFace, added tokens written in the text encode
    as their ids (their ``single_word`` / ``normalized`` flags are not honoured); the
    post-processor's BOS/EOS templates are not applied (``--append-eod`` adds the eod).
    ``vocab_size`` is the largest id + 1.
    """

    EOD_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>")

    def __init__(self, tokenizer_model: str, eod_token: str = None):
        path = Path(tokenizer_model)
        if path.is_dir():
            path = path / "tokenizer.json"
        self.tokenizer_model = os.path.abspath(path)
        spec = _load_json(path, "a HuggingFace tokenizer.json")
        model = spec.get("model") if isinstance(spec, dict) else None
        if not isinstance(model, dict):
            raise ValueError(f"{path}: not a HuggingFace tokenizer.json (no 'model' object)")
        kind = model.get("type", "BPE" if "merges" in model else None)
        if kind != "BPE":
            raise ValueError(f"{path}: model type {kind!r} is not supported; only byte-level BPE "
                             f"(model 'BPE' with a ByteLevel pre-tokenizer and decoder) is")
        for key in ("continuing_subword_prefix", "end_of_word_suffix", "byte_fallback",
                    "dropout"):
            if model.get(key):
                raise ValueError(f"{path}: model.{key} = {model[key]!r} is not supported; only "
                                 f"plain byte-level BPE is")
        decoder = spec.get("decoder")
        if not isinstance(decoder, dict) or decoder.get("type") != "ByteLevel":
            raise ValueError(f"{path}: decoder {decoder and decoder.get('type')!r} is not "
                             f"supported; only byte-level BPE (a ByteLevel decoder) is")
        self.normalizers = _normalizers(spec.get("normalizer"), path)
        self.steps = _pretokenizer_steps(spec.get("pre_tokenizer"), path)
        if "ByteLevel" not in _types(spec.get("pre_tokenizer")) or not any(self.steps):
            raise ValueError(f"{path}: only byte-level BPE is supported: the pre-tokenizer needs "
                             f"a ByteLevel step, and a regex split (its own or a Split's)")

        vocab = model.get("vocab")
        if not isinstance(vocab, dict) or not all(
                type(i) is int and i >= 0 for i in vocab.values()):
            raise ValueError(f"{path}: model.vocab must map tokens to non-negative integer ids")
        merges = model.get("merges", [])
        if not isinstance(merges, list):
            raise ValueError(f"{path}: model.merges must be a list")
        pairs = []
        for n, merge in enumerate(merges):
            pair = merge.split(" ") if isinstance(merge, str) else merge
            if not (isinstance(pair, list) and len(pair) == 2
                    and all(isinstance(s, str) for s in pair)):
                raise ValueError(f"{path}: model.merges[{n}] is {merge!r}; expected "
                                 f"'left right' or [left, right]")
            pairs.append(tuple(pair))

        self.added, patterns = {}, []  # added: id -> content; patterns: one group per token
        added = spec.get("added_tokens") or []
        for n, token in enumerate(added if isinstance(added, list) else [None]):
            if not (isinstance(token, dict) and type(token.get("id")) is int
                    and isinstance(token.get("content"), str)):
                raise ValueError(f"{path}: added_tokens[{n}] is {token!r}; expected an object "
                                 f"with an integer 'id' and a string 'content'")
            if token["content"]:
                self.added[token["id"]] = token["content"]
                patterns.append((token["content"], token["id"], token.get("lstrip"),
                                 token.get("rstrip")))
        patterns.sort(key=lambda p: -len(p[0]))  # longest first where two start together
        self.added_ids = [i for _, i, _, _ in patterns]
        space = {True: r"\s*", False: ""}
        self.added_pattern = re.compile("|".join(
            f"{space[bool(ls)]}({re.escape(c)}){space[bool(rs)]}"
            for c, _, ls, rs in patterns)) if patterns else None

        ids = {**vocab, **{c: i for i, c in self.added.items()}}
        super().__init__(vocab, pairs, self._find_eod(path, ids, eod_token), str(path),
                         ignore_merges=bool(model.get("ignore_merges")),
                         unk_id=vocab.get(model.get("unk_token")))
        self.vocab_size = max(ids.values(), default=-1) + 1

    def _find_eod(self, path: Path, ids: dict, eod_token) -> int:
        config = path.with_name("tokenizer_config.json")
        if eod_token is None and config.is_file():
            eos = _load_json(config, "a HuggingFace tokenizer_config.json")
            eos = eos.get("eos_token") if isinstance(eos, dict) else None
            eod_token = eos.get("content") if isinstance(eos, dict) else eos
            if eod_token is not None and eod_token not in ids:
                raise ValueError(f"{path}: no token {eod_token!r} (the eos_token of {config})")
        if eod_token is not None:
            if eod_token not in ids:
                raise ValueError(f"{path}: no end-of-document token {eod_token!r}")
            return ids[eod_token]
        for name in self.EOD_TOKENS:
            if name in ids:
                return ids[name]
        raise ValueError(f"{path}: no end-of-document token (none of "
                         f"{', '.join(self.EOD_TOKENS)}); name one as eod_token")

    @property
    def unique_identifiers(self) -> dict:
        return {"class": type(self).__name__, "tokenizer_model": self.tokenizer_model,
                "eod": self.eod}

    def _pieces(self, text: str) -> list:
        for form in self.normalizers:
            text = text.lower() if form == "Lowercase" else unicodedata.normalize(form, text)
        pieces = [text]
        for step in self.steps:
            if step is None:
                pieces = [p if p.startswith(" ") else " " + p for p in pieces]
            else:
                pieces = [q for p in pieces for q in _split_isolated(step, p)]
        return pieces

    def tokenize(self, text: str) -> list:
        """Ids of ``text``; added tokens (``<|endoftext|>``, ...) in it become their ids."""
        if self.added_pattern is None:
            return super().tokenize(text)
        ids, start = [], 0
        for m in self.added_pattern.finditer(text):
            if m.start() > start:
                ids += super().tokenize(text[start:m.start()])
            ids.append(self.added_ids[m.lastindex - 1])
            start = m.end()
        if start < len(text):
            ids += super().tokenize(text[start:])
        return ids

    def detokenize(self, ids) -> str:
        """Ids back to text, added tokens as written; invalid UTF-8 becomes U+FFFD."""
        out, run = [], []
        for i in ids:
            if i in self.added:
                out.append(_decode_symbols(run) + self.added[i])
                run = []
            else:
                run.append(self.decoder[i])
        return "".join(out) + _decode_symbols(run)


def train_bpe(texts, vocab_size: int):
    """Learn GPT-2 style byte-level BPE from ``texts``: ``(vocab, merges)``.

    ``vocab`` maps tokens to ids: the 256 byte symbols (id = byte value), then each merge's
    result in merge order, then ``<|endoftext|>``; ``vocab_size`` entries in all, fewer only if
    the text runs out of pairs. The text is pre-tokenized as GPT2BPETokenizer does; each step
    merges the adjacent pair most frequent in it (ties: the smaller pair, so the result is
    deterministic). Pair counts are kept per distinct pre-token and updated incrementally.
    """
    if vocab_size < 257:
        raise ValueError(f"a byte-level BPE vocab needs at least 257 tokens (256 bytes and "
                         f"{EOD_TOKEN}), not {vocab_size}")
    pattern, counts = _pretokenizer(), collections.Counter()
    for text in texts:
        counts.update(pattern.findall(text))
    words = [list(_symbols(piece)) for piece in counts]
    freqs = list(counts.values())

    pair_counts, where = collections.defaultdict(int), collections.defaultdict(set)
    for w, (word, n) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += n
            where[pair].add(w)
    heap = [(-n, pair) for pair, n in pair_counts.items()]
    heapq.heapify(heap)

    vocab = {s: b for b, s in enumerate(BYTE_SYMBOLS)}
    merges, merged = [], set()
    while len(vocab) < vocab_size - 1 and heap:
        n, pair = heapq.heappop(heap)
        if pair_counts.get(pair) != -n:
            continue  # a stale entry: the pair's count changed after it was pushed
        left, right = pair
        token = left + right
        if pair not in merged:  # a pair can only come back through a token spelled twice
            merged.add(pair)
            merges.append(pair)
            vocab.setdefault(token, len(vocab))
        changed = set()
        for w in where.pop(pair):  # words that had the pair (some may have lost it since)
            word, n = words[w], freqs[w]
            new, i = [], 0
            while i < len(word):
                if word[i] == left and i + 1 < len(word) and word[i + 1] == right:
                    new.append(token)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            if len(new) == len(word):
                continue
            delta = collections.Counter()
            for p in zip(word, word[1:]):
                delta[p] -= n
            for p in zip(new, new[1:]):
                delta[p] += n
                where[p].add(w)
            for p, d in delta.items():
                if d:
                    pair_counts[p] += d
                    changed.add(p)
            words[w] = new
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:
                del pair_counts[p]
    vocab[EOD_TOKEN] = len(vocab)
    return vocab, merges


def _replace_all(contents: dict) -> None:
    """Write ``{path: text}`` through temporary files renamed into place last."""
    temps = {path: os.path.join(os.path.dirname(os.path.abspath(path)),
                                f".{os.path.basename(path)}.tmp-{os.getpid()}")
             for path in contents}
    try:
        for path, text in contents.items():
            os.makedirs(os.path.dirname(temps[path]), exist_ok=True)
            with open(temps[path], "w", encoding="utf-8") as f:
                f.write(text)
        for path, temp in temps.items():
            os.replace(temp, path)
    finally:
        for temp in temps.values():
            if os.path.exists(temp):
                os.remove(temp)


def write_bpe(vocab: dict, merges, vocab_file, merge_file):
    """Write ``vocab`` and ``merges`` as GPT-2's vocab.json and merges.txt (``#version``
    header), for GPT2BPETokenizer; atomically, refusing to overwrite either file."""
    for path in (vocab_file, merge_file):
        if os.path.exists(path):
            raise FileExistsError(f"{path}: exists; not overwriting it with a trained tokenizer")
    ordered = dict(sorted(vocab.items(), key=lambda item: item[1]))
    _replace_all({
        merge_file: "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        vocab_file: json.dumps(ordered, ensure_ascii=False, indent=0) + "\n",
    })
    return str(vocab_file), str(merge_file)


def save_bpe(vocab: dict, merges, directory):
    """``write_bpe`` into ``directory``/vocab.json and merges.txt; returns their paths."""
    return write_bpe(vocab, merges, os.path.join(directory, "vocab.json"),
                     os.path.join(directory, "merges.txt"))


def build_tokenizer(tokenizer_type: str, vocab_file=None, merge_file=None, tokenizer_model=None):
    """The tokenizer for Megatron-LM's ``--tokenizer-type``, ``--vocab-file``, ``--merge-file``,
    ``--tokenizer-model``."""
    files = {"--vocab-file": vocab_file, "--merge-file": merge_file,
             "--tokenizer-model": tokenizer_model}
    needs = {"ByteLevel": (), "GPT2BPETokenizer": ("--vocab-file", "--merge-file"),
             "HuggingFaceTokenizer": ("--tokenizer-model",)}
    if tokenizer_type not in needs:
        raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}; "
                         f"choose from {', '.join(TOKENIZER_TYPES)}")
    extra = [flag for flag, value in files.items() if value and flag not in needs[tokenizer_type]]
    if extra:
        raise ValueError(f"--tokenizer-type {tokenizer_type} takes no {' / '.join(extra)}")
    if not all(files[flag] for flag in needs[tokenizer_type]):
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs "
                         f"{' and '.join(needs[tokenizer_type])}")
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    return ByteLevel()
