"""Tokenizers, preprocess_data and the GPTDataset data path (data.py)."""

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_espace import data, preprocess_data
from megatron_espace.preprocess_data import PreprocessError, preprocess
from megatron_espace.tokenizer import ByteLevel, build_tokenizer
from tests.harness import run_distributed

TEXTS = {  # file name -> content; sorted order is the document order
    "a.txt": "The first document.\nTwo lines.\n",
    "b.txt": "",  # empty: counted, but no sequence
    "sub/c.txt": "Dritte Datei: Grüße, ☃ and 12 numbers 34.\n" * 3,
}
JSONL = [
    {"text": "json one", "meta": 1},
    {"text": "json two is a bit longer than json one, to cross sample boundaries"},
    {"text": "json three ends it"},
]


def write_corpus(root):
    """Text files under root/corpus/ (plus a hidden one) and root/docs.jsonl; the texts in order."""
    for name, text in TEXTS.items():
        (root / "corpus" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "corpus" / name).write_text(text, encoding="utf-8")
    (root / "corpus" / ".hidden.txt").write_text("never read")
    (root / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in JSONL) + "\n")
    return list(TEXTS.values()) + [r["text"] for r in JSONL]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A ByteLevel dataset with eod: (prefix, expected sequences as token lists, result)."""
    root = tmp_path_factory.mktemp("corpus")
    texts = write_corpus(root)
    tok = ByteLevel()
    result = preprocess([root / "corpus", root / "docs.jsonl"], str(root / "out" / "corpus"), tok,
                        append_eod=True)
    sequences = [tok.tokenize(t) + [tok.eod] for t in texts if t]
    return result["prefixes"]["text"], sequences, result


# ----------------------------------------------------------------------------- tokenizers

def test_byte_level_round_trip():
    tok = build_tokenizer("ByteLevel")
    text = "plain ascii, Grüße ☃\n"
    ids = tok.tokenize(text)
    assert ids == list(text.encode("utf-8")) and (tok.vocab_size, tok.eod) == (257, 256)
    assert tok.detokenize(ids + [tok.eod]) == text


def _bpe_files(tmp_path, merges):
    # GPT-2's byte symbols: Ġ is " ", Ċ is "\n", and "é" (bytes C3 A9) is "Ã©"
    symbols = list("abcdefghijklmnopqrstuvwxyz") + ["Ġ", "Ċ", "Ã", "©"]
    tokens = symbols + ["ab", "bc", "Ġa", "Ġabc", "dd", "dddd", "<|endoftext|>"]
    vocab, merge = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    merge.write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges), encoding="utf-8")
    return str(vocab), str(merge), tokens


def test_gpt2_bpe_merges_by_rank_and_round_trips(tmp_path):
    vocab, merges, tokens = _bpe_files(tmp_path, ["b c", "a b", "Ġ a", "Ġa bc", "d d", "dd dd"])
    tok = build_tokenizer("GPT2BPETokenizer", vocab, merges)
    text = "abc abc dddd ddd\né"
    ids = tok.tokenize(text)
    # "abc": (b,c) outranks (a,b) although (a,b) comes first; "dddd": d d -> dd dd -> dddd
    assert [tokens[i] for i in ids] == ["a", "bc", "Ġabc", "Ġ", "dddd", "Ġ", "dd", "d", "Ċ",
                                        "Ã", "©"]
    assert tok.detokenize(ids) == text
    assert (tok.vocab_size, tok.eod) == (len(tokens), tokens.index("<|endoftext|>"))

    (tmp_path / "swapped").mkdir()
    vocab, merges, _ = _bpe_files(tmp_path / "swapped", ["a b", "b c"])
    swapped = build_tokenizer("GPT2BPETokenizer", vocab, merges)
    assert [tokens[i] for i in swapped.tokenize("abc")] == ["ab", "c"]


def test_build_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown --tokenizer-type 'BPE'"):
        build_tokenizer("BPE")
    with pytest.raises(ValueError, match="needs --vocab-file and --merge-file"):
        build_tokenizer("GPT2BPETokenizer")
    vocab = tmp_path / "v.json"
    vocab.write_text('{"a": 0}')
    (tmp_path / "m.txt").write_text("")
    with pytest.raises(ValueError, match=r"v\.json: no '<\|endoftext\|>' token"):
        build_tokenizer("GPT2BPETokenizer", str(vocab), str(tmp_path / "m.txt"))


# ----------------------------------------------------------------------------- preprocess_data

def test_preprocess_round_trip_through_indexed_dataset(corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix, sequences, result = corpus
    ds = IndexedDataset(prefix)
    assert ds.index.dtype == np.uint16 and result["dtype"] == "uint16"
    assert [ds[i].tolist() for i in range(len(ds))] == sequences
    # 6 documents; the empty b.txt has no sequence; hidden files are skipped
    assert ds.document_indices.tolist() == [0, 1, 1, 2, 3, 4, 5]
    assert (result["documents"], result["empty"]) == (6, 1)
    assert result["tokens"] == {"text": sum(map(len, sequences))}
    files = sorted(p.name for p in Path(prefix).parent.iterdir())
    assert files == ["corpus_text_document.bin", "corpus_text_document.idx"]  # no temporaries


def test_preprocess_cli_gpt2_with_workers(tmp_path, capsys):
    vocab, merges, _ = _bpe_files(tmp_path, ["b c", "a b", "Ġ a", "Ġa bc", "d d", "dd dd"])
    lines = [{"title": "abc", "text": "dddd abc"}, {"title": "bad", "text": "dd\né"}] * 40
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    args = ["--input", str(tmp_path / "in.jsonl"), "--tokenizer-type", "GPT2BPETokenizer",
            "--vocab-file", vocab, "--merge-file", merges, "--json-keys", "title", "text",
            "--append-eod"]
    assert preprocess_data.main(args + ["--output-prefix", str(tmp_path / "one")]) == 0
    assert "80 documents (0 empty)" in capsys.readouterr().out
    assert preprocess_data.main(args + ["--output-prefix", str(tmp_path / "two"),
                                        "--workers", "2"]) == 0
    for key in ("title", "text"):
        for ext in (".bin", ".idx"):
            one = (tmp_path / f"one_{key}_document{ext}").read_bytes()
            assert one == (tmp_path / f"two_{key}_document{ext}").read_bytes()


def test_preprocess_errors_name_file_line_and_key(tmp_path, capsys):
    tok = ByteLevel()
    out = str(tmp_path / "out" / "x")
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "kept"}\n')
    preprocess([good], out, tok)
    before = (tmp_path / "out" / "x_text_document.bin").read_bytes()

    cases = {
        "notjson.jsonl": ('{"text": "ok"}\n{"text": oops}\n', r"notjson\.jsonl:2: not a JSON line"),
        "nokey.jsonl": ('{"text": "ok"}\n\n{"body": "x"}\n',
                        r"nokey\.jsonl:3: no key 'text' \(keys: 'body'\)"),
        "notstr.jsonl": ('{"text": 5}\n', r"notstr\.jsonl:1: key 'text' is int, not a string"),
        "latin1.txt": (b"caf\xe9", r"latin1\.txt: not UTF-8 text \(byte 3\)"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(PreprocessError, match=message):
            preprocess([good, path], out, tok)
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n\n')
    with pytest.raises(PreprocessError, match=r"empty\.jsonl: no tokens for 'text' in 1 documents"):
        preprocess([tmp_path / "empty.jsonl"], out, tok)
    with pytest.raises(PreprocessError, match=r"missing\.txt: no such file or directory"):
        preprocess([good, tmp_path / "missing.txt"], out, tok)
    clash = tmp_path / "y_text_document.bin"
    clash.write_text("an input named like an output")
    with pytest.raises(PreprocessError, match=r"y_text_document\.bin: is an input"):
        preprocess([clash], str(tmp_path / "y"), tok)
    assert clash.read_text() == "an input named like an output"
    (tmp_path / "dir").mkdir()
    with pytest.raises(PreprocessError, match=r"dir: no files matching --file-glob '\*\.txt'"):
        preprocess([tmp_path / "dir"], out, tok, file_glob="*.txt")
    # failed runs left the earlier dataset as it was, and no temporaries
    assert (tmp_path / "out" / "x_text_document.bin").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x_text_document.bin",
                                                                    "x_text_document.idx"]
    assert preprocess_data.main(["--input", str(tmp_path / "nokey.jsonl"), "--output-prefix",
                                 out, "--tokenizer-type", "ByteLevel"]) == 1
    assert "error: " in capsys.readouterr().err


# ----------------------------------------------------------------------------- datasets

def test_gpt_dataset_samples_are_windows_of_the_token_stream(megatron_tp1, corpus, tmp_path):
    prefix, sequences, _ = corpus
    seq = 16
    stream_len = sum(map(len, sequences))
    train, valid, test = data.build_datasets(
        [prefix], seq_length=seq, num_samples=(2 * stream_len // seq, None, None),
        tokenizer=ByteLevel(), split="100,0,0", path_to_cache=str(tmp_path / "cache"))
    assert valid is None and test is None
    assert len(train) >= 2 * stream_len // seq
    # GPTDataset concatenates its shuffled document order (here 2 epochs) into one stream ...
    stream = np.concatenate([sequences[d] for d in train.document_index])
    starts = np.cumsum([0] + [len(sequences[d]) for d in train.document_index])
    positions = []
    for i in range(len(train)):
        doc, offset = train.sample_index[train.shuffle_index[i]]
        pos = int(starts[doc] + offset)
        positions.append(pos)
        window = torch.from_numpy(stream[pos:pos + seq + 1].astype(np.int64))
        sample = train[i]
        # ... and cuts it into windows of seq_length + 1 tokens, split into tokens and labels
        assert torch.equal(sample["tokens"], window[:-1]) and torch.equal(sample["labels"],
                                                                           window[1:])
        assert torch.equal(sample["position_ids"], torch.arange(seq))
        assert torch.equal(sample["loss_mask"], torch.ones(seq))
    assert sorted(positions) == list(range(0, len(train) * seq, seq))


def test_parse_data_path():
    assert data.parse_data_path(["a/b_text_document"]) == (["a/b_text_document"], None)
    assert data.parse_data_path(["A", "B"]) == (["A", "B"], None)
    assert data.parse_data_path("0.3 A 0.7 B") == (["A", "B"], [0.3, 0.7])
    assert data.parse_data_path(["30", "A", "70", "B"]) == (["A", "B"], [30.0, 70.0])
    for bad, message in [([], "no dataset prefix"), (["0.3", "A", "B"], "'0.3' is neither"),
                         (["A", "0.5"], "'0.5' is neither"), (["-1", "A"], "weights must be"),
                         (["0.5", "0.5"], "'0.5' stands where a dataset prefix should")]:
        with pytest.raises(ValueError, match=message):
            data.parse_data_path(bad)


def _two_prefixes(root):
    tok = ByteLevel()
    for name, letter in (("A", "a"), ("B", "b")):
        (root / f"{name}.jsonl").write_text("".join(
            json.dumps({"text": letter * (20 + i)}) + "\n" for i in range(10)))
        preprocess([root / f"{name}.jsonl"], str(root / name), tok)
    return str(root / "A_text_document"), str(root / "B_text_document")


def test_blended_build_of_two_prefixes(megatron_tp1, tmp_path):
    a, b = _two_prefixes(tmp_path)
    train, valid, test = data.build_datasets(
        ["0.25", a, "0.75", b], seq_length=8, num_samples=(40, 8, 0), tokenizer=ByteLevel(),
        split="80,20,0")
    assert test is None and (len(train), len(valid)) == (40, 8)
    assert (tmp_path / "cache").is_dir()  # the default: beside the first prefix
    ids = [train[i]["dataset_id"] for i in range(len(train))]
    assert ids.count(0) == 10 and ids.count(1) == 30
    for i in range(len(train)):
        letter = ord("ab"[ids[i]])
        assert set(train[i]["tokens"].tolist()) <= {letter, 256}
    with pytest.raises(ValueError, match="needs all three sample counts"):
        data.build_datasets(["1", a, "1", b], seq_length=8, num_samples=(40, 8, None),
                            tokenizer=ByteLevel(), split="80,20,0")


def test_build_datasets_errors(megatron_tp1, corpus, tmp_path):
    prefix, _, _ = corpus
    with pytest.raises(FileNotFoundError, match="no dataset .*nothing.bin"):
        data.build_datasets([str(tmp_path / "nothing")], seq_length=8, num_samples=(1, 1, 1),
                            tokenizer=ByteLevel())
    # 5 sequences at 949,50,1: the valid split gets none; megatron itself would loop forever
    with pytest.raises(ValueError, match="valid split of --split 949,50,1 gets none of its 5"):
        data.build_datasets([prefix], seq_length=8, num_samples=(10, 2, 0), tokenizer=ByteLevel(),
                            path_to_cache=str(tmp_path))


def _cat(batches):
    return {k: torch.cat([b[k] for b in batches]) for k in data.BATCH_KEYS}


def test_batch_iterator_splits_data_parallel_ranks_and_resumes(megatron_tp1, corpus, tmp_path):
    prefix, _, _ = corpus
    (train, _, _) = data.build_datasets([prefix], seq_length=8, num_samples=(50, None, None),
                                        tokenizer=ByteLevel(), split="100,0,0",
                                        path_to_cache=str(tmp_path))
    whole = list(data.batch_iterator(train, 4))
    ranks = [list(data.batch_iterator(train, 2, dp_rank=r, dp_size=2)) for r in range(2)]
    assert len(whole) == len(ranks[0]) == len(ranks[1]) == len(train) // 4
    for step, batch in enumerate(whole):
        assert batch["tokens"].shape == (4, 8) and batch["loss_mask"].dtype == torch.float32
        both = _cat([ranks[0][step], ranks[1][step]])
        assert all(torch.equal(both[k], batch[k]) for k in data.BATCH_KEYS)
        assert not torch.equal(ranks[0][step]["tokens"], ranks[1][step]["tokens"])
    resumed = list(data.batch_iterator(train, 2, start=3 * 4, dp_rank=1, dp_size=2))
    assert len(resumed) == len(ranks[1]) - 3
    for a, b in zip(resumed, ranks[1][3:]):
        assert all(torch.equal(a[k], b[k]) for k in data.BATCH_KEYS)
    with pytest.raises(ValueError, match="dp_rank=2"):
        next(data.batch_iterator(train, 2, dp_rank=2, dp_size=2))


def test_cache_writers_wait_for_each_other(megatron_tp1, corpus, tmp_path):
    """A second job's builder waits while another holds the cache lock, then reads its cache."""
    prefix, _, _ = corpus
    cache = str(tmp_path / "cache")
    built = []
    with data._cache_lock(cache):
        worker = threading.Thread(target=lambda: built.append(data.build_datasets(
            [prefix], seq_length=8, num_samples=(20, None, None), tokenizer=ByteLevel(),
            split="100,0,0", path_to_cache=cache)))
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive() and not built
    worker.join(timeout=30)
    assert len(built[0][0]) >= 20


def _distributed_batches(prefix, cache):
    from megatron_espace import runtime

    runtime.initialize()
    rank = torch.distributed.get_rank()
    (train, _, _) = data.build_datasets([prefix], seq_length=8, num_samples=(40, None, None),
                                        tokenizer=ByteLevel(), split="100,0,0",
                                        path_to_cache=cache)
    return {"tokens": torch.stack([b["tokens"] for b in
                                   data.batch_iterator(train, 2, dp_rank=rank, dp_size=2)])}


def test_two_ranks_build_one_cache_and_take_disjoint_halves(megatron_tp1, corpus, tmp_path):
    prefix, _, _ = corpus
    cache = str(tmp_path / "cache")
    ranks = run_distributed(_distributed_batches, nprocs=2, timeout=120, prefix=prefix, cache=cache)
    (train, _, _) = data.build_datasets([prefix], seq_length=8, num_samples=(40, None, None),
                                        tokenizer=ByteLevel(), split="100,0,0",
                                        path_to_cache=cache)
    whole = torch.stack([b["tokens"] for b in data.batch_iterator(train, 4)])
    assert torch.equal(torch.cat([ranks[0]["tokens"], ranks[1]["tokens"]], dim=1), whole)


def test_eod_flags_reach_the_samples(megatron_tp1, corpus, tmp_path):
    prefix, _, _ = corpus
    (train, _, _) = data.build_datasets([prefix], seq_length=16, num_samples=(None, None, None),
                                        tokenizer=ByteLevel(), split="100,0,0",
                                        reset_position_ids=True, eod_mask_loss=True,
                                        path_to_cache=str(tmp_path))
    eods = 0
    for i in range(len(train)):
        sample = train[i]
        tokens = sample["tokens"].tolist()
        expected, pos = [], 0
        for t in tokens:
            expected.append(pos)
            pos = 0 if t == 256 else pos + 1
        assert sample["position_ids"].tolist() == expected
        assert sample["loss_mask"].tolist() == [float(t != 256) for t in tokens]
        eods += tokens.count(256)
    assert eods >= 4


def test_a_re_preprocessed_prefix_gets_new_indices(megatron_tp1, tmp_path, capsys):
    """Preprocessing a prefix again with other text, keeping the index cache: the cached
    indices are not reused (they would point into the old documents); the change is said."""
    tok = ByteLevel()
    cache, prefix = str(tmp_path / "cache"), str(tmp_path / "out" / "doc")

    def build(texts, path_to_cache):
        (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        preprocess([tmp_path / "in.jsonl"], prefix, tok, append_eod=True)
        train, _, _ = data.build_datasets([prefix + "_text_document"], seq_length=8,
                                          num_samples=(None, None, None), tokenizer=tok,
                                          split="100,0,0", path_to_cache=path_to_cache)
        return [train[i]["tokens"] for i in range(len(train))]

    build(["a first corpus, long enough for several samples " * 4, "and a second doc"], cache)
    assert "changed" not in capsys.readouterr().out
    short = ["other", "text"]
    samples = build(short, cache)  # megatron alone would reuse the 25 old samples' indices
    out = capsys.readouterr().out
    assert "the dataset changed since its index cache was built (bin_bytes, idx differ)" in out
    fresh = build(short, str(tmp_path / "fresh"))
    assert len(samples) == len(fresh) == 1 and all(map(torch.equal, samples, fresh))
    assert len(os.listdir(cache)) == 4  # two content-keyed directories, datasets.json, .lock
