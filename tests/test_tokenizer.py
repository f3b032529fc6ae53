"""HuggingFaceTokenizer (tokenizer.json), train_bpe / save_bpe, and preprocess_data's
--train-tokenizer-vocab-size."""

import json

import numpy as np
import pytest

from megatron_espace import preprocess_data
from megatron_espace.tokenizer import (BYTE_SYMBOLS, GPT2BPETokenizer, HuggingFaceTokenizer,
                                       build_tokenizer, save_bpe, train_bpe)

UNSEEN = "Unseen: Grüße, naïve café ☃ 𝄞 🙂 ½\ttabs\r\n  indented 12345 <tags>!\n"
CORPUS = [  # a small training corpus: repeated prose and code-like lines
    f"The quick brown fox {i} jumps over the lazy dog; the dog sleeps.\n"
    f"def function_{i % 7}(value):\n    return value * {i} + 1\n"
    for i in range(60)
]

# ----------------------------------------------------------------------------- tokenizer.json

# all 256 byte symbols, some merges (Ġ is " "), and <|endoftext|> as an added token
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("3", "4"), ("4", "5"), ("Ã", "¼")]


def _tokenizer_json(path, merges=MERGES, pre_tokenizer=None, model_type="BPE", **model):
    tokens = BYTE_SYMBOLS + [a + b for a, b in merges]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    eod = len(vocab)
    # both merge syntaxes: "a b" strings (older files) and [a, b] lists (newer ones)
    listed = [f"{a} {b}" if i % 2 else [a, b] for i, (a, b) in enumerate(merges)]
    spec = {
        "version": "1.0",
        "added_tokens": [{"id": eod, "content": "<|endoftext|>", "special": True,
                          "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False}],
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer or {"type": "ByteLevel", "add_prefix_space": False,
                                           "trim_offsets": True, "use_regex": True},
        "post_processor": {"type": "ByteLevel", "trim_offsets": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True},
        "model": {"type": model_type, "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "vocab": vocab, "merges": listed,
                  **model},
    }
    path.write_text(json.dumps(spec), encoding="utf-8")
    return vocab, eod


def test_hf_tokenizer_matches_gpt2_bpe_on_the_same_vocab_and_merges(tmp_path):
    vocab, eod = _tokenizer_json(tmp_path / "tokenizer.json")
    hf = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "tokenizer.json"))
    gpt2 = GPT2BPETokenizer(*save_bpe({**vocab, "<|endoftext|>": eod}, MERGES, tmp_path / "gpt2"))
    text = "the theme: 12345 über the top " + UNSEEN
    ids = hf.tokenize(text)
    assert ids == gpt2.tokenize(text) and hf.detokenize(ids) == text
    decoder = {i: t for t, i in vocab.items()}
    assert [decoder[i] for i in hf.tokenize("the 345 ü")] == ["t", "he", "Ġ", "34", "5", "Ġ",
                                                               "Ã¼"]
    assert (hf.eod, hf.vocab_size) == (eod, eod + 1) == (gpt2.eod, gpt2.vocab_size)
    # as in HuggingFace, an added token written in the text is that token
    assert hf.tokenize("a<|endoftext|>b") == [vocab["a"], eod, vocab["b"]]
    assert hf.detokenize([vocab["a"], eod]) == "a<|endoftext|>"


def test_hf_tokenizer_llama3_split_directory_and_config_eos(tmp_path):
    split = {"type": "Split", "behavior": "Isolated", "invert": False, "pattern": {
        "Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"}}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}
    vocab, eod = _tokenizer_json(tmp_path / "tokenizer.json", ignore_merges=True,
                                 pre_tokenizer={"type": "Sequence",
                                                "pretokenizers": [split, byte_level]})
    tok = HuggingFaceTokenizer(str(tmp_path))  # a directory holding tokenizer.json
    # digits split in threes: "123" "45", so (3, 4) never applies
    assert tok.tokenize("12345") == [vocab[c] for c in ("1", "2", "3", "45")]
    assert tok.detokenize(tok.tokenize(UNSEEN)) == UNSEEN and tok.eod == eod
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "Ġthe"}))
    assert HuggingFaceTokenizer(str(tmp_path / "tokenizer.json")).eod == vocab["Ġthe"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eot>"}))
    with pytest.raises(ValueError, match=r"no token '<eot>' \(the eos_token of .*config\.json"):
        HuggingFaceTokenizer(str(tmp_path))


@pytest.mark.parametrize("model_type", ["Unigram", "WordPiece"])
def test_hf_tokenizer_refuses_other_models_naming_the_file(tmp_path, model_type):
    _tokenizer_json(tmp_path / "tok.json", model_type=model_type)
    with pytest.raises(ValueError, match=rf"tok\.json: model type '{model_type}' is not "
                                         r"supported; only byte-level BPE"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "tok.json"))


def test_hf_tokenizer_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"type": "BPE",')
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        HuggingFaceTokenizer(str(bad))
    _tokenizer_json(bad, pre_tokenizer={"type": "Metaspace"})
    with pytest.raises(ValueError, match=r"bad\.json: pre-tokenizer 'Metaspace' is not supported"):
        HuggingFaceTokenizer(str(bad))
    _tokenizer_json(bad, merges=[("a", "b")])
    spec = json.loads(bad.read_text())
    spec["model"]["merges"] = ["a b c"]
    bad.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"bad\.json: model\.merges\[0\] is 'a b c'"):
        HuggingFaceTokenizer(str(bad))
    with pytest.raises(ValueError, match="HuggingFaceTokenizer needs --tokenizer-model"):
        build_tokenizer("HuggingFaceTokenizer")
    with pytest.raises(ValueError, match="GPT2BPETokenizer takes no --tokenizer-model"):
        build_tokenizer("GPT2BPETokenizer", "v.json", "m.txt", str(bad))


# ----------------------------------------------------------------------------- train_bpe

def test_train_bpe_merges_the_most_frequent_pair_first():
    # each text is one pre-token: (a,b) x10, (c,d) x7, (b,a) x5, then (ab,ab) x5;
    # (e,f) and (g,h) tie at 2 and are taken in pair order
    texts = ["abab"] * 5 + ["cd"] * 7 + ["ef", "gh", "gh", "ef"]
    vocab, merges = train_bpe(texts, 256 + 5 + 1)
    assert merges == [("a", "b"), ("c", "d"), ("ab", "ab"), ("e", "f"), ("g", "h")]
    assert len(vocab) == 262 and sorted(vocab.values()) == list(range(262))
    assert [vocab[t] for t in ("ab", "cd", "abab", "ef", "gh", "<|endoftext|>")] == \
        list(range(256, 262))
    assert all(vocab[s] == b for b, s in enumerate(BYTE_SYMBOLS))
    assert len(train_bpe(texts, 10_000)[0]) == 262  # fewer once every pre-token is whole
    with pytest.raises(ValueError, match="at least 257 tokens"):
        train_bpe(texts, 256)


def test_train_bpe_round_trips_unseen_text_and_is_deterministic(tmp_path):
    vocab, merges = train_bpe(CORPUS, 350)
    assert len(vocab) == 350 and len(merges) >= 350 - 257
    assert train_bpe(iter(CORPUS), 350) == (vocab, merges)
    vocab_file, merge_file = save_bpe(vocab, merges, tmp_path)
    assert open(merge_file, encoding="utf-8").readline().startswith("#version")
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file, merge_file)
    assert tok.vocab_size == 350 and tok.eod == 349
    ids = tok.tokenize(CORPUS[3])
    assert len(ids) < len(CORPUS[3]) / 2  # the corpus itself compresses
    assert tok.detokenize(tok.tokenize(UNSEEN)) == UNSEEN
    with pytest.raises(FileExistsError, match=r"vocab\.json: exists"):
        save_bpe(vocab, merges, tmp_path)


# ----------------------------------------------------------------------------- preprocess_data

def test_preprocess_cli_trains_the_tokenizer_then_refuses_to_overwrite(tmp_path, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(CORPUS[0] + UNSEEN, encoding="utf-8")
    (tmp_path / "in" / "b.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in CORPUS[1:]), encoding="utf-8")
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "in"), "--output-prefix", str(out / "data"),
            "--tokenizer-type", "GPT2BPETokenizer", "--train-tokenizer-vocab-size", "300",
            "--vocab-file", str(out / "vocab.json"), "--merge-file", str(out / "merges.txt"),
            "--append-eod"]
    assert preprocess_data.main(args) == 0
    assert "trained a 300-token BPE vocab" in capsys.readouterr().out
    tok = GPT2BPETokenizer(out / "vocab.json", out / "merges.txt")
    ds = IndexedDataset(str(out / "data_text_document"))
    expected = [tok.tokenize(t) + [tok.eod] for t in [CORPUS[0] + UNSEEN] + CORPUS[1:]]
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    assert ds.index.dtype == np.uint16

    before = (out / "vocab.json").read_bytes()
    assert preprocess_data.main(args) == 1
    assert "vocab.json: exists; --train-tokenizer-vocab-size will not overwrite it" \
        in capsys.readouterr().err
    assert (out / "vocab.json").read_bytes() == before
    assert preprocess_data.main(args[:-7] + ["--tokenizer-type", "ByteLevel",
                                             "--train-tokenizer-vocab-size", "300"]) == 1
    assert "needs --tokenizer-type GPT2BPETokenizer" in capsys.readouterr().err
    inside = args[:-5] + ["--vocab-file", str(tmp_path / "in" / "v.json"), "--merge-file",
                          str(out / "m.txt")]
    assert preprocess_data.main(inside) == 1
    assert "v.json: would be read back as an input document" in capsys.readouterr().err
