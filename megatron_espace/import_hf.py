"""Import a HuggingFace causal LM into a megatron-core torch_dist checkpoint.

    espace import-hf HF_DIR --save DIR [--dtype bfloat16] [--make-vocab-size-divisible-by N]
    python -m megatron_espace.import_hf HF_DIR --save DIR

HF_DIR holds ``config.json``, the weights as ``*.safetensors`` (one file or an index) and
usually ``tokenizer.json``. DIR gets Megatron-LM's layout: ``release/`` (a torch_dist
checkpoint of the model alone: Megatron-LM then starts at iteration 0 without optimizer
or RNG state) and ``latest_checkpointed_iteration.txt``, plus ``model_args.json`` and
``args.txt`` (the Megatron flags of the model; every tool reads them from ``--load DIR``,
Megatron-LM takes ``@DIR/args.txt``) and the HuggingFace config and tokenizer files
(``--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR``).

The checkpoint is written at TP=PP=1 and loads at any TP/PP: the padded vocabulary is chosen
so that it does not depend on TP (up to 8; ``hf_layout.vocab_divisor``). Memory: the weights
are read tensor by tensor (``safe_open``) into the one megatron model; peak ≈ the model in
``--dtype`` plus its largest converted tensor.
"""

import argparse
import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from megatron_espace import arguments, hf_layout
from megatron_espace.hf_layout import HFFormatError

TRACKER = "latest_checkpointed_iteration.txt"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weight_files(hf_dir) -> dict:
    """``{tensor name: safetensors file}`` of a HF directory (single file or sharded index)."""
    from safetensors import safe_open

    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        if not isinstance(weight_map, dict):
            raise HFFormatError(f"{index}: field 'weight_map' is missing")
        files = sorted({hf_dir / f for f in weight_map.values()})
    else:
        files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in hf_dir.glob("*.bin"))
        raise HFFormatError(f"{hf_dir}: no *.safetensors weights"
                            + (f" (only {', '.join(bins)}: pickle files are not read; "
                               f"save the model with safe_serialization)" if bins else ""))
    names = {}
    for file in files:
        if not file.is_file():
            raise HFFormatError(f"{index}: weight file {file.name} is missing")
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                names[key] = file
    return names


def hf_flags(hf_dir, divisible_by=None) -> dict:
    """The Megatron flags of ``hf_dir``'s model (``arguments.MODEL_FLAGS`` and defaults)."""
    config = hf_layout.read_config(hf_dir)
    flags = hf_layout.megatron_flags(config, Path(hf_dir) / "config.json")
    if divisible_by is not None:
        flags["make_vocab_size_divisible_by"] = divisible_by
    return flags


def model_namespace(flags: dict, **extra) -> argparse.Namespace:
    """The namespace the tools' parser makes of ``flags`` (TP=PP=1, float32)."""
    p = argparse.ArgumentParser()
    arguments.add_model_args(p)
    arguments.add_parallel_args(p)
    arguments.add_tokenizer_args(p)
    arguments.add_checkpoint_args(p)
    args = p.parse_args(arguments.flag_lines(flags))
    for k, v in extra.items():
        setattr(args, k, v)
    return args


def empty_model(args, dtype):
    """The one-rank GPTModel of ``args`` in ``dtype``, allocated but not initialised (built on
    the meta device: no random init, one copy of the weights). Non-persistent buffers such as
    the rotary frequencies are not computed: the model is for filling and saving, not running.
    """
    from megatron_espace.surgery import unwrap

    vocab = args.vocab_size or arguments.tokenizer(args).vocab_size
    with torch.device("meta"):
        model = arguments.build_model(args, vocab)
    return unwrap(model).to(dtype).to_empty(device="cpu")


def _check_tokenizer(hf_dir: Path, vocab_size: int, save: Path):
    """Validate ``tokenizer.json`` with our HuggingFaceTokenizer; returns its flags."""
    from megatron_espace.tokenizer import HuggingFaceTokenizer

    if not (hf_dir / "tokenizer.json").is_file():
        print(f"{hf_dir}: no tokenizer.json; pass --tokenizer-* flags to the tools")
        return {}
    tok = HuggingFaceTokenizer(str(hf_dir))  # refuses, naming file and field, what it cannot
    if tok.vocab_size > vocab_size:
        raise HFFormatError(f"{hf_dir / 'tokenizer.json'}: ids up to {tok.vocab_size - 1}, "
                            f"beyond config.json vocab_size {vocab_size}")
    return {"tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": str(save.resolve())}


@contextlib.contextmanager
def one_process(what: str):
    """megatron-core in this process alone: initialised here (and torn down after) unless
    torch.distributed already runs, which must then be a world of one at TP=PP=1."""
    from megatron_espace import runtime

    own = not torch.distributed.is_initialized()
    if own:
        runtime.initialize(1, 1)
    elif torch.distributed.get_world_size() != 1:
        raise RuntimeError(f"{what} runs in one process (TP=PP=1 checkpoints load at any TP/PP)")
    try:
        yield
    finally:
        if own:
            runtime.destroy()


def _fill(model, rules, files: dict, stored: dict, flags: dict, dtype) -> None:
    """Copy every rule's converted HF tensors into ``model``, one tensor at a time."""
    from safetensors import safe_open
    from tqdm import tqdm

    params = dict(model.state_dict(keep_vars=True))
    handles, filled = {}, set()
    last_use = {files[n]: i for i, rule in enumerate(rules) for n in rule.hf}
    for i, rule in enumerate(tqdm(rules, desc="import-hf", unit="tensor", disable=None)):
        target = params[rule.megatron]
        tensors = []
        for n in rule.hf:
            if files[n] not in handles:
                handles[files[n]] = safe_open(str(files[n]), framework="pt")
            tensors.append(handles[files[n]].get_tensor(stored[n]).to(dtype))
        value = hf_layout.to_megatron(rule, tensors, flags, model.vocab_size)
        if value.shape != target.shape:
            raise HFFormatError(
                f"{files[rule.hf[0]]}: tensor {stored[rule.hf[0]]} has shape "
                f"{list(tensors[0].shape)}, which makes {rule.megatron} {list(value.shape)}; "
                f"config.json describes {list(target.shape)}")
        with torch.no_grad():
            target.copy_(value)
        filled.add(rule.megatron)
        del tensors, value
        for file in [f for f in handles if last_use[f] == i]:  # unmap what is done with
            del handles[file]
    unfilled = [k for k, v in params.items() if k not in filled and v is not None
                and not k.endswith("_extra_state")]
    if unfilled:
        raise RuntimeError(f"no HF tensor maps to {', '.join(unfilled)}")


def import_hf(hf_dir, save, dtype=None, divisible_by=None, tokenizer=True) -> dict:
    """Write ``save`` from ``hf_dir`` (see the module docstring); returns the flags written.

    Runs in one process (see :func:`one_process`). ``dtype``: a DTYPES name, default the
    safetensors' own.
    """
    from safetensors import safe_open

    from megatron_espace import checkpointing

    hf_dir, save = Path(hf_dir), Path(save)
    if save.exists():
        raise FileExistsError(f"--save {save}: already exists; not overwriting")
    config = hf_layout.read_config(hf_dir)
    arch = hf_layout.architecture(config, hf_dir / "config.json")
    flags = hf_flags(hf_dir, divisible_by)
    on_disk = weight_files(hf_dir)
    stored = {hf_layout.hf_name(k, arch): k for k in on_disk}
    files = {hf_layout.hf_name(k, arch): v for k, v in on_disk.items()}
    if tokenizer:
        flags.update(_check_tokenizer(hf_dir, flags["vocab_size"], save))
    window = config.get("sliding_window") if arch == "MistralForCausalLM" else None
    if window:
        print(f"{hf_dir / 'config.json'}: sliding_window {window}: megatron attends to the "
              f"whole sequence, the same as sliding-window attention up to {window} tokens "
              f"(the default --seq-length {flags['seq_length']})")
    rules = hf_layout.tensor_map(config, flags)
    missing = [n for r in rules for n in r.hf if n not in files]
    if missing:
        raise HFFormatError(f"{hf_dir}: tensor {missing[0]} is missing from the safetensors "
                            f"files ({len(missing)} missing; config.json says {arch})")
    used = {n for r in rules for n in r.hf}
    tied_head = None if flags["untie_embeddings_and_output_weights"] else "lm_head.weight"
    extra = sorted(n for n in files if n not in used and n != tied_head
                   and not n.endswith(hf_layout.IGNORED_SUFFIXES))
    if extra:
        raise HFFormatError(f"{files[extra[0]]}: tensor {stored[extra[0]]} has no place in "
                            f"{arch} ({len(extra)} unexpected)")
    if dtype is None:
        first = rules[0].hf[0]
        with safe_open(str(files[first]), framework="pt") as f:
            code = f.get_slice(stored[first]).get_dtype()
        dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(
            code, torch.float32)
    else:
        dtype = DTYPES[dtype]

    tmp = save.with_name(save.name + ".tmp-import")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with one_process("import-hf"):
            model = empty_model(model_namespace(flags), dtype)
            _fill(model, rules, files, stored, flags, dtype)
            tmp.mkdir(parents=True)
            checkpointing.save({"model": checkpointing.model_sharded_state_dict(model),
                                "checkpoint_version": 3.0, "iteration": 0}, tmp / "release")
            del model
        (tmp / TRACKER).write_text("release")
        for name in arguments.HF_FILES:
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, tmp / name)
        described = model_namespace(flags)
        if "tokenizer_type" not in flags:  # not the parser's default: the model has none
            described.tokenizer_type = None
        arguments.write_model_args(described, tmp)
        os.replace(tmp, save)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return flags


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="espace import-hf", description=__doc__.split("\n\n")[0])
    p.add_argument("hf_dir", help="HuggingFace model directory (config.json, *.safetensors, "
                   "tokenizer.json)")
    p.add_argument("--save", required=True, help="the checkpoint directory to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="checkpoint dtype (default: the safetensors' own)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="default: ceil(vocab / 8), the same padded vocabulary at TP 1, 2, 4, 8")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="import the weights only (a tokenizer.json we cannot read is refused)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        flags = import_hf(args.hf_dir, args.save, args.dtype, args.make_vocab_size_divisible_by,
                          tokenizer=not args.no_tokenizer)
    except (HFFormatError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"espace import-hf: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.save}: {flags['num_layers']} layers, hidden {flags['hidden_size']}, "
          f"vocab {flags['vocab_size']} (padded with --make-vocab-size-divisible-by "
          f"{flags['make_vocab_size_divisible_by']}); use --load {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
