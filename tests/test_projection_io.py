"""The projections file: parts + index, lazy sliced reads, version-1 files, damaged files."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import megatron_espace as espace
from megatron_espace.projection import write_index, write_part
from tests.common import gpt_model, random_projections, transformer_config
from tests.harness import run_distributed


def _eigen(k, r, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(k, k, dtype=torch.float64, generator=g))[0]
    return q[:, :r], torch.randn(k, dtype=torch.float64, generator=g)


def _items(layers, methods=("mse", "nmse"), k=24, r=8):
    return {(layer, m): _eigen(k, r, 10 * i + j) for i, layer in enumerate(layers)
            for j, m in enumerate(methods)}


def _write(path, shares, info=None, chosen=None):
    """One write_part per share (as the ranks would), then the index; returns the manifests."""
    parts = [write_part(path, f"stage{i}", ((l, m, v, w) for (l, m), (v, w) in share.items()),
                        {"rank": i}) for i, share in enumerate(shares)]
    write_index(path, parts, info or {"samples": 4}, chosen)
    return parts


def test_parts_and_index_round_trip_bit_for_bit(tmp_path):
    old = os.umask(0o022)
    try:
        stage0, stage1 = _items(["l.0.fc1", "l.0.fc2"]), _items(["l.1.fc1", "l.1.fc2"], k=16)
        path = tmp_path / "p.safetensors"
        parts = _write(path, [stage0, stage1], chosen={"l.0.fc1": "nmse"})
    finally:
        os.umask(old)
    assert json.loads(json.dumps(parts)) == parts  # JSON-able manifests
    names = sorted(os.listdir(path))
    assert names[0] == "index.json" and len(names) == 3 and all(
        n.startswith("part-stage") for n in names[1:])  # no temporary left behind
    assert {oct(os.stat(path / n).st_mode & 0o777) for n in names} == {"0o644"}
    for name in names[1:]:  # plain safetensors: the reference reader takes them
        assert all(t.is_contiguous() for t in load_file(str(path / name)).values())

    back = espace.Projections.load(path)
    assert back.bytes_read == 0  # loading reads the index only
    assert back.chosen == {"l.0.fc1": "nmse"} and back.info == {"samples": 4}
    assert back.layers() == ["l.0.fc1", "l.0.fc2", "l.1.fc1", "l.1.fc2"]
    for (layer, method), (vecs, vals) in {**stage0, **stage1}.items():
        v, w = back.eigen(layer, method)
        assert v.dtype == torch.float32 and torch.equal(v, vecs.float())
        assert w.dtype == torch.float64 and torch.equal(w, vals)
    k, r = 24, 8
    back.bytes_read = 0
    p = back.projection("l.0.fc2", "mse", 3, rows=(12, 24))
    assert torch.equal(p, stage0["l.0.fc2", "mse"][0][12:24, :3].float()) and p.is_contiguous()
    assert back.bytes_read == 12 * 3 * 4  # the slice alone
    assert back.shape("l.1.fc1", "nmse") == (16, r) and back.bytes_read == 12 * 3 * 4
    with pytest.raises(ValueError, match=f"keeps {r} eigenvectors, rank 9 asked"):
        back.projection("l.0.fc1", "mse", 9)
    with pytest.raises(ValueError, match=rf"rows \(0, 25\) outside K={k}"):
        back.projection("l.0.fc1", "mse", 2, rows=(0, 25))


def test_index_is_written_last_and_replaces_the_previous_file(tmp_path):
    path = tmp_path / "p.safetensors"
    first = _items(["a"])
    _write(path, [first])
    second = _items(["b"])
    part = write_part(path, "stage0", ((l, m, v, w) for (l, m), (v, w) in second.items()), {})
    assert espace.Projections.load(path).layers() == ["a"]  # still the complete old file
    write_index(path, [part], {})
    back = espace.Projections.load(path)
    assert back.layers() == ["b"] and len(os.listdir(path)) == 2  # old part removed
    with pytest.raises(ValueError, match="b/mse is in both part-stage0"):
        write_index(path, [part, part], {})
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(FileNotFoundError, match="unfinished: projections file not found "
                                                r"\(a directory without index.json"):
        espace.Projections.load(tmp_path / "unfinished")


def test_updating_chosen_rewrites_the_index_only(tmp_path):
    path = tmp_path / "p.safetensors"
    _write(path, [_items(["a", "b"])])
    parts = {n: os.stat(path / n).st_ino for n in os.listdir(path) if n.startswith("part-")}
    projs = espace.Projections.load(path)
    projs.chosen["a"] = "nmse"
    projs.save(path)
    assert projs.bytes_read == 0
    assert {n: os.stat(path / n).st_ino for n in os.listdir(path)
            if n.startswith("part-")} == parts
    assert espace.Projections.load(path).chosen == {"a": "nmse"}
    vecs, vals = _eigen(24, 8, 99)  # a replaced entry: its part is rewritten, the index follows
    projs.add("a", "mse", vecs, vals)
    projs.save(path, max_rank=4)
    back = espace.Projections.load(path)
    assert torch.equal(back.projection("a", "mse", 4), vecs[:, :4].float())
    assert back.shape("b", "nmse") == (24, 4) and back.chosen == {"a": "nmse"}
    assert torch.equal(projs.projection("b", "mse", 4), back.projection("b", "mse", 4))


def _version1_file(path, items):
    tensors, index = {}, []
    for (layer, method), (vecs, vals) in sorted(items.items()):
        tensors[f"{layer}::{method}::vecs"] = vecs.float().contiguous()
        tensors[f"{layer}::{method}::vals"] = vals
        index.append([layer, method])
    save_file(tensors, str(path), metadata={
        "format": "megatron-espace-projections", "version": "1", "index": json.dumps(index),
        "chosen": json.dumps({"a": "mse"}), "info": json.dumps({"samples": 2})})


def test_version1_files_load_lazily_and_are_rewritten_as_version2(tmp_path):
    items = _items(["a", "b"])
    path = tmp_path / "old.safetensors"
    _version1_file(path, items)
    projs = espace.Projections.load(path)
    assert projs.bytes_read == 0 and projs.chosen == {"a": "mse"} and projs.layers() == ["a", "b"]
    p = projs.projection("b", "nmse", 2, rows=(8, 16))
    assert torch.equal(p, items["b", "nmse"][0][8:16, :2].float())
    assert projs.bytes_read == 8 * 2 * 4
    projs.save(path)  # the single file becomes the version-2 directory, same path
    assert path.is_dir() and sorted(os.listdir(tmp_path)) == ["old.safetensors"]
    back = espace.Projections.load(path)
    for key, (vecs, vals) in items.items():
        assert torch.equal(back.eigen(*key)[0], vecs.float())
        assert torch.equal(back.eigen(*key)[1], vals)
    assert back.chosen == {"a": "mse"} and back.info == {"samples": 2}
    _version1_file(tmp_path / "f", items)
    with pytest.raises(ValueError, match="f: a file is in the way"):
        write_part(tmp_path / "f", "stage0", [], {})


def test_damaged_files_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "p.safetensors"
    parts = _write(path, [_items(["a"]), _items(["b"])])
    first, second = (path / m["file"] for m in parts)

    data = second.read_bytes()
    second.write_bytes(data[:-4])
    with pytest.raises(ValueError, match=f"{second}: {len(data) - 4} bytes, the index says "
                                         f"{len(data)}: truncated"):
        espace.Projections.load(path)
    second.write_bytes(data[:8] + b"#" * 16 + data[24:])  # same size, header garbled
    with pytest.raises(ValueError, match=f"{second}: corrupt or unreadable projections part"):
        espace.Projections.load(path).eigen("b", "mse")
    second.write_bytes(first.read_bytes())  # another part's bytes (same size, other id)
    with pytest.raises(ValueError, match=f"{second}: this part was not written with the index"):
        espace.Projections.load(path).projection("b", "mse", 2)
    second.unlink()
    with pytest.raises(ValueError, match=f"{second}: part missing"):
        espace.Projections.load(path)
    (path / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="index.json: corrupt projections index"):
        espace.Projections.load(path)
    (path / "index.json").write_text(json.dumps({"format": "megatron-espace-projections",
                                                 "version": 3}))
    with pytest.raises(ValueError, match="version 3, this build reads 2; recalibrate"):
        espace.Projections.load(path)


# ------------------------------------------------------------------ readers take slices

L = 8
APPLY = {"layers": [{"match": "decoder.layers.*", "rank": L, "method": "mse"}]}


def _apply_and_sensitivity(path, tp, pp):
    """apply_espace, then the sensitivity study's per-layer set, on one rank of TP x PP."""
    from megatron.core import parallel_state

    from megatron_espace import runtime
    from megatron_espace.sensitivity import SensitivityStudy
    from megatron_espace.surgery import linear_layers

    runtime.initialize(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model = gpt_model(transformer_config(tp=tp, pp=pp))
    projs = espace.Projections.load(path)
    plans = espace.apply_espace(model, espace.ESPACEConfig.from_dict(APPLY), projs)
    applied = projs.bytes_read
    full = espace.Projections.load(path)  # the reference: whole columns, read separately
    for name, layer in linear_layers(model).items():
        start, stop = layer.projection_rows()
        p = layer.espace_proj
        assert torch.equal(p, full.projection(name, "mse", L)[start:stop]), name
        assert p.untyped_storage().nbytes() == p.numel() * 4, name  # no file mapping kept
    study = SensitivityStudy(model, projs, {n: L // 2 for n in plans}, lambda m: 0.0)
    for name in plans:
        study._set(name, "nmse")
    errors = []
    row = next(m for m in linear_layers(model).values() if m.projection_rows()[0] > 0 or (
        m.projection_rows()[1] < m.input_size))
    start, stop = row.projection_rows()
    for proj, rows in ((2 * row.espace_proj, (start, stop)),  # a shard of a non-orthonormal P
                       (row.espace_proj, (row.input_size - stop, row.input_size - start))):
        try:
            row.set_projection(proj, rows=rows)
        except ValueError as e:
            errors.append(str(e))
    return {"applied": applied, "sensitivity": projs.bytes_read - applied, "errors": errors,
            "layers": {n: [p.kind, p.K] for n, p in plans.items()},
            "pp_rank": parallel_state.get_pipeline_model_parallel_rank()}


def test_each_rank_reads_only_its_slices_at_tp2_pp2(megatron_tp1, tmp_path):
    path = tmp_path / "p.safetensors"
    random_projections(gpt_model(transformer_config()), methods=("mse", "nmse")).save(path)
    whole = sum(f.stat().st_size for f in path.iterdir())
    results = run_distributed(_apply_and_sensitivity, nprocs=4, path=str(path), tp=2, pp=2)
    for r in results:
        layers = r["layers"]
        assert layers and {n.split(".")[2] for n in layers} == {str(r["pp_rank"])}
        rows = {n: k if kind == "column" else k // 2 for n, (kind, k) in layers.items()}
        assert r["applied"] == sum(rows.values()) * L * 4  # first L columns, own rows
        assert r["sensitivity"] == sum(rows.values()) * (L // 2) * 4
        assert {kind for kind, _ in layers.values()} == {"column", "row"}
        assert len(r["errors"]) == 2
        assert "not orthonormal: max |PᵀP - I| = 3.000e+00" in r["errors"][0]
        assert "of P given, this rank keeps rows" in r["errors"][1]
    # 4 GEMMs of one layer (K = 64, 64, 64, 128), of 2 layers x 2 methods in the file
    assert results[0]["applied"] == (64 + 32 + 64 + 64) * L * 4 == 7168 and whole > 450_000


def test_inspect_reads_eigenvalues_only(tmp_path, monkeypatch, capsys):
    from megatron_espace import cli
    from megatron_espace.projection import Projections

    path = tmp_path / "p.safetensors"
    _write(path, [_items(["a", "b"])])
    keys, read = [], Projections._read
    monkeypatch.setattr(Projections, "_read",
                        lambda self, entry, key, *a: keys.append(key) or read(self, entry, key, *a))
    assert cli.main(["inspect", str(path), "--ranks", "2"]) == 0
    assert sorted(keys) == ["a::mse::vals", "a::nmse::vals", "b::mse::vals", "b::nmse::vals"]
    assert "a" in capsys.readouterr().out
