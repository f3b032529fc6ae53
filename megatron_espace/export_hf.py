"""Export a checkpoint (dense or ESPACE-retrained) as a dense HuggingFace model directory.

    espace export-hf --load DIR --save HF_OUT \\
        [--espace-config cfg.yaml --espace-projections projections.safetensors]
    python -m megatron_espace.export_hf ...

For an ESPACE checkpoint every projected layer's weight is written as ``W P Pᵀ`` (megatron's
[N, K] weight; the paper's ``Ŷ = Wᵀ P Pᵀ X`` with its K×N ``W``): the same shapes as the
dense model, so ``transformers.AutoModelForCausalLM.from_pretrained(HF_OUT)`` and every HF
tool run the retrained model's accuracy. A checkpoint that holds projections is refused
without its ``--espace-config`` / ``--espace-projections`` (exporting W alone would silently
score the wrong model); a compressed checkpoint (``espace convert``) is refused.

The HuggingFace ``config.json`` and tokenizer files come from DIR (``import-hf`` put them
there, training and ``convert`` carry them along). The model flags come from DIR's
``model_args.json`` as in every tool. Runs in one process; memory: the model once, in its
checkpoint dtype, plus one output shard (``--max-shard-size``); exported weights are freed
as they are written.
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from megatron_espace import arguments, atomic, hf_layout
from megatron_espace.import_hf import DTYPES

#: flags that must agree between model_args.json and config.json
CHECKED = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels",
           "position_embedding_type", "normalization", "swiglu", "add_qkv_bias", "vocab_size",
           "untie_embeddings_and_output_weights")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="espace export-hf", description=__doc__.split("\n\n")[0])
    arguments.add_model_args(p)
    arguments.add_parallel_args(p)
    arguments.add_tokenizer_args(p)
    arguments.add_checkpoint_args(p)
    g = p.add_argument_group("export")
    g.add_argument("--save", required=True, help="the HuggingFace directory to write")
    g.add_argument("--espace-config", default=None)
    g.add_argument("--espace-projections", default=None)
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the written weights (default: the checkpoint's)")
    g.add_argument("--max-shard-size", type=float, default=5.0, help="GB per safetensors file")
    args = arguments.parse_args(p, argv)
    if args.load is None:
        p.error("--load is required: the checkpoint to export")
    if (args.espace_config is None) != (args.espace_projections is None):
        p.error("--espace-config and --espace-projections go together")
    return args


def _hf_config(root: Path, args) -> dict:
    """DIR's config.json, checked against the model flags."""
    config = hf_layout.read_config(root)
    where = root / "config.json"
    expected = hf_layout.megatron_flags(config, where)
    for dest in CHECKED:
        if getattr(args, dest) != expected.get(dest):
            raise hf_layout.HFFormatError(
                f"{where}: describes {dest} = {expected.get(dest)!r} but the checkpoint's model "
                f"has --{dest.replace('_', '-')} {getattr(args, dest)!r}")
    return config


def _checkpoint_kind(path: Path, espace: bool) -> torch.dtype:
    """Refuse what cannot be exported; return the checkpoint's weight dtype."""
    from megatron.core import dist_checkpointing

    keys = dist_checkpointing.load_tensors_metadata(str(path))
    if any(k.split(".")[-1] == "espace_weight" or ".espace_weight" in k for k in keys):
        raise SystemExit(f"--load {path}: a compressed checkpoint (espace convert); export the "
                         "ESPACE checkpoint it came from")
    projected = [k for k in keys if ".espace_proj" in k]
    if projected and not espace:
        raise SystemExit(f"--load {path}: holds ESPACE projections ({len(projected)} layers); "
                         "pass its --espace-config and --espace-projections")
    return keys["embedding.word_embeddings.weight"].dtype


def projected_weight(weight: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """``W P Pᵀ`` for megatron's [N, K] weight and the K×L projection (in float64)."""
    p = proj.double()
    return ((weight.double() @ p) @ p.t()).to(weight.dtype)


def _shards(rules, params, flags, max_bytes):
    """Rules grouped into output files of at most ``max_bytes`` (one rule never split)."""
    groups, size = [[]], 0
    for rule in rules:
        t = params[rule.megatron]
        rows = flags["vocab_size"] if rule.kind == "vocab" else t.shape[0]
        nbytes = t[:1].numel() * rows * t.element_size() if t.dim() > 1 else \
            t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(rule)
        size += nbytes
    return groups


def export_hf(args) -> Path:
    """Write ``args.save`` from ``args.load``; returns the output directory."""
    from tqdm import tqdm

    import megatron_espace as espace
    from megatron_espace.import_hf import empty_model, one_process

    out = Path(args.save)
    if out.exists():
        raise SystemExit(f"--save {out}: already exists; not overwriting")
    if (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) != (1, 1):
        raise SystemExit("export-hf runs in one process: leave TP and PP at 1 (the checkpoint "
                         "loads at any size)")
    root = arguments.checkpoint_root(args.load)
    path = arguments.checkpoint_dir(args.load)
    config = _hf_config(root, args)
    flags = {d: getattr(args, d) for d in arguments.MODEL_FLAGS}
    dtype = _checkpoint_kind(path, args.espace_config is not None)
    out_dtype = DTYPES[args.dtype] if args.dtype else dtype
    tmp = out.with_name(out.name + ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with one_process("export-hf"):
            model = empty_model(args, dtype)
            if args.espace_config:
                espace.apply_espace(model, espace.ESPACEConfig.from_yaml(args.espace_config),
                                    espace.Projections.load(args.espace_projections))
            arguments.load_model(model, args.load)
            params = dict(model.state_dict(keep_vars=True))
            rules = hf_layout.tensor_map(config, flags)
            groups = _shards(rules, params, flags, args.max_shard_size * 1e9)
            names = ["model.safetensors"] if len(groups) == 1 else [
                f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
            weight_map, bar = {}, tqdm(total=len(rules), desc="export-hf", unit="tensor",
                                       disable=None)
            for name, group in zip(names, groups):
                shard = {}
                for rule in group:
                    t = params[rule.megatron]
                    proj = params.get(rule.megatron.rsplit(".", 1)[0] + ".espace_proj")
                    if proj is not None and rule.megatron.endswith(".weight"):
                        t = projected_weight(t, proj)
                    for hf, value in zip(rule.hf, hf_layout.to_hf(rule, t.detach(), flags)):
                        shard[hf] = value.to(out_dtype).contiguous()
                        weight_map[hf] = name
                    params[rule.megatron].data = torch.empty(0, dtype=dtype)  # free it
                    bar.update()
                atomic.save_safetensors(tmp / name, shard, metadata={"format": "pt"})
                del shard
            bar.close()
            del model, params
        if len(names) > 1:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {}, "weight_map": weight_map}, indent=1))
        for name in arguments.HF_FILES:
            if (root / name).is_file():
                shutil.copyfile(root / name, tmp / name)
        dtype_name = str(out_dtype).replace("torch.", "")
        config.update({k: dtype_name for k in ("torch_dtype", "dtype") if k in config})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = export_hf(args)
    except (hf_layout.HFFormatError, FileNotFoundError, ValueError) as e:
        print(f"espace export-hf: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}" + (" (W P Pᵀ for the ESPACE layers)" if args.espace_config else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
