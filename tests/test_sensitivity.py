"""The sensitivity study: scores cached and resumed, ranking consistent with the scores, the
progressive curve starting at the baseline, and the selection rules."""

import json
import math
import os

import numpy as np
import pytest
import torch

import megatron_espace as espace
from megatron_espace.sensitivity import SensitivityStudy, knee, report, select, write_config
from tests.common import gpt_model, token_batch, train_steps, transformer_config

METHODS = ["mse", "nmse", "weight_svd"]


@pytest.fixture(scope="module")
def trained(megatron_tp1):
    torch.manual_seed(0)
    model = gpt_model(transformer_config())
    train_steps(model, steps=15, batch=token_batch(batch=8, seed=1))
    cfg = espace.ESPACEConfig.from_dict({"calibration": {"methods": METHODS}, "layers": [
        {"match": "decoder.layers.*", "rank": 16, "method": "mse"}]})

    def loop(m):
        with torch.no_grad():
            for seed in (1, 2):
                t, p, _ = token_batch(batch=8, seed=seed)
                m(t, p, None)

    projs = espace.calibrate(model, loop, cfg).projections()
    return model, projs


class Counter:
    def __init__(self, batch=8, seeds=(11, 12)):
        self.calls = 0
        self.batches = [token_batch(batch=batch, seed=s) for s in seeds]

    def __call__(self, model):
        self.calls += 1
        with torch.no_grad():
            return sum(model(t, p, None, labels=lab).float().mean().item()
                       for t, p, lab in self.batches) / len(self.batches)


def _study(trained, tmp_path, evaluate):
    model, projs = trained
    layers = {name: 16 for name in projs.layers()}
    return SensitivityStudy(model, projs, layers, evaluate, cache=tmp_path / "cache.json",
                            fingerprint={"study": "test"})


def test_study_ranks_caches_and_resumes(trained, tmp_path):
    evaluate = Counter()
    study = _study(trained, tmp_path, evaluate)
    results = study.run()
    assert evaluate.calls == 1 + 8 * len(METHODS) + 8
    ranking = study.ranking()
    for row in ranking:  # each layer's best method, layers from least to most harmful
        assert row["loss"] == min(results["single"][row["layer"]].values())
    assert [r["loss"] for r in ranking] == sorted(r["loss"] for r in ranking)
    curve = results["progressive"]
    assert curve[0]["loss"] == results["baseline"] and curve[0]["gemm_compression"] == 0
    assert [p["layer"] for p in curve[1:]] == [r["layer"] for r in ranking]
    assert all(a["gemm_compression"] < b["gemm_compression"] for a, b in zip(curve, curve[1:]))
    # the model is dense again afterwards, and the last point is "all layers, best methods"
    model, projs = trained
    assert evaluate(model) == results["baseline"]
    full = espace.ESPACEConfig.from_dict({"calibration": {"methods": METHODS}, "layers": [
        {"match": r["layer"], "rank": 16, "method": r["method"]} for r in ranking]})
    torch.manual_seed(0)
    check = gpt_model(transformer_config())
    check.load_state_dict(model.state_dict(), strict=False)
    espace.apply_espace(check, full, projs)
    assert evaluate(check) == pytest.approx(curve[-1]["loss"], rel=1e-6)

    # a rerun measures nothing; a cache cut short is completed
    again = Counter()
    assert _study(trained, tmp_path, again).run() == results and again.calls == 0
    cache = json.loads((tmp_path / "cache.json").read_text())
    del cache["single"][ranking[0]["layer"]]["nmse"]
    cache["progressive"] = cache["progressive"][:4]
    (tmp_path / "cache.json").write_text(json.dumps(cache))
    partial = Counter()
    resumed = _study(trained, tmp_path, partial).run()
    assert partial.calls == 1 + 5
    assert resumed == results

    with pytest.raises(ValueError, match="belongs to another study"):
        SensitivityStudy(model, projs, {n: 16 for n in projs.layers()}, Counter(),
                         cache=tmp_path / "cache.json", fingerprint={"study": "other"})


def _curve(ppls, comps):
    return [{"ppl": p, "loss": math.log(p), "gemm_compression": c, "model_size": 1 - c,
             "layer": None if i == 0 else f"l{i}", "method": None if i == 0 else "mse"}
            for i, (p, c) in enumerate(zip(ppls, comps))]


def test_selection_rules():
    curve = _curve([10.0, 10.01, 10.03, 10.05, 10.4, 12.0], [0, .1, .2, .3, .4, .5])
    assert select(curve, target_compression=0.25) == 3
    assert select(curve, target_compression=0.5) == 5
    with pytest.raises(ValueError, match=r"target compression 60.0% is unreachable: "
                                         r"compressing all 5 selected layers .* reaches 50.0%"):
        select(curve, target_compression=0.6)
    assert select(curve, max_ppl_increase=0.006) == 3
    assert select(curve, max_ppl_increase=0.0005) == 0
    bend = _curve([10.0, 10.01, 10.02, 10.03, 11.0, 12.5], [0, .1, .2, .3, .4, .5])
    assert select(bend, inflection=True) == 3  # flat up to 3 layers, steep after
    assert knee([0, 1, 2], [1, 1, 5]) == 1
    with pytest.raises(ValueError, match="exactly one"):
        select(curve, target_compression=0.2, inflection=True)


def test_written_config_is_consumed_directly(trained, tmp_path):
    model, projs = trained
    ranking = [{"layer": n, "method": "nmse", "rank": 8, "loss": 1.0} for n in projs.layers()]
    write_config(tmp_path / "chosen.yaml", ranking, 3, METHODS)
    cfg = espace.ESPACEConfig.from_yaml(tmp_path / "chosen.yaml")
    assert [r.match for r in cfg.layers] == sorted(projs.layers()[:3])
    torch.manual_seed(0)
    fresh = gpt_model(transformer_config())
    plans = espace.apply_espace(fresh, cfg, projs)
    assert len(plans) == 3 and {p.method for p in plans.values()} == {"nmse"}
    results = {"baseline": 1.0, "single": {r["layer"]: {"nmse": 1.1} for r in ranking},
               "progressive": _curve([2.7, 2.8, 2.9, 3.0], [0, .1, .2, .3])}
    text = report(results, ranking, 2, "--target-compression 0.2",
                  {r["layer"]: 0.53125 for r in ranking})
    assert "**chosen**" in text and "Chosen by --target-compression 0.2: 2 layers" in text
    assert "| L | layer compression |" in text and f"| {ranking[0]['layer']} | 8 | 53.1% |" in text


def _dataset(prefix, texts):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for text in texts:
        builder.add_document(torch.tensor(list(text.encode()), dtype=torch.int64), [len(text)])
    builder.finalize(f"{prefix}.idx")


def test_cache_is_keyed_on_content_not_paths(trained, tmp_path):
    """Replacing the projections file (or the data, or the checkpoint) at the same path makes
    the cache stale: refused, naming what differs; --overwrite measures again."""
    from types import SimpleNamespace

    from megatron_espace import checkpointing
    from megatron_espace.sensitivity import fingerprint
    from tests.common import random_projections

    model, projs = trained
    path, ckpt, prefix = tmp_path / "p.safetensors", tmp_path / "ckpt", tmp_path / "text"
    projs.save(path)
    tiny = gpt_model(transformer_config(num_layers=1, hidden_size=32, ffn_hidden_size=32))
    checkpointing.save({"model": checkpointing.model_sharded_state_dict(tiny)}, ckpt)
    _dataset(prefix, ["one document", "and another"])
    args = SimpleNamespace(load=str(ckpt), espace_projections=str(path),
                           data_path=[str(prefix)], split="90,10,0", seq_length=32, seed=1)
    layers = {projs.layers()[0]: 16}
    key = fingerprint(args, layers, 16, 128)
    assert fingerprint(args, layers, 16, 128) == key

    first = SensitivityStudy(model, projs, layers, Counter(2, (11,)), cache=tmp_path / "c.json",
                             fingerprint=key).run()
    other = random_projections(model, METHODS, seed=5)  # another calibration, same path
    other.save(path)
    stale = fingerprint(args, layers, 16, 128)
    with pytest.raises(ValueError, match=r"another study \(projections.content: \w+ -> \w+\); "
                                         r"pass --overwrite"):
        SensitivityStudy(model, other, layers, Counter(), cache=tmp_path / "c.json",
                         fingerprint=stale)
    again = Counter(2, (11,))
    redone = SensitivityStudy(model, other, layers, again, cache=tmp_path / "c.json",
                              fingerprint=stale, overwrite=True).run()
    assert again.calls == 1 + len(METHODS) + 1 and redone["single"] != first["single"]
    assert json.loads((tmp_path / "c.json").read_text())["fingerprint"] == stale

    _dataset(prefix, ["one document", "and other text"])  # re-preprocessed in place
    assert fp_differences(stale, fingerprint(args, layers, 16, 128)) == [
        "data.prefixes.0.idx", "data.prefixes.0.bin_bytes"]
    checkpointing.save({"model": checkpointing.model_sharded_state_dict(tiny)},
                       tmp_path / "ckpt2")  # the same weights saved again: another save
    os.rename(ckpt, tmp_path / "old")
    os.rename(tmp_path / "ckpt2", ckpt)
    assert "checkpoint.metadata" in fp_differences(stale, fingerprint(args, layers, 16, 128))


def fp_differences(a, b):
    from megatron_espace.fingerprint import differences

    return sorted((d.split(":")[0] for d in differences(a, b)), key=lambda s: "idx" not in s)
