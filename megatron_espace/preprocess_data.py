"""Tokenize text into Megatron indexed datasets (``.bin`` / ``.idx``).

    python -m megatron_espace.preprocess_data --input corpus/ more.jsonl \\
        --output-prefix data/corpus --tokenizer-type ByteLevel --append-eod --workers 4

Inputs are plain text files (one document each), directories (their files, recursively,
in sorted order, matching ``--file-glob``; hidden entries skipped), and ``.jsonl`` / ``.json``
lines files (one JSON object a line, one document a line; ``--json-keys`` picks the fields).
Each key gets ``{PREFIX}_{key}_document.bin/.idx`` (``text`` for plain files), written with
megatron-core's ``IndexedDatasetBuilder`` in the layout Megatron-LM's
``tools/preprocess_data.py`` writes: one sequence per document, none for an empty one.
Outputs are built in temporary files and renamed into place, so an interrupted run leaves
no partial dataset; inputs are only read.

``--train-tokenizer-vocab-size N`` first trains a byte-level BPE vocab of N tokens on the
same documents and writes it to ``--vocab-file`` / ``--merge-file`` (which must not exist
yet), then tokenizes with it (``--tokenizer-type GPT2BPETokenizer``): for offline demos.
"""

import argparse
import fnmatch
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_espace.tokenizer import (TOKENIZER_TYPES, GPT2BPETokenizer, build_tokenizer,
                                       train_bpe, write_bpe)

JSON_SUFFIXES = (".jsonl", ".json")
CHUNK = 512  # documents handed to the worker pool at a time


class PreprocessError(ValueError):
    """Bad preprocessing input; the message names the file (and line and key)."""


def _input_files(inputs, file_glob: str) -> list:
    """Expand ``inputs`` into files: explicit files as given, directories recursively, sorted."""
    files = []
    for item in map(Path, inputs):
        if item.is_file():
            files.append(item)
        elif item.is_dir():
            found = []
            for root, dirs, names in os.walk(item):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found += [Path(root, n) for n in names
                          if not n.startswith(".") and fnmatch.fnmatch(n, file_glob)
                          and Path(root, n).is_file()]
            if not found:
                raise PreprocessError(f"{item}: no files matching --file-glob {file_glob!r}")
            files += sorted(found, key=lambda p: p.relative_to(item).as_posix())
        else:
            raise PreprocessError(f"{item}: no such file or directory")
    return files


def _checked_files(inputs, file_glob: str, json_keys) -> list:
    """``_input_files``, refusing plain text files when the keys are not just ``text``."""
    files = _input_files(inputs, file_glob)
    plain = [p for p in files if p.suffix not in JSON_SUFFIXES]
    if plain and tuple(json_keys) != ("text",):
        raise PreprocessError(f"{plain[0]}: a plain text file gives key 'text' only, "
                              f"but --json-keys is {' '.join(json_keys)}")
    return files


def _documents(files, json_keys):
    """Yield ``(texts, nbytes)`` per document (texts: key -> string; None for a blank line)."""
    for path in files:
        if path.suffix not in JSON_SUFFIXES:
            data = path.read_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PreprocessError(f"{path}: not UTF-8 text (byte {e.start})") from None
            yield {"text": text}, len(data)
            continue
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    yield None, len(raw)
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise PreprocessError(f"{where}: not a JSON line ({e.msg} at character "
                                          f"{e.pos + 1})") from None
                except UnicodeDecodeError as e:
                    raise PreprocessError(f"{where}: not UTF-8 (byte {e.start})") from None
                if not isinstance(record, dict):
                    raise PreprocessError(f"{where}: expected a JSON object, got "
                                          f"{type(record).__name__}")
                texts = {}
                for key in json_keys:
                    if key not in record:
                        raise PreprocessError(f"{where}: no key {key!r} (keys: "
                                              f"{', '.join(map(repr, record)) or 'none'})")
                    if not isinstance(record[key], str):
                        raise PreprocessError(f"{where}: key {key!r} is "
                                              f"{type(record[key]).__name__}, not a string")
                    texts[key] = record[key]
                yield texts, len(raw)


_worker_tokenizer = None


def _init_worker(tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode(texts: dict) -> dict:
    return {key: _worker_tokenizer.tokenize(text) for key, text in texts.items()}


def _chunks(iterable, size: int):
    chunk = []
    for item in iterable:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _write(files, json_keys, tokenizer, append_eod, workers, builders) -> dict:
    """Tokenize every document into ``builders`` (one per key), with a progress bar."""
    counts = {"documents": 0, "empty": 0, "tokens": dict.fromkeys(json_keys, 0)}
    _init_worker(tokenizer)
    pool = multiprocessing.Pool(workers, _init_worker, (tokenizer,)) if workers > 1 else None
    bar = tqdm(total=sum(p.stat().st_size for p in files), unit="B", unit_scale=True,
               unit_divisor=1024, desc="preprocess", file=sys.stderr, dynamic_ncols=True)
    try:
        for chunk in _chunks(_documents(files, json_keys), CHUNK):
            texts = [t for t, _ in chunk if t is not None]
            encoded = pool.map(_encode, texts, chunksize=16) if pool else map(_encode, texts)
            for ids_per_key in encoded:
                for key, ids in ids_per_key.items():
                    if ids and append_eod:
                        ids.append(tokenizer.eod)
                    if ids:  # an empty document gets no sequence, as in Megatron-LM
                        builders[key].add_item(torch.tensor(ids, dtype=torch.int64))
                    builders[key].end_document()
                    counts["tokens"][key] += len(ids)
                counts["documents"] += 1
                counts["empty"] += not any(ids_per_key.values())
            bar.update(sum(nbytes for _, nbytes in chunk))
            bar.set_postfix(documents=counts["documents"])
    finally:
        bar.close()
        if pool:
            pool.terminate()
    return counts


def preprocess(inputs, output_prefix: str, tokenizer, json_keys=("text",), append_eod=True,
               file_glob="*", workers: int = 1) -> dict:
    """Tokenize ``inputs`` into one indexed dataset per json key; see the module docstring.

    Returns ``{"documents", "empty", "tokens": {key: n}, "prefixes": {key: dataset prefix},
    "files": [written paths], "dtype"}``.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    json_keys = tuple(json_keys)
    files = _checked_files(inputs, file_glob, json_keys)
    prefixes = {key: f"{output_prefix}_{key}_document" for key in json_keys}
    outputs = [prefixes[k] + ext for k in json_keys for ext in (".bin", ".idx")]
    sources = {p.resolve() for p in files}
    for out in outputs:
        if Path(out).resolve() in sources:
            raise PreprocessError(f"{out}: is an input; it would be overwritten")

    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    temps = {out: f"{out}.tmp-{os.getpid()}" for out in outputs}
    builders = {}
    try:
        for key in json_keys:
            builders[key] = IndexedDatasetBuilder(temps[prefixes[key] + ".bin"], dtype=dtype)
        counts = _write(files, json_keys, tokenizer, append_eod, workers, builders)
        for key in json_keys:
            builders[key].finalize(temps[prefixes[key] + ".idx"])
        empty = [key for key, n in counts["tokens"].items() if n == 0]
        if empty:
            raise PreprocessError(f"{' '.join(map(str, inputs))}: no tokens for "
                                  f"{', '.join(map(repr, empty))} in "
                                  f"{counts['documents']} documents")
        for key in json_keys:
            # a crash between the two renames leaves no .idx rather than a mismatched one
            if os.path.exists(prefixes[key] + ".idx"):
                os.remove(prefixes[key] + ".idx")
            os.replace(temps[prefixes[key] + ".bin"], prefixes[key] + ".bin")
            os.replace(temps[prefixes[key] + ".idx"], prefixes[key] + ".idx")
    finally:
        for builder in builders.values():
            builder.data_file.close()
        for temp in temps.values():
            if os.path.exists(temp):
                os.remove(temp)
    return {**counts, "prefixes": prefixes, "files": outputs, "dtype": dtype.__name__}


def _picked_up(path, inputs, file_glob: str) -> bool:
    """Whether ``path`` would be read as an input (inside an input directory, or named)."""
    path = Path(path).resolve()
    for item in map(Path, inputs):
        if item.resolve() == path:
            return True
        if item.is_dir() and path.is_relative_to(item.resolve()):
            parts = path.relative_to(item.resolve()).parts
            if not any(p.startswith(".") for p in parts) and fnmatch.fnmatch(path.name, file_glob):
                return True
    return False


def train_tokenizer(inputs, vocab_size: int, vocab_file, merge_file, json_keys=("text",),
                    file_glob="*") -> GPT2BPETokenizer:
    """Train byte-level BPE (``train_bpe``) on the documents of ``inputs``, write it to
    ``vocab_file`` / ``merge_file`` (refusing existing files) and return its tokenizer."""
    for path in (vocab_file, merge_file):
        if os.path.exists(path):
            raise PreprocessError(f"{path}: exists; --train-tokenizer-vocab-size will not "
                                  f"overwrite it (remove it, or drop the flag to use it)")
        if _picked_up(path, inputs, file_glob):
            raise PreprocessError(f"{path}: would be read back as an input document")
    files = _checked_files(inputs, file_glob, json_keys)
    texts = (text for texts, _ in _documents(files, json_keys) if texts for text in texts.values())
    vocab, merges = train_bpe(texts, vocab_size)
    write_bpe(vocab, merges, vocab_file, merge_file)
    return GPT2BPETokenizer(vocab_file, merge_file)


def get_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m megatron_espace.preprocess_data",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True,
                   help="text files, directories, or .jsonl/.json lines files")
    p.add_argument("--output-prefix", required=True,
                   help="writes {PREFIX}_{key}_document.bin/.idx")
    p.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    p.add_argument("--vocab-file", help="GPT2BPETokenizer: encoder.json")
    p.add_argument("--merge-file", help="GPT2BPETokenizer: merges.txt")
    p.add_argument("--tokenizer-model",
                   help="HuggingFaceTokenizer: tokenizer.json, or a directory holding it")
    p.add_argument("--train-tokenizer-vocab-size", type=int, metavar="N",
                   help="first train an N-token byte-level BPE on the inputs and write it to "
                        "the (new) --vocab-file and --merge-file; needs GPT2BPETokenizer")
    p.add_argument("--json-keys", nargs="+", default=["text"],
                   help="fields of each JSON line to tokenize (default: text)")
    p.add_argument("--append-eod", action="store_true",
                   help="end every non-empty document with the end-of-document token")
    p.add_argument("--file-glob", default="*", help="file names to take from directories")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        if args.train_tokenizer_vocab_size is not None:
            if args.tokenizer_type != "GPT2BPETokenizer" or not args.vocab_file \
                    or not args.merge_file:
                raise ValueError("--train-tokenizer-vocab-size needs --tokenizer-type "
                                 "GPT2BPETokenizer, --vocab-file and --merge-file")
            start = time.perf_counter()
            tokenizer = train_tokenizer(args.input, args.train_tokenizer_vocab_size,
                                        args.vocab_file, args.merge_file, args.json_keys,
                                        args.file_glob)
            print(f"trained a {tokenizer.vocab_size:,}-token BPE vocab "
                  f"({len(tokenizer.ranks):,} merges) in {time.perf_counter() - start:.1f}s "
                  f"-> {args.vocab_file} {args.merge_file}")
        else:
            tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file,
                                        args.tokenizer_model)
        result = preprocess(args.input, args.output_prefix, tokenizer, args.json_keys,
                            args.append_eod, args.file_glob, args.workers)
    except (ValueError, OSError) as e:  # PreprocessError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    tokens = ", ".join(f"{n:,} {k}" for k, n in result["tokens"].items())
    print(f"{result['documents']:,} documents ({result['empty']:,} empty), {tokens} tokens "
          f"({result['dtype']}) -> {' '.join(result['files'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
