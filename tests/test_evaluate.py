"""espace evaluate and the lm-eval adapter against float64 references from the model's full
logits: sliding-window perplexity, continuation log-likelihoods, rolling log-likelihoods,
greedy generation, an lm-eval task end to end, the padded vocabulary left out, ESPACE and
compressed checkpoints, and TP=2 against TP=1."""

import json
import math
from pathlib import Path

import pytest
import torch

from tests.harness import run_distributed

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "examples" / "lm_eval"
VOCAB = 257  # ByteLevel; padded to 512 (--make-vocab-size-divisible-by 256 at TP 1 and 2)
SEQ = 32
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--seq-length", str(SEQ), "--make-vocab-size-divisible-by", "256",
         "--init-method-std", "0.2", "--micro-batch-size", "3"]
ESPACE_YAML = ("layers:\n  - match: 'decoder.layers.*'\n    compression: 0.5\n    method: mse\n"
               "rank_multiple: pow2\n")
TEXT = ("Perplexity is the exponential of the mean negative log-likelihood per token.\n"
        "A sliding window with a stride gives each scored token up to a full window of "
        "context; with no overlap every token but the first of each window is scored.")
DOCS = ["The first document of the jsonl file.", "And a second one, shorter."]


def _argv(root, variant="dense", *extra):
    root = Path(root)
    argv = MODEL + ["--load", str(root / variant)]
    if variant != "dense":
        argv += ["--espace-config", str(root / "espace.yaml"), "--espace-projections",
                 str(root / "projections.safetensors")]
    if variant == "compressed":
        argv += ["--espace-compressed"]
    return argv + list(extra)


def _make_checkpoints(root):
    """dense/, espace/ (the same W with P) and compressed/ (A = W P) of one tiny GPT."""
    import megatron_espace as espace
    from megatron_espace import arguments, checkpointing, evaluate, runtime
    from tests.common import random_projections

    root = Path(root)
    args = evaluate.parse_args(_argv(root), need_input=False)
    runtime.initialize()
    torch.manual_seed(0)
    model = arguments.build_model(args, VOCAB)
    with torch.no_grad():  # padding rows whose logits would swamp a softmax over all columns
        emb = model.embedding.word_embeddings.weight
        emb[VOCAB:] = 3 * torch.randn(emb.shape[0] - VOCAB, emb.shape[1])
    checkpointing.save({"model": model.sharded_state_dict()}, root / "dense")
    projs = random_projections(model)
    projs.save(root / "projections.safetensors")
    espace.apply_espace(model, espace.ESPACEConfig.from_yaml(root / "espace.yaml"), projs)
    checkpointing.save({"model": model.sharded_state_dict()}, root / "espace")
    espace.export_compressed(model)
    checkpointing.save({"model": checkpointing.model_sharded_state_dict(model)},
                       root / "compressed")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    (root / "espace.yaml").write_text(ESPACE_YAML)
    (root / "a.txt").write_text(TEXT)
    (root / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return root


# ------------------------------------------------------------------ references (TP=1)


def _logp(model, ids, columns=VOCAB):
    """float64 log-softmax over the first ``columns`` logits after each of ``ids``: [len, columns]."""
    tokens = torch.tensor([ids])
    with torch.no_grad():
        logits = model(tokens, torch.arange(len(ids)).unsqueeze(0), None)[0]
    return torch.log_softmax(logits.double()[:, :columns], -1)


def _continuation(model, context, continuation, columns=VOCAB):
    """Sum of log p of the continuation's bytes given the context, window of SEQ inputs."""
    ids = list((context + continuation).encode())[-(SEQ + 1):]
    n = len(continuation.encode())
    logp = _logp(model, ids[:-1], columns)
    return sum(logp[i - 1, ids[i]].item() for i in range(len(ids) - n, len(ids)))


def _rolling(model, text, eot=256):
    """lm-eval's rolling protocol by hand: the first window after eot, then windows that
    predict the next SEQ tokens (the last one fewer) each with SEQ tokens of input."""
    t = list(text.encode())
    logp = _logp(model, [eot] + t[:SEQ - 1])
    total = sum(logp[i, t[i]].item() for i in range(min(SEQ, len(t))))
    for s in range(SEQ, len(t), SEQ):
        e = min(s + SEQ, len(t))
        logp = _logp(model, t[e - 1 - SEQ:e - 1])  # logp[j] predicts t[e - SEQ + j]
        total += sum(logp[j, t[e - SEQ + j]].item() for j in range(SEQ - (e - s), SEQ))
    return total


def _greedy(model, context, until, steps):
    ids = list(context.encode())[-(SEQ - steps):]
    out = []
    for _ in range(steps):
        token = int(_logp(model, ids + out)[-1].argmax())
        if token == 256:
            break
        out.append(token)
        text = bytes(out).decode(errors="replace")
        if any(u in text for u in until):
            break
    text = bytes(out).decode(errors="replace")
    return text[:min([text.find(u) for u in until if u in text], default=len(text))]


def _sliding_nll(model, ids, stride):
    """The HuggingFace perplexity guide's loop: (summed NLL, scored tokens)."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + SEQ, len(ids))
        target_len = end - prev_end  # tokens of this window not scored before
        window = ids[begin:end]
        logp = _logp(model, window[:-1])
        per_token = [-logp[i, window[i + 1]].item() for i in range(len(window) - 1)]
        kept = per_token[-target_len:] if target_len < len(window) else per_token
        nll += sum(kept)
        count += len(kept)
        prev_end = end
        if end == len(ids):
            break
    return nll, count


def _requests(kind, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i)
            for i, a in enumerate(args_list)]


PAIRS = [("The opposite of hot is", " cold"), ("Two plus two is", " four"),
         ("A long context, cut on the left to fit the window of 32:", " yes"),
         ("", "No context at all")]
PROMPTS = ["The capital of France is", "A week has seven", "Cats"]


def _check_tp1(root):
    """The checkpoints, then everything against references in one process; returns figures
    for the TP=2 run."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from megatron_espace import evaluate, runtime
    from megatron_espace.lm_eval_adapter import MegatronESPACELM

    root = Path(root)
    _make_checkpoints(root)
    runtime.initialize()
    out = {}
    ids = list(("\n".join([TEXT] + DOCS)).encode())
    for variant in ("dense", "espace", "compressed"):
        args = evaluate.parse_args(_argv(root, variant, "--stride", "8"), need_input=False)
        model, tok = evaluate.load_model(args)
        got = evaluate.perplexity(model, ids, tok.vocab_size, args)
        nll, count = _sliding_nll(model, ids, 8)
        assert got["tokens"] == count
        assert abs(got["nll"] - nll / count) < 1e-5 * abs(nll / count), variant
        out[f"nll/{variant}"] = got["nll"]
    # ESPACE changes the model; its compressed form computes the same one
    assert abs(out["nll/espace"] - out["nll/dense"]) > 1e-3
    assert abs(out["nll/compressed"] - out["nll/espace"]) < 1e-5

    args = evaluate.parse_args(_argv(root, "dense"), need_input=False)
    model, tok = evaluate.load_model(args)
    got = evaluate.perplexity(model, ids, tok.vocab_size, args)  # stride = seq-length
    nll, count = _sliding_nll(model, ids, SEQ)
    windows = math.ceil(len(ids) / SEQ)
    assert got["tokens"] == count == len(ids) - windows  # all but each window's first token
    assert abs(got["nll"] - nll / count) < 1e-5 * nll / count

    # a Megatron indexed dataset: its documents' tokens (eod-terminated) in order
    from megatron_espace.preprocess_data import preprocess

    preprocess([str(root / "b.jsonl")], str(root / "indexed"), tok)
    ids = [t for d in DOCS for t in list(d.encode()) + [tok.eod]]
    assert evaluate.read_indexed([str(root / "indexed_text_document")]) == ids

    lm = MegatronESPACELM(model=model, tokenizer=tok, args=args, max_gen_toks=10)
    results = lm.loglikelihood(_requests("loglikelihood", PAIRS))
    for (context, continuation), (logp, _) in zip(PAIRS[:3], results):
        ref = _continuation(model, context, continuation)
        assert abs(logp - ref) < 1e-5 * abs(ref), (context, logp, ref)
        # over all 512 columns (the padded ones too) it would have been far off
        assert abs(_continuation(model, context, continuation, columns=512) - ref) > 10
    # empty context: lm-eval conditions on the end-of-text token (id 256)
    ids0 = [256] + list(PAIRS[3][1].encode())
    logp0 = _logp(model, ids0[:-1])
    ref0 = sum(logp0[i - 1, ids0[i]].item() for i in range(1, len(ids0)))
    assert abs(results[3][0] - ref0) < 1e-5 * abs(ref0)
    with pytest.raises(ValueError, match="must fit the window"):
        lm.loglikelihood(_requests("loglikelihood", [("x", "y" * (SEQ + 1))]))
    # is_greedy: the argmax continuation is greedy, another token is not
    best = int(_logp(model, list(b"Cats"))[-1].argmax())
    (_, yes), (_, no) = lm._loglikelihood_tokens([(None, list(b"Cats"), [best]),
                                                  (None, list(b"Cats"), [(best + 1) % 256])])
    assert yes is True and no is False

    long_text = TEXT[:100]  # 100 bytes: four rolling windows
    (rolled,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(long_text,)]))
    ref = _rolling(model, long_text)
    assert abs(rolled - ref) < 1e-5 * abs(ref)

    gen_kwargs = {"until": ["."], "max_gen_toks": 10, "do_sample": False}
    texts = lm.generate_until(_requests("generate_until", [(p, gen_kwargs) for p in PROMPTS]))
    assert texts == [_greedy(model, p, ["."], 10) for p in PROMPTS]
    assert any(texts)
    with pytest.raises(ValueError, match="only greedy"):
        lm.generate_until(_requests("generate_until", [("x", {"do_sample": True})]))

    # the shipped local task, end to end through lm-eval
    res = lm_eval.simple_evaluate(model=lm, tasks=["espace_tiny"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(TASKS)),
                                  bootstrap_iters=0)
    docs = [json.loads(line) for line in (TASKS / "espace_tiny.jsonl").read_text().split("\n")
            if line.strip()]
    right = [max(range(len(d["choices"])), key=lambda c: _continuation(
        model, d["question"], " " + d["choices"][c])) == d["answer"] for d in docs]
    assert res["results"]["espace_tiny_choice"]["acc,none"] == pytest.approx(
        sum(right) / len(docs))
    gen = {s["doc"]["question"]: s["resps"][0][0] for s in res["samples"]["espace_tiny_complete"]}
    assert gen == {d["question"]: _greedy(model, d["question"], ["\n", "."], 12) for d in docs}
    logps = [_rolling(model, f"{d['question']} {d['choices'][d['answer']]}.") for d in docs]
    words = sum(len(f"{d['question']} {d['choices'][d['answer']]}.".split()) for d in docs)
    assert res["results"]["espace_tiny_text"]["word_perplexity,none"] == pytest.approx(
        math.exp(-sum(logps) / words), rel=1e-5)
    out["texts"] = texts
    out["rolled"] = rolled
    out["loglikelihood"] = [r[0] for r in results]
    out["cli"] = _cli(root)  # the command, in this process group
    return out


def _cli(root, *layout):
    from megatron_espace import evaluate

    root = Path(root)
    out = root / f"cli{''.join(layout)}.json"
    argv = _argv(root, "compressed", *layout, "--text", str(root / "a.txt"),
                 str(root / "b.jsonl"), "--stride", "8", "--json", str(out), "--tasks",
                 "espace_tiny", "--include-path", str(TASKS), "--bootstrap-iters", "0")
    assert evaluate.main(argv) == 0
    return json.loads(out.read_text()) if out.exists() else None


def test_evaluate_against_references(root):
    (res,) = run_distributed(_check_tp1, nprocs=1, root=str(root))
    cli = res["cli"]
    assert cli["nll"] == pytest.approx(res["nll/compressed"], rel=1e-6)
    assert cli["ppl"] == pytest.approx(math.exp(cli["nll"]))
    assert set(cli["lm_eval"]["results"]) >= {"espace_tiny_choice", "espace_tiny_complete",
                                              "espace_tiny_text"}
    (root / "tp1.json").write_text(json.dumps(res))


def _adapter_figures(root, layout):
    """The adapter's numbers at a parallel layout, and the command's JSON."""
    from megatron_espace.lm_eval_adapter import MegatronESPACELM

    lm = MegatronESPACELM(argv=_argv(root, "dense", *layout), max_gen_toks=10)
    results = lm.loglikelihood(_requests("loglikelihood", PAIRS))
    (rolled,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(TEXT[:100],)]))
    gen_kwargs = {"until": ["."], "max_gen_toks": 10}
    texts = lm.generate_until(_requests("generate_until", [(p, gen_kwargs) for p in PROMPTS]))
    return {"loglikelihood": [r[0] for r in results], "rolled": rolled, "texts": texts,
            "cli": _cli(root, *layout)}


@pytest.mark.parametrize("layout", [["--tensor-model-parallel-size", "2"]], ids=["tp2"])
def test_parallel_layout_matches_tp1(root, layout):
    if not (root / "tp1.json").exists():
        pytest.skip("needs test_evaluate_against_references")
    ref = json.loads((root / "tp1.json").read_text())
    res = run_distributed(_adapter_figures, nprocs=2, root=str(root), layout=layout)
    for r in res:
        assert r["texts"] == ref["texts"]
        torch.testing.assert_close(r["loglikelihood"], ref["loglikelihood"], rtol=1e-5, atol=0)
        assert r["rolled"] == pytest.approx(ref["rolled"], rel=1e-5)
    cli, ref_cli = res[0]["cli"], ref["cli"]
    assert res[1]["cli"] is None  # rank 0 writes
    assert cli["tokens"] == ref_cli["tokens"]
    assert cli["nll"] == pytest.approx(ref_cli["nll"], rel=1e-5)
    for task, metrics in ref_cli["lm_eval"]["results"].items():
        for name, value in metrics.items():
            if isinstance(value, float):
                assert cli["lm_eval"]["results"][task][name] == pytest.approx(value, rel=1e-5), \
                    (task, name)


# ------------------------------------------------------------------ bad input (no model)


def test_bad_input_names_file_and_line(tmp_path):
    from megatron_espace.evaluate import parse_args, read_texts, windows

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"txt": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: expected an object with a string "
                                         r"field 'text'"):
        read_texts([str(bad)])
    bad.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_texts([str(bad)])
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match=r"latin.txt: not UTF-8"):
        read_texts([str(latin)])
    good = tmp_path / "good.txt"
    good.write_text("one\n")
    bad.write_text('{"text": "two"}\n{"text": "three"}\n')
    assert read_texts([str(good), str(bad)]) == "one\n\ntwo\nthree"
    with pytest.raises(SystemExit):
        parse_args(MODEL + ["--load", "x", "--text", "f", "--stride", "33"])
    # no overlap: every token scored once but each window's first; overlap: each scored once
    assert windows(10, 4, 4) == [(0, 4, 3), (4, 8, 3), (8, 10, 1)]
    assert windows(10, 4, 2) == [(0, 4, 3), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert windows(9, 4, 4) == [(0, 4, 3), (4, 8, 3)]  # a last window of one token scores none
