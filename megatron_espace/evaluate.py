"""Evaluate a checkpoint: sliding-window perplexity, and lm-evaluation-harness tasks.

    torchrun --nproc_per_node=N -m megatron_espace.evaluate --load CKPT \\
        --text FILE [FILE ...] --seq-length 2048 [--stride 512] --json ppl.json \\
        [--tasks hellaswag,my_task --include-path DIR] [model and parallelism flags]

(``espace evaluate ...`` is the same command.) The model is the dense or ESPACE-retrained
checkpoint (``--espace-config`` and ``--espace-projections`` rebuild the ESPACE layers), or a
compressed one written by ``espace convert`` (add ``--espace-compressed``); any TP/PP size,
the remaining ranks data-parallel.

Perplexity follows the HuggingFace perplexity guide. ``--text`` files (plain text, or jsonl
with a ``text`` field per line) are joined by newlines in the order given and tokenized once
without special tokens; ``--data-path`` takes the tokens of Megatron indexed datasets instead,
every document in order. Windows of ``--seq-length`` tokens start every ``--stride`` tokens
(default: ``--seq-length``, no overlap); each window scores, given the tokens before it in the
window, only those of its tokens no earlier window scored, so with no overlap every token but
the first of each window is scored. The result, ``{"tokens", "nll", "ppl"}`` (scored tokens,
mean NLL per scored token in nats, ``exp(nll)``), goes to ``--json``.

``--tasks`` runs lm-evaluation-harness (``pip install -e .[eval]``) through the adapter in
:mod:`megatron_espace.lm_eval_adapter`; its results go under ``"lm_eval"`` in ``--json``.

Megatron pads the vocabulary (``--make-vocab-size-divisible-by`` × TP); those output columns
are no tokens and are left out of every softmax here.
"""

import argparse
import json
import math
import sys

import torch
import torch.distributed as dist

from megatron_espace import arguments

#: micro-batches per pass of the pipeline schedule (one progress-bar step)
GROUP = 8


def parse_args(argv=None, need_input: bool = True):
    """The command's flags; ``need_input=False`` for the lm-eval adapter (model flags only)."""
    p = argparse.ArgumentParser(prog="espace evaluate", description=__doc__.split("\n\n")[0])
    arguments.add_model_args(p)
    arguments.add_parallel_args(p)
    arguments.add_tokenizer_args(p)
    arguments.add_checkpoint_args(p)
    e = p.add_argument_group("ESPACE")
    e.add_argument("--espace-config", default=None)
    e.add_argument("--espace-projections", default=None)
    e.add_argument("--espace-compressed", action="store_true",
                   help="the checkpoint was written by `espace convert`")
    g = p.add_argument_group("perplexity")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--text", nargs="+", metavar="FILE",
                     help="text files, or .jsonl files with a 'text' field per line")
    src.add_argument("--data-path", nargs="+", metavar="PREFIX",
                     help="Megatron indexed datasets (PREFIX.bin / PREFIX.idx)")
    g.add_argument("--stride", type=int, default=None, help="default --seq-length")
    g.add_argument("--json", default=None, help="write the results here (rank 0)")
    h = p.add_argument_group("lm-evaluation-harness (pip install -e .[eval])")
    h.add_argument("--tasks", default=None, help="comma-separated task names")
    h.add_argument("--include-path", default=None, help="a directory of task YAMLs")
    h.add_argument("--num-fewshot", type=int, default=None)
    h.add_argument("--limit", type=float, default=None,
                   help="documents per task (a fraction if < 1)")
    h.add_argument("--bootstrap-iters", type=int, default=100000,
                   help="lm-eval's bootstrap resamples for standard errors (0: none)")
    args = arguments.parse_args(p, argv)
    if args.load is None:
        p.error("--load is required: the checkpoint to evaluate")
    if (args.espace_config is None) != (args.espace_projections is None):
        p.error("--espace-config and --espace-projections go together")
    if args.espace_compressed and args.espace_config is None:
        p.error("--espace-compressed needs --espace-config and --espace-projections (they "
                "give each compressed layer its rank)")
    if need_input and not (args.text or args.data_path or args.tasks):
        p.error("nothing to evaluate: give --text, --data-path or --tasks")
    if args.stride is None:
        args.stride = args.seq_length
    if not 1 <= args.stride <= args.seq_length or args.seq_length < 2:
        p.error(f"--stride {args.stride}: must be between 1 and --seq-length "
                f"{args.seq_length} (>= 2)")
    args.hidden_dropout = args.attention_dropout = 0.0
    return args


def load_model(args):
    """``(model, tokenizer)``: the checkpoint ``--load`` holds, this rank's part, in eval mode."""
    import megatron_espace as espace
    from megatron_espace import convert

    tokenizer = arguments.tokenizer(args)
    if args.espace_compressed:
        model = convert.build(args, compressed_checkpoint=arguments.checkpoint_dir(args.load))
    else:
        model = arguments.build_model(args, tokenizer.vocab_size)
        if args.espace_config:
            espace.apply_espace(model, espace.ESPACEConfig.from_yaml(args.espace_config),
                                espace.Projections.load(args.espace_projections))
        arguments.load_model(model, args.load)
    model.eval()
    return model, tokenizer


def real_vocab_size(args, tokenizer) -> int:
    """The model's vocabulary before Megatron's padding (``--vocab-size`` of an imported
    model, else the tokenizer's): the output columns that are tokens."""
    return args.vocab_size or tokenizer.vocab_size


# -------------------------------------------------------------------- inputs


def read_texts(files) -> str:
    """The files' text joined by newlines; a ``.jsonl`` file gives its lines' ``text`` fields."""
    parts = []
    for name in files:
        try:
            with open(name, encoding="utf-8") as f:
                if not str(name).endswith(".jsonl"):
                    parts.append(f.read())
                    continue
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        doc = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{name}:{lineno}: not valid JSON ({e.msg})") from None
                    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                        raise ValueError(f"{name}:{lineno}: expected an object with a string "
                                         f"field 'text'")
                    parts.append(doc["text"])
        except UnicodeDecodeError as e:
            raise ValueError(f"{name}: not UTF-8 text (byte {e.start})") from None
    return "\n".join(parts)


def read_indexed(prefixes) -> list:
    """Every document's tokens of the Megatron indexed datasets, in order, as one list."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out = []
    for prefix in prefixes:
        if not IndexedDataset.exists(prefix):
            raise FileNotFoundError(f"--data-path: no dataset {prefix}.bin / {prefix}.idx")
        ds = IndexedDataset(prefix)
        out.append(np.concatenate([ds[i] for i in range(len(ds))]) if len(ds) else [])
    return [int(t) for part in out for t in part]


def windows(num_tokens: int, seq_length: int, stride: int) -> list:
    """The perplexity guide's windows ``[(begin, end, scored)]`` over ``num_tokens`` tokens.

    Window ``tokens[begin:end]`` (at most ``seq_length`` long) scores its last ``scored``
    tokens: those after the previous window's end, never its own first token.
    """
    out, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + seq_length, num_tokens)
        scored = min(end - prev_end, end - begin - 1)
        if scored > 0:
            out.append((begin, end, scored))
        prev_end = end
        if end == num_tokens:
            break
    return out


# -------------------------------------------------------------------- scoring


def token_logprobs(logits, targets, vocab_size: int):
    """``log p(target)`` and the greedy token at each position, over the real vocabulary.

    ``logits``: [b, s, V_padded / tp], this rank's vocabulary shard; ``targets``: [b, s]
    ids < ``vocab_size``. Columns ``>= vocab_size`` (Megatron's padding) are left out of the
    softmax and the argmax. The log-sum-exp is reduced across the tensor-parallel group, so
    every TP rank gets the same ([b, s] float32, [b, s] int64) without gathering the vocab.
    """
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    shard = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    columns = start + torch.arange(shard, device=logits.device)
    logits = logits.float().masked_fill(columns >= vocab_size, -math.inf)
    local_max, local_arg = logits.max(-1)
    top = local_max.clone()
    dist.all_reduce(top, dist.ReduceOp.MAX, group=group)
    sumexp = (logits - top.unsqueeze(-1)).exp().sum(-1)
    dist.all_reduce(sumexp, group=group)
    local = targets.to(logits.device) - start
    here = (local >= 0) & (local < shard)
    picked = logits.gather(-1, local.clamp(0, shard - 1).unsqueeze(-1)).squeeze(-1)
    picked = torch.where(here, picked, torch.zeros_like(picked))
    dist.all_reduce(picked, group=group)
    greedy = torch.where(local_max == top, local_arg + start, torch.full_like(local_arg, 2**62))
    dist.all_reduce(greedy, dist.ReduceOp.MIN, group=group)  # the first index at the max
    return picked - top - sumexp.log(), greedy


def _padded_length(n: int, args) -> int:
    tp = args.tensor_model_parallel_size
    return -(-n // tp) * tp if args.sequence_parallel and tp > 1 else n


def _micro_batches(rows, length: int, batch_size: int) -> list:
    """Micro-batches of ``rows`` (lists of input ids), right-padded to ``length`` with 0."""
    rows = rows + [[0]] * (-len(rows) % batch_size)  # a constant micro-batch shape
    out = []
    for i in range(0, len(rows), batch_size):
        tokens = torch.zeros(batch_size, length, dtype=torch.long)
        for r, ids in enumerate(rows[i:i + batch_size]):
            tokens[r, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        pos = torch.arange(length).unsqueeze(0).expand(batch_size, -1)
        out.append({"tokens": tokens, "position_ids": pos, "first": i})
    return out


def _model_parallel_results(mine: dict) -> dict:
    """Merge ``{index: result}`` from the ranks that hold results (last stage, TP rank 0)."""
    from megatron.core import parallel_state

    holder = (parallel_state.is_pipeline_last_stage()
              and parallel_state.get_tensor_model_parallel_rank() == 0)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine if holder else {})
    return {k: v for part in gathered for k, v in part.items()}


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def score(model, sequences, vocab_size: int, args, desc: str = "scoring") -> list:
    """``[(sum of log p, greedy)]`` for each ``(tokens, n)`` of ``sequences``.

    The last ``n`` of ``tokens`` are scored, each given every token before it; ``greedy``
    says each of them is the model's argmax. ``len(tokens) - 1`` (the model's input) must fit
    the model's positions. Collective: every rank passes the same ``sequences``; the
    data-parallel ranks split them, and every rank gets all results.
    """
    from megatron.core import parallel_state
    from tqdm import tqdm

    from megatron_espace.schedule import forward_collect

    dp = parallel_state.get_data_parallel_world_size()
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
    mine = order[parallel_state.get_data_parallel_rank()::dp]
    mbs = args.micro_batch_size
    groups = [mine[i:i + GROUP * mbs] for i in range(0, len(mine), GROUP * mbs)]
    results = {}
    for group in tqdm(groups, desc=desc, disable=not _rank0(), unit="pass"):
        length = _padded_length(len(sequences[group[0]][0]) - 1, args)
        targets = torch.zeros(len(group) + mbs, length, dtype=torch.long)
        scored = torch.zeros(len(group) + mbs, length, dtype=torch.bool)
        for r, i in enumerate(group):
            tokens, n = sequences[i]
            targets[r, :len(tokens) - 1] = torch.as_tensor(tokens[1:], dtype=torch.long)
            scored[r, len(tokens) - 1 - n:len(tokens) - 1] = True

        def reduce(batch, logits):
            rows = slice(batch["first"], batch["first"] + mbs)
            logp, greedy = token_logprobs(logits, targets[rows], vocab_size)
            mask = scored[rows].to(logp.device)
            sums = (logp.double() * mask).sum(-1)
            hits = ((greedy == targets[rows].to(greedy.device)) | ~mask).all(-1)
            return sums.cpu(), hits.cpu()

        micro = _micro_batches([sequences[i][0][:-1] for i in group], length, mbs)
        outs = forward_collect(model, micro, length, mbs, reduce)
        if outs:
            sums = torch.cat([s for s, _ in outs])
            hits = torch.cat([h for _, h in outs])
            for r, i in enumerate(group):
                results[i] = (sums[r].item(), bool(hits[r]))
    results = _model_parallel_results(results)
    return [results[i] for i in range(len(sequences))]


def next_tokens(model, contexts, vocab_size: int, args) -> list:
    """The greedy next token after each context (a list of ids of length <= seq_length).

    Collective over the model-parallel group (every rank passes the same contexts and gets
    the same tokens); micro-batch by micro-batch, no data-parallel split.
    """
    from megatron.core import parallel_state

    from megatron_espace.runtime import device
    from megatron_espace.schedule import forward_collect

    mbs = args.micro_batch_size
    length = _padded_length(max(len(c) for c in contexts), args)
    last = torch.tensor([len(c) - 1 for c in contexts] + [0] * (-len(contexts) % mbs))

    def reduce(batch, logits):
        rows = slice(batch["first"], batch["first"] + mbs)
        _, greedy = token_logprobs(logits, torch.zeros(logits.shape[:2], dtype=torch.long),
                                   vocab_size)
        return greedy.gather(1, last[rows].to(greedy.device).unsqueeze(1)).squeeze(1)

    micro = _micro_batches(list(contexts), length, mbs)
    outs = forward_collect(model, micro, length, mbs, reduce)
    out = (torch.cat(outs) if outs else torch.zeros(len(last), dtype=torch.long)).to(device())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(out, parallel_state.get_pipeline_model_parallel_last_rank(),
                       group=parallel_state.get_pipeline_model_parallel_group())
    return out[:len(contexts)].tolist()


def perplexity(model, ids, vocab_size: int, args) -> dict:
    """Sliding-window perplexity of the token list ``ids`` (see the module docstring)."""
    if len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens; the input has {len(ids)}")
    spans = windows(len(ids), args.seq_length, args.stride)
    results = score(model, [(ids[b:e], n) for b, e, n in spans], vocab_size, args,
                    desc="perplexity")
    count = sum(n for _, _, n in spans)
    nll = -math.fsum(s for s, _ in results) / count
    return {"tokens": count, "nll": nll, "ppl": math.exp(nll), "windows": len(spans),
            "text_tokens": len(ids), "seq_length": args.seq_length, "stride": args.stride}


# -------------------------------------------------------------------- the command


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_espace import runtime

    if args.tasks:
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            raise SystemExit("espace evaluate --tasks needs lm-evaluation-harness: "
                             "pip install -e '.[eval]'")
    ids = None  # bad input fails before any process group or model exists
    if args.text:
        ids = arguments.tokenizer(args).tokenize(read_texts(args.text))
    elif args.data_path:
        ids = read_indexed(args.data_path)
    runtime.initialize(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                       seed=args.seed)
    model, tokenizer = load_model(args)
    out = {"load": str(args.load)}
    if ids is not None:
        out.update(perplexity(model, ids, real_vocab_size(args, tokenizer), args))
        out["inputs"] = args.text or args.data_path
        if _rank0():
            print(f"perplexity {out['ppl']:.4f} | nll {out['nll']:.6f} | {out['tokens']} "
                  f"tokens scored in {out['windows']} windows of {args.seq_length} "
                  f"(stride {args.stride}) | {args.load}", flush=True)
    if args.tasks:
        from megatron_espace.lm_eval_adapter import MegatronESPACELM, run_tasks

        lm = MegatronESPACELM(model=model, tokenizer=tokenizer, args=args)
        out["lm_eval"] = run_tasks(lm, args.tasks.split(","), include_path=args.include_path,
                                   num_fewshot=args.num_fewshot, limit=args.limit,
                                   bootstrap_iters=args.bootstrap_iters)
    if args.json and _rank0():
        from megatron_espace import atomic

        atomic.write_text(args.json, json.dumps(out, indent=1, default=str))
    runtime.destroy()
    return 0


if __name__ == "__main__":
    from megatron_espace.runtime import run_main

    sys.exit(run_main(main))
