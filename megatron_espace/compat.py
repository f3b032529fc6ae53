"""Work-arounds for megatron-core 0.16.1 bugs on paths this project uses.

Applied by the trainer only where the bug bites (the distributed optimizer over torch's
Adam, i.e. without apex / Transformer Engine), each with the version it was seen in.
"""

import torch

_applied = set()


def distributed_optimizer_torch_adam() -> None:
    """Let a distributed-optimizer checkpoint load into torch's Adam (0.16.1).

    ``DistributedOptimizer._set_main_param_and_optimizer_states`` copies every key of the
    Adam state, including the ``step`` it has just inserted, from tensors that have no
    ``step`` (it lives in the param groups): ``KeyError: 'step'``. Copy the keys present.
    """
    if "dist_opt_step" in _applied:
        return
    from megatron.core.optimizer import distrib_optimizer as d

    if d.HAVE_APEX_OR_TE:
        return
    original = d.DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():
            if key in dst:
                dst[key].copy_(value)

    d.DistributedOptimizer._set_main_param_and_optimizer_states = (
        _set_main_param_and_optimizer_states)
    _applied.add("dist_opt_step")


def inner_optimizers(optimizer):
    return [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]


def allocate_adam_state(optimizer) -> None:
    """The distributed optimizer cannot describe its checkpoint layout before its torch Adam
    has state (``assert len(steps) == 1`` in 0.16.1): give it zeros to be overwritten."""
    for inner in inner_optimizers(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.tensor(0.0),
                                      "exp_avg": torch.zeros_like(p.data),
                                      "exp_avg_sq": torch.zeros_like(p.data)}


def unshare_adam_steps(optimizer) -> None:
    """0.16.1's distributed optimizer loads one ``step`` tensor into every parameter's Adam
    state; torch's Adam then increments it once per parameter per step (5 -> 34). Give each
    parameter its own copy."""
    for inner in inner_optimizers(optimizer):
        for state in inner.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
