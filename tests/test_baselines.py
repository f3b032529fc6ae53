"""Baselines as Megatron-LM writes them: distributed-optimizer state in the ``dp_reshardable``
layout (Megatron-LM's default), read from the checkpoint's content metadata; it loads when
the saving model ordered its parameters as ours, and is refused, naming both ways out, when
not (Transformer Engine's spec against the local one, here a reordered local model)."""

from pathlib import Path

import torch

from tests.harness import run_distributed

ARGV = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "2",
        "--train-iters", "2", "--lr", "1e-2", "--use-distributed-optimizer",
        "--data-path", "unused"]


def _write_baselines(root):
    """Two baselines in the dp_reshardable layout, each after two Adam steps on random
    gradients: ``same-order``, and ``norms-last`` whose layers register their norms after the
    attention and MLP (the same keys, another parameter order)."""
    from megatron_espace import arguments, runtime, train

    args = train.parse_args(ARGV)
    runtime.initialize(seed=args.seed)
    out = {}
    for run in ("same-order", "norms-last"):
        model = arguments.build_model(args, vocab_size=128)
        if run == "norms-last":
            for layer in model.decoder.layers:
                for name in ("input_layernorm", "pre_mlp_layernorm"):
                    layer._modules[name] = layer._modules.pop(name)
        out.update({f"{run}/{k}": v for k, v in
                    _train_and_save(args, model, Path(root) / run).items()})
    return out


def _train_and_save(args, model, root):
    from megatron_espace import checkpointing, train

    ddp, optimizer, _ = train._wrap(model, args)
    torch.manual_seed(3)
    for _ in range(2):
        ddp.zero_grad_buffer()
        for p in model.parameters():
            p.main_grad.copy_(torch.randn_like(p) * 0.1)
        optimizer.step()
    layout = {"distrib_optim_sharding_type": "dp_reshardable"}  # Megatron-LM's default
    checkpointing.save(train._sharded(model, optimizer, is_loading=False,
                                      layout=layout["distrib_optim_sharding_type"]),
                       root / "iter_0000002", content_metadata=layout)
    (root / "latest_checkpointed_iteration.txt").write_text("2")
    return _moments(model, optimizer) | {"order": [n for n, _ in model.named_parameters()]}


def _moments(model, optimizer):
    out = {}
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for p in inner.model_param_group_index_map:
            name = next(n for n, q in model.named_parameters() if q is p)
            state = inner._get_main_param_and_optimizer_states(p)
            out[f"exp_avg|{name}"] = state["exp_avg"].clone()
            out[f"w|{name}"] = p.detach().clone()
    return out


def _load_each(root):
    """The trainer's load of each baseline into a fresh model (ours: the local order)."""
    from megatron_espace import arguments, runtime, train

    runtime.initialize()
    out = {}
    for run in ("same-order", "norms-last"):
        args = train.parse_args(ARGV + ["--load", str(Path(root) / run)])
        model = arguments.build_model(args, vocab_size=128)
        _, optimizer, scheduler = train._wrap(model, args)
        try:
            train.load(args, model, optimizer, scheduler)
            out.update({f"{run}/{k}": v for k, v in _moments(model, optimizer).items()})
        except SystemExit as e:
            out[f"{run}/error"] = str(e)
    return out


def test_dp_reshardable_baselines(tmp_path):
    from megatron_espace import checkpointing

    (saved,) = run_distributed(_write_baselines, nprocs=1, root=str(tmp_path))
    assert checkpointing.optimizer_layout(tmp_path / "same-order" / "iter_0000002") == (
        "dp_reshardable")  # from the content metadata, as Megatron-LM reads it
    order = saved["norms-last/order"]
    assert order.index("decoder.layers.0.input_layernorm.weight") > order.index(
        "decoder.layers.0.mlp.linear_fc2.weight")  # really another order
    (loaded,) = run_distributed(_load_each, nprocs=1, root=str(tmp_path))

    from megatron_espace.compat import dp_reshardable_order_checkable

    if not dp_reshardable_order_checkable():  # megatron-core >= 0.19: refused, both ways out
        for run in ("same-order", "norms-last"):
            for part in ("dp_reshardable", "by parameter position", ">= 0.19",
                         "--dist-ckpt-optim-fully-reshardable", "--no-load-optim"):
                assert part in loaded.get(f"{run}/error", ""), loaded.get(f"{run}/error")
        return
    # the same parameter order: Adam's moments and the weights arrive exactly
    assert "same-order/error" not in loaded, loaded["same-order/error"]
    moments = [k for k in saved if k.startswith("same-order/exp_avg|")]
    assert moments and all(saved[k].abs().sum() > 0 for k in moments)
    for key in moments + [k for k in saved if k.startswith("same-order/w|")]:
        assert torch.equal(loaded[key], saved[key]), key

    # another order: exact where megatron-core lays the buckets out independently of the
    # registration order, otherwise refused, saying why and both ways out; never silently wrong
    error = loaded.get("norms-last/error")
    if error is None:
        for key in [k for k in saved if k.startswith("norms-last/") and "|" in k]:
            assert torch.equal(loaded[key], saved[key]), key
    else:
        for part in ("dp_reshardable", "by parameter position", "do not match",
                     "--dist-ckpt-optim-fully-reshardable", "--no-load-optim"):
            assert part in error, error
    print("norms-last:", "refused" if error else "loaded exactly")
