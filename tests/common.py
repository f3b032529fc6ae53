"""Shared builders for the tests: tiny megatron configs, GPT models, random orthonormal P."""

import contextlib
import inspect
import sys
import zlib

import torch


def orthonormal(k: int, l: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """A random K×L matrix with orthonormal columns."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(k, l, generator=g, dtype=torch.float64))
    return q.to(dtype)


def transformer_config(tp: int = 1, sp: bool = False, pp: int = 1, dtype=torch.float32, **kw):
    from megatron.core.transformer import TransformerConfig

    args = dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
        use_cpu_initialization=True, params_dtype=dtype, pipeline_dtype=dtype,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        sequence_parallel=sp and tp > 1, gradient_accumulation_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, bias_activation_fusion=False,
        hidden_dropout=0.0, attention_dropout=0.0,
    )
    args.update(kw)
    return TransformerConfig(**args)


def gpt_model(config, spec=None, vocab_size: int = 128, seq_length: int = 32, **kw):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    return GPTModel(
        config=config, transformer_layer_spec=spec or get_gpt_layer_local_spec(),
        vocab_size=vocab_size, max_sequence_length=seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(), **kw)


def token_batch(batch: int = 4, seq_length: int = 32, vocab_size: int = 128, seed: int = 0):
    """A fixed batch of random tokens with positions and next-token labels."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, vocab_size, (batch, seq_length + 1), generator=g)
    pos = torch.arange(seq_length).unsqueeze(0).expand(batch, -1)
    return data[:, :-1].contiguous(), pos, data[:, 1:].contiguous()


def random_projections(model, methods=("mse",), seed: int = 0):
    """A Projections with, per candidate linear, the eigenvectors of a random PSD matrix.

    Deterministic in (layer name, method, seed), so every rank builds the same file.
    """
    from megatron_espace.projection import Projections, sorted_eigh
    from megatron_espace.surgery import linear_layers

    projs = Projections()
    for name, module in linear_layers(model).items():
        for method in methods:
            g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{method}/{seed}".encode()))
            a = torch.randn(module.input_size, module.input_size, generator=g,
                            dtype=torch.float64)
            vecs, vals = sorted_eigh(a @ a.t())
            projs.add(name, method, vecs, vals)
    return projs


def train_steps(model, steps: int = 8, lr: float = 3e-3, batch=None):
    """Wrap ``model`` in megatron DDP + Adam and run ``steps`` steps on one fixed batch.

    Returns (losses, ddp_model, optimizer).
    """
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp = DDP(model.config, DistributedDataParallelConfig(), model)
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=lr, weight_decay=0.01, clip_grad=1.0), [ddp])
    tokens, pos, labels = batch or token_batch()
    losses = []
    for _ in range(steps):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss = ddp(tokens, pos, None, labels=labels).float().mean()
        loss.backward()
        finalize_model_grads([ddp])
        opt.step()
        losses.append(loss.item())
    return losses, ddp, opt


def global_param_names(model):
    from megatron.core.transformer.transformer_layer import TransformerLayer

    prefix = {n: f"decoder.layers.{m.layer_number - 1}" for n, m in model.named_modules()
              if isinstance(m, TransformerLayer)}
    out = {}
    for name, p in model.named_parameters():
        head = next((k for k in prefix if name.startswith(k + ".")), None)
        out[prefix[head] + name[len(head):] if head else name] = p
    return out


def reinit_by_global_name(model):
    """Weights that depend only on the global parameter name, so any PP split holds the same."""
    with torch.no_grad():
        for name, p in global_param_names(model).items():
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def pipeline_forward_backward(model, microbatches, forward_only=False):
    """One megatron schedule pass over ``microbatches`` of (tokens, positions, labels).

    Each micro-batch's loss is its own token mean (``per_microbatch``), so gradients do not
    depend on how micro-batches are spread over data-parallel ranks. Returns the mean loss.
    """
    from megatron_espace.schedule import run_microbatches

    micro = [{"tokens": t, "position_ids": p, "labels": lab,
              "loss_mask": torch.ones(lab.shape)} for t, p, lab in microbatches]
    tokens = microbatches[0][0]
    return run_microbatches(model, micro, tokens.shape[1], tokens.shape[0], forward_only,
                            per_microbatch=True)


def _ring_volume(name, bound, world):
    """Bytes one rank sends in collective ``name`` with ring algorithms: all-reduce
    ``2(n-1)/n`` of the tensor, all-gather and reduce-scatter ``(n-1)/n`` of the full one."""
    a = bound.arguments
    full = {
        "all_reduce": lambda: 2 * a["tensor"].nbytes,
        "all_gather_into_tensor": lambda: a["output_tensor"].nbytes,
        "_all_gather_base": lambda: a["output_tensor"].nbytes,
        "reduce_scatter_tensor": lambda: a["input"].nbytes,
        "_reduce_scatter_base": lambda: a["input"].nbytes,
        "all_gather": lambda: a["tensor"].nbytes * world,
        "reduce_scatter": lambda: sum(t.nbytes for t in a["input_list"]),
    }[name]()
    return full * (world - 1) / world


@contextlib.contextmanager
def collective_bytes():
    """Count what this rank sends through torch.distributed's collectives while active.

    Yields a dict ``{"bytes": float, "calls": [(name, bytes)]}``. Wraps the functions of
    ``torch.distributed`` and every module-level alias megatron took of them at import
    (``mappings.dist_all_gather_func`` ...), so the layers' own calls are the ones counted.
    """
    import torch.distributed as dist

    names = ["all_reduce", "all_gather_into_tensor", "_all_gather_base",
             "reduce_scatter_tensor", "_reduce_scatter_base", "all_gather", "reduce_scatter"]
    counts = {"bytes": 0.0, "calls": []}
    wrappers, active = {}, []
    for name in names:
        original = getattr(dist, name)

        def wrapped(*args, _name=name, _original=original, **kwargs):
            if active:  # torch re-enters the public name (a __torch_function__ mode): once
                return _original(*args, **kwargs)
            bound = inspect.signature(_original).bind(*args, **kwargs)
            world = dist.get_world_size(bound.arguments.get("group"))
            volume = _ring_volume(_name, bound, world)
            counts["bytes"] += volume
            counts["calls"].append((_name, volume))
            active.append(_name)
            try:
                return _original(*args, **kwargs)
            finally:
                active.pop()

        wrappers[original] = wrapped
    patched = []
    for module in list(sys.modules.values()):
        if not getattr(module, "__name__", "").startswith(("megatron", "torch.distributed")):
            continue
        for attr, value in list(vars(module).items()):
            if inspect.isfunction(value) and value in wrappers:
                patched.append((module, attr, value))
                setattr(module, attr, wrappers[value])
    try:
        yield counts
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)
