"""What differs between megatron-core 0.16.1 and 0.19.2 on our paths (``make test`` runs this
file on both ends of the supported range)."""

import functools
import re
from pathlib import Path

import megatron_espace  # noqa: F401  (sets NO_VCS_VERSION before megatron is imported)

ROOT = Path(__file__).resolve().parent.parent


def _version(text):
    return tuple(int(x) for x in re.match(r"(\d+)\.(\d+)\.(\d+)", text).groups())


def test_installed_megatron_core_is_in_the_supported_range():
    from megatron.core import __version__

    low, high = re.search(r'"megatron-core>=([\d.]+),<([\d.]+)"',
                          (ROOT / "setup.py").read_text()).groups()
    assert _version(low) <= _version(__version__) < _version(high + ".0"), __version__
    # no "+<commit>": megatron-core >= 0.18 appends `git rev-parse` unless NO_VCS_VERSION=1
    assert re.fullmatch(r"[\d.]+(rc\d+)?", __version__), __version__


def test_spec_walk_descends_into_partials():
    """megatron-core >= 0.18 holds the MLP as partial(MLP.as_mlp_submodule, submodules=...)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from megatron_espace.layers import ESPACEColumnParallelLinear, ESPACERowParallelLinear
    from megatron_espace.surgery import _swap_linears

    def build(*args, submodules=None):
        return args, submodules

    spec = ModuleSpec(module=MLP, submodules=functools.partial(
        build, ColumnParallelLinear, submodules=MLPSubmodules(
            linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)))
    out = _swap_linears(spec).submodules
    assert isinstance(out, functools.partial) and out.func is build
    assert out.args == (ESPACEColumnParallelLinear,)
    assert out.keywords["submodules"].linear_fc1 is ESPACEColumnParallelLinear
    assert out.keywords["submodules"].linear_fc2 is ESPACERowParallelLinear


def test_param_group_lr_rewritten_wherever_the_groups_are():
    from megatron_espace.compat import set_param_group_lr

    state = {"optimizer": {"param_groups": [{"max_lr": 2e-3, "min_lr": 1e-5, "wd_mult": 1.0},
                                            {"max_lr": 2e-3, "min_lr": 1e-5, "wd_mult": 0.0}]},
             "chained": [{"param_groups": [{"max_lr": 5e-4, "min_lr": 0.0}]}],
             "other": {"param_groups": [{"lr": 1.0}]}}  # no max_lr: not a megatron group
    assert set_param_group_lr(state, 1e-3, 0.0) == 3
    groups = state["optimizer"]["param_groups"] + state["chained"][0]["param_groups"]
    assert all(g["max_lr"] == 1e-3 and g["min_lr"] == 0.0 for g in groups)
    assert state["optimizer"]["param_groups"][1]["wd_mult"] == 0.0
    assert state["other"]["param_groups"] == [{"lr": 1.0}]
