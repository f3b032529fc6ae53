"""Work-arounds for megatron-core bugs on paths this project uses (0.16.1 to 0.19.2).

Applied by the trainer only where the bug bites (the distributed optimizer over torch's
Adam, i.e. without apex / Transformer Engine). Which versions need which (0.16.1 and 0.19.2
run the trainer's tests, ``make test``; 0.17/0.18 read from the source):

* :func:`distributed_optimizer_torch_adam`: 0.16.1 to 0.19.2 (``KeyError: 'step'``);
* :func:`allocate_adam_state`, :func:`unshare_adam_steps`: 0.16.1; harmless where not needed
  (zeros that are overwritten, a clone of a tensor);
* :func:`set_param_group_lr`: 0.19 (param groups matched on ``max_lr``/``min_lr``); earlier
  versions load the old lr range silently, so it is right on every version;
"""

import torch

_applied = set()


def distributed_optimizer_torch_adam() -> None:
    """Let a distributed-optimizer checkpoint load into torch's Adam (0.16.1).

    ``DistributedOptimizer._set_main_param_and_optimizer_states`` copies every key of the
    Adam state, including the ``step`` it has just inserted, from tensors that have no
    ``step`` (it lives in the param groups): ``KeyError: 'step'``. Copy the keys present.
    Still so in 0.19.2 (it iterates the destination's keys).
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


def set_param_group_lr(optimizer_state: dict, max_lr: float, min_lr: float) -> int:
    """Give every saved param group of a loaded optimizer state this run's lr range.

    Retraining from a baseline's Adam state runs at a new ``--lr``. From 0.19,
    ``load_state_dict`` pairs saved and current param groups by a key that includes
    ``max_lr``/``min_lr`` (``param_group_identifier_keys``), so a baseline saved at
    another lr raises ``Could not find parameter group``; up to 0.18 groups pair by
    position and the saved ``max_lr`` would silently replace this run's. Our trainer
    builds every group at ``--lr``/``--min-lr``, so rewriting the saved groups before
    the load is right on every version. Returns the number of groups changed.
    """
    changed = 0
    stack = [optimizer_state]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "param_groups" and isinstance(value, list):
                    for group in value:
                        if isinstance(group, dict) and "max_lr" in group:
                            group["max_lr"], group["min_lr"] = max_lr, min_lr
                            changed += 1
                else:
                    stack.append(value)
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return changed

