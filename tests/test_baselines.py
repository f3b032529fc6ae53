"""Baselines as Megatron-LM writes them: distributed-optimizer state in the ``dp_reshardable``
layout (Megatron-LM's default), read from the checkpoint's content metadata, is refused naming
both ways out; ``--no-load-optim`` then loads the weights."""

from pathlib import Path

import torch

from tests.harness import run_distributed

ARGV = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "2",
        "--train-iters", "2", "--lr", "1e-2", "--use-distributed-optimizer",
        "--data-path", "unused"]


def _write_baseline(root):
    """Two Adam steps on random gradients, saved in the dp_reshardable layout."""
    from megatron_espace import arguments, checkpointing, runtime, train

    args = train.parse_args(ARGV)
    runtime.initialize(seed=args.seed)
    model = arguments.build_model(args, vocab_size=128)
    ddp, optimizer, _ = train._wrap(model, args)
    for _ in range(2):
        ddp.zero_grad_buffer()
        for p in model.parameters():
            p.main_grad.copy_(torch.randn_like(p) * 0.1)
        optimizer.step()
    layout = {"distrib_optim_sharding_type": "dp_reshardable"}  # Megatron-LM's default
    checkpointing.save(train._sharded(model, optimizer, is_loading=False,
                                      layout=layout["distrib_optim_sharding_type"]),
                       Path(root) / "iter_0000002", content_metadata=layout)
    (Path(root) / "latest_checkpointed_iteration.txt").write_text("2")
    return {}


def _load(root, *flags):
    from megatron_espace import arguments, runtime, train

    args = train.parse_args(ARGV + ["--load", root, *flags])
    runtime.initialize()
    model = arguments.build_model(args, vocab_size=128)
    _, optimizer, scheduler = train._wrap(model, args)
    try:
        train.load(args, model, optimizer, scheduler)
    except SystemExit as e:
        return {"error": str(e)}
    return {"w": model.decoder.layers[0].mlp.linear_fc1.weight.detach().clone()}


def test_dp_reshardable_state_is_refused_with_both_ways_out(tmp_path):
    from megatron_espace import checkpointing

    run_distributed(_write_baseline, nprocs=1, root=str(tmp_path))
    # the layout comes from the content metadata, as Megatron-LM reads it
    assert checkpointing.optimizer_layout(tmp_path / "iter_0000002") == "dp_reshardable"
    (refused,) = run_distributed(_load, nprocs=1, root=str(tmp_path))
    for part in ("dp_reshardable", "by parameter position", "spec",
                 "--dist-ckpt-optim-fully-reshardable", "--no-load-optim"):
        assert part in refused.get("error", ""), refused
    (weights_only,) = run_distributed(_load_weights_only, nprocs=1, root=str(tmp_path))
    assert "error" not in weights_only and weights_only["w"].abs().sum() > 0


def _load_weights_only(root):
    return _load(root, "--no-load-optim")
