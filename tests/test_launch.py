"""The Megatron-LM wrapper (launch/pretrain_gpt_espace.py), the patch and the launch scripts.

Everything here runs without a Megatron-LM checkout: the wrapper's decision functions on real
torch_dist checkpoints, its model provider with a stand-in for ``megatron.training``, and the
scripts through ``bash -n`` and ``DRY_RUN=1``. The tests marked ``needs_checkout`` use
``$MEGATRON_LM_PATH`` (a checkout at tag core_v0.16.1) and are skipped without it.
"""

import argparse
import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
WRAPPER = LAUNCH / "pretrain_gpt_espace.py"
PATCHES = ROOT / "patches"
SCRIPTS = sorted(LAUNCH.glob("*.sh")) + [LAUNCH / "slurm_espace.sbatch",
                                         PATCHES / "check_patch.sh"]
MEGATRON_LM_PATH = os.environ.get("MEGATRON_LM_PATH")
needs_checkout = pytest.mark.skipif(
    not MEGATRON_LM_PATH,
    reason="set MEGATRON_LM_PATH to a Megatron-LM checkout at tag core_v0.16.1 to run this")

RANK16 = {"layers": [{"match": "decoder.layers.*", "rank": 16, "method": "mse"}]}
RANK8 = {"layers": [{"match": "decoder.layers.*", "rank": 8, "method": "mse"}]}


def _load_wrapper():
    spec = importlib.util.spec_from_file_location("pretrain_gpt_espace", WRAPPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


w = _load_wrapper()


# ------------------------------------------------------------------------- the module itself


def test_wrapper_imports_without_megatron_lm():
    env = {k: v for k, v in os.environ.items() if k != "MEGATRON_LM_PATH"}
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('w', {str(WRAPPER)!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "bad = [n for n in sys.modules if n.startswith(('megatron', 'pretrain_gpt', "
            "'torch'))]\n"
            "assert not bad, bad\n"
            "for f in ('espace_args', 'resolve_checkpoint_dir', 'checkpoint_lacks_projections',"
            " 'strictness_for', 'layer_spec_problem', 'main'): assert callable(getattr(m, f))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr


def test_main_without_megatron_lm_says_what_to_do(monkeypatch):
    monkeypatch.delenv("MEGATRON_LM_PATH", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(SystemExit, match="MEGATRON_LM_PATH"):
        w.add_megatron_lm_to_path()
    with pytest.raises(SystemExit, match="no pretrain_gpt.py"):
        w.add_megatron_lm_to_path(str(ROOT))


def test_megatron_version_check(tmp_path, monkeypatch):
    from megatron.core.package_info import __version__ as installed

    info = tmp_path / "megatron" / "core" / "package_info.py"
    info.parent.mkdir(parents=True)
    major, minor, patch = installed.split("rc")[0].split(".")[:3]
    info.write_text(f"MAJOR = {major}\nMINOR = {minor}\nPATCH = {patch}\n")
    assert w.checkout_core_version(tmp_path) == f"{major}.{minor}.{patch}"
    w.check_megatron_versions(tmp_path)  # agrees: silent
    info.write_text("MAJOR = 0\nMINOR = 99\nPATCH = 0\n")
    with pytest.raises(SystemExit, match="carries megatron-core 0.99.0"):
        w.check_megatron_versions(tmp_path)
    monkeypatch.setenv("ESPACE_ALLOW_MEGATRON_MISMATCH", "1")
    w.check_megatron_versions(tmp_path)


def test_installed_wheel_helpers_replace_make(monkeypatch):
    from megatron.core.datasets import utils as dataset_utils

    monkeypatch.setattr(dataset_utils, "compile_helpers", dataset_utils.compile_helpers)
    has_makefile = (Path(dataset_utils.__file__).parent / "Makefile").is_file()
    assert w.use_installed_dataset_helpers() is (not has_makefile)
    if not has_makefile:  # the pip wheel: no Makefile, compiled helpers_cpp
        assert dataset_utils.compile_helpers() is None


# ------------------------------------------------------------------------- flags and spec


def test_espace_args_both_or_neither(tmp_path):
    parser = w.espace_args(argparse.ArgumentParser())
    cfg, proj = tmp_path / "espace.yaml", tmp_path / "p.safetensors"
    cfg.write_text("layers: []\n")
    proj.write_bytes(b"")

    assert w.check_espace_args(parser.parse_args([])) is False
    args = parser.parse_args(["--espace-config", str(cfg), "--espace-projections", str(proj)])
    assert w.check_espace_args(args) is True and not args.espace_keep_dropout
    with pytest.raises(SystemExit, match="go together"):
        w.check_espace_args(parser.parse_args(["--espace-config", str(cfg)]))
    with pytest.raises(SystemExit, match="go together"):
        w.check_espace_args(parser.parse_args(["--espace-projections", str(proj)]))
    with pytest.raises(SystemExit, match="no such file"):
        w.check_espace_args(parser.parse_args(["--espace-config", str(cfg),
                                               "--espace-projections", str(tmp_path / "x")]))
    assert parser.parse_args(["--espace-keep-dropout"]).espace_keep_dropout


@pytest.mark.parametrize("flags, problem", [
    ({}, "--transformer-impl local"),  # Megatron-LM's default is transformer_engine
    ({"transformer_impl": "transformer_engine"}, "TELayerNormColumnParallelLinear"),
    ({"transformer_impl": "inference_optimized"}, "--transformer-impl local"),
    ({"transformer_impl": "local"}, None),
    ({"transformer_impl": "transformer_engine", "spec": ["my.module", "spec"]}, None),
    ({"transformer_impl": "local", "use_legacy_models": True}, "--use-legacy-models"),
    ({"transformer_impl": "local", "init_model_with_meta_device": True}, "meta"),
])
def test_layer_spec_problem(flags, problem):
    message = w.layer_spec_problem(argparse.Namespace(**flags))
    if problem is None:
        assert message is None
    else:
        assert problem in message


# ------------------------------------------------------------------------- which checkpoint


def _tracker(directory, text):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / w.TRACKER).write_text(text)


def test_resolve_checkpoint_dir_follows_megatron_lm(tmp_path):
    load, pretrained = tmp_path / "run", tmp_path / "base"
    assert w.resolve_checkpoint_dir(None) is None
    assert w.resolve_checkpoint_dir(str(load)) is None  # no tracker: Megatron-LM loads nothing
    assert w.resolve_checkpoint_dir(str(load), ckpt_step=7) == load / "iter_0000007"
    _tracker(pretrained, "release")
    # --load has no checkpoint yet: Megatron-LM falls back to --pretrained-checkpoint
    assert w.resolve_checkpoint_dir(str(load), str(pretrained)) == pretrained / "release"
    _tracker(load, "120\n")
    assert w.resolve_checkpoint_dir(str(load), str(pretrained)) == load / "iter_0000120"
    assert w.resolve_checkpoint_dir(str(load), ckpt_step=40) == load / "iter_0000040"
    _tracker(load, "garbage")
    assert w.resolve_checkpoint_dir(str(load)) is None


@pytest.mark.parametrize("current, lacks, expected", [
    ("assume_ok_unexpected", True, "log_unexpected"),  # Megatron-LM's default
    ("raise_unexpected", True, "log_unexpected"),
    ("return_unexpected", True, "log_unexpected"),
    ("log_unexpected", True, "log_unexpected"),
    ("raise_all", True, "log_all"),
    ("return_all", True, "log_all"),
    ("log_all", True, "log_all"),
    ("ignore_all", True, "ignore_all"),
    ("assume_ok_unexpected", False, "assume_ok_unexpected"),
    ("raise_all", False, "raise_all"),
])
def test_strictness_for(current, lacks, expected):
    assert w.strictness_for(current, lacks) == expected


def test_strictness_modes_are_megatron_cores():
    from megatron.core.dist_checkpointing.validation import StrictHandling

    assert set(w._TOLERANT) == {m.value for m in StrictHandling}
    with pytest.raises(ValueError, match="unknown"):
        w.strictness_for("lenient", True)


# ------------------------------------------------------------------------- real checkpoints


def _gpt(seed=0, **config):
    from tests.common import gpt_model, transformer_config

    torch.manual_seed(seed)
    return gpt_model(transformer_config(**config))


def _espace(cfg=RANK16, seed=0, **config):
    import megatron_espace as espace
    from tests.common import random_projections

    model = _gpt(seed, **config)
    espace.apply_espace(model, espace.ESPACEConfig.from_dict(cfg), random_projections(model))
    return model


def _save(model, run_dir, iteration=3):
    """A Megatron-LM style save directory: iter_XXXXXXX/ (torch_dist) and the tracker."""
    from megatron_espace import checkpointing

    checkpointing.save({"model": model.sharded_state_dict()},
                       run_dir / f"iter_{iteration:07d}")
    (run_dir / w.TRACKER).write_text(str(iteration))
    return run_dir / f"iter_{iteration:07d}"


@pytest.fixture(scope="module")
def checkpoints(megatron_tp1, tmp_path_factory):
    root = tmp_path_factory.mktemp("launch-ckpts")
    return {
        "baseline": _save(_gpt(seed=1), root / "baseline"),
        "espace": _save(_espace(seed=2), root / "espace"),
        "rank8": _save(_espace(RANK8, seed=3), root / "rank8"),
        "wider": _save(_gpt(seed=4, hidden_size=32), root / "wider"),
        "rmsnorm": _save(_gpt(seed=5, normalization="RMSNorm"), root / "rmsnorm"),
    }


def test_baseline_checkpoint_lacks_only_projections(checkpoints):
    model = _espace()
    comparison = w.compare_with_checkpoint(model.sharded_state_dict(), checkpoints["baseline"])
    assert comparison.missing_other == [] and comparison.shape_mismatch == []
    assert len(comparison.missing_projections) == 8  # 2 layers x qkv, proj, fc1, fc2
    assert all(w.is_projection_key(k) for k in comparison.missing_projections)
    assert w.checkpoint_lacks_projections(checkpoints["baseline"], model.sharded_state_dict())


def test_espace_checkpoint_has_its_projections(checkpoints):
    model = _espace()
    assert not w.checkpoint_lacks_projections(checkpoints["espace"], model.sharded_state_dict())
    # and a plain model on a baseline checkpoint: nothing to decide
    assert not w.checkpoint_lacks_projections(checkpoints["baseline"],
                                              _gpt().sharded_state_dict())


def test_checkpoint_of_another_shape_is_refused_by_name(checkpoints):
    model = _espace()
    with pytest.raises(w.CheckpointMismatch) as e:
        w.checkpoint_lacks_projections(checkpoints["wider"], model.sharded_state_dict())
    assert "embedding.word_embeddings.weight" in str(e.value) and "[128, 64]" in str(e.value)
    with pytest.raises(w.CheckpointMismatch, match="lacks 3 entries.*layer_norm_bias"):
        w.checkpoint_lacks_projections(checkpoints["rmsnorm"], model.sharded_state_dict())
    with pytest.raises(w.CheckpointMismatch, match="another --espace-config"):
        w.checkpoint_lacks_projections(checkpoints["rank8"], model.sharded_state_dict())


def test_no_torch_dist_checkpoint_means_nothing_to_decide(tmp_path, megatron_tp1):
    model = _espace()
    assert not w.checkpoint_lacks_projections(None, model.sharded_state_dict())
    assert not w.checkpoint_lacks_projections(tmp_path, model.sharded_state_dict())


def test_chosen_strictness_loads_a_baseline_the_default_refuses(checkpoints):
    """What Megatron-LM's _load_global_dist_base_checkpoint and load_checkpoint then do."""
    from megatron.core import dist_checkpointing

    from megatron_espace.surgery import linear_layers

    baseline = checkpoints["baseline"]
    model = _espace(seed=9)
    projections = {n: m.espace_proj.clone() for n, m in linear_layers(model).items()}
    with pytest.raises(BaseException, match="espace_proj") as e:  # the default
        dist_checkpointing.load(model.sharded_state_dict(), str(baseline),
                                strict="assume_ok_unexpected")
    assert not isinstance(e.value, Exception)  # CheckpointException: a BaseException

    strict = w.strictness_for("assume_ok_unexpected",
                              w.checkpoint_lacks_projections(baseline,
                                                             model.sharded_state_dict()))
    state = dist_checkpointing.load(model.sharded_state_dict(), str(baseline), strict=strict)
    model.load_state_dict(state, strict=True)  # the layers' pre-hook supplies P

    reference = _gpt(seed=1)  # the baseline's weights
    for name, layer in linear_layers(model).items():
        assert torch.equal(layer.weight, linear_layers(reference)[name].weight), name
        assert torch.equal(layer.espace_proj, projections[name]), name


def test_legacy_torch_checkpoint_of_a_transformer_engine_model_loads(megatron_tp1):
    """--ckpt-format torch from Transformer Engine: norms under the fused linears' names."""
    from megatron_espace.surgery import linear_layers

    baseline = _gpt(seed=1).state_dict()
    te_names = (("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
                ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"))
    te = {}
    for key, value in baseline.items():
        for local, fused in te_names:
            key = key.replace(local, fused)
        te[key] = value
    assert any(".linear_qkv.layer_norm_weight" in k for k in te) and te.keys() != baseline.keys()
    model = _espace(seed=9)
    projections = {n: m.espace_proj.clone() for n, m in linear_layers(model).items()}
    with pytest.raises(RuntimeError, match="input_layernorm.weight"):
        model.load_state_dict(dict(te), strict=True)
    w.register_te_checkpoint_hook(model)
    model.load_state_dict(dict(te), strict=True)
    for key, value in _gpt(seed=1).state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(model.state_dict()[key], value), key
    for name, layer in linear_layers(model).items():  # P kept by the layers' own pre-hook
        assert torch.equal(layer.espace_proj, projections[name]), name
    model.load_state_dict(_gpt(seed=1).state_dict(), strict=True)  # local names: unchanged


def test_moe_is_refused_with_the_reason():
    message = w.layer_spec_problem(argparse.Namespace(transformer_impl="local", num_experts=8))
    assert "pre_mlp_layernorm" in message and "mixture-of-experts" in message
    assert w.layer_spec_problem(argparse.Namespace(transformer_impl="local",
                                                   num_experts=None)) is None


# ------------------------------------------------------------------------- the model provider


@pytest.fixture
def fake_megatron_training(monkeypatch):
    """A stand-in for Megatron-LM's ``megatron.training`` (get_args, print_rank_0)."""
    module = types.ModuleType("megatron.training")
    module.args = None
    module.printed = []
    module.get_args = lambda: module.args
    module.print_rank_0 = module.printed.append
    monkeypatch.setitem(sys.modules, "megatron.training", module)
    return module


def _megatron_args(tmp_path, load=None, **over):
    from tests.common import random_projections

    cfg = tmp_path / "espace.yaml"
    cfg.write_text("layers:\n  - match: 'decoder.layers.*'\n    rank: 16\n    method: mse\n")
    projections = tmp_path / "projections.safetensors"
    if not projections.exists():
        random_projections(_gpt(num_layers=4)).save(projections)  # layers 0..3
    args = dict(espace_config=str(cfg), espace_projections=str(projections),
                espace_keep_dropout=False, hidden_dropout=0.1, attention_dropout=0.1,
                transformer_impl="local", spec=None, load=load, pretrained_checkpoint=None,
                ckpt_step=None, dist_ckpt_strictness="assume_ok_unexpected",
                virtual_pipeline_model_parallel_size=None)
    args.update(over)
    return argparse.Namespace(**args)


def _base_provider(pre_process=True, post_process=True, vp_stage=None, config=None,
                   pg_collection=None):
    from megatron.training import get_args

    args = get_args()
    return _gpt(seed=1, hidden_dropout=args.hidden_dropout,
                attention_dropout=args.attention_dropout)


def test_provider_applies_espace_and_picks_strictness(checkpoints, tmp_path,
                                                      fake_megatron_training):
    from megatron_espace.surgery import linear_layers

    args = _megatron_args(tmp_path, load=str(checkpoints["baseline"].parent))
    fake_megatron_training.args = args
    model = w.ESPACEModelProvider(_base_provider)(pre_process=True, post_process=True)
    assert all(m.projection_rank == 16 for m in linear_layers(model).values())
    assert args.dist_ckpt_strictness == "log_unexpected"
    assert args.hidden_dropout == 0.0 and args.attention_dropout == 0.0
    assert model.config.hidden_dropout == 0.0  # the model was built without dropout
    assert any("holds no projections" in m for m in fake_megatron_training.printed)

    # resuming an ESPACE checkpoint: strictness untouched; dropout kept when asked
    args = _megatron_args(tmp_path, load=str(checkpoints["espace"].parent),
                          espace_keep_dropout=True)
    fake_megatron_training.args = args
    model = w.ESPACEModelProvider(_base_provider)()
    assert args.dist_ckpt_strictness == "assume_ok_unexpected"
    assert model.config.hidden_dropout == 0.1

    # another model's checkpoint: refused before any load, naming the tensor
    fake_megatron_training.args = _megatron_args(tmp_path,
                                                 load=str(checkpoints["wider"].parent))
    with pytest.raises(SystemExit, match="embedding.word_embeddings.weight"):
        w.ESPACEModelProvider(_base_provider)()


def test_provider_without_espace_is_pretrain_gpt(tmp_path, megatron_tp1,
                                                 fake_megatron_training):
    from megatron_espace.surgery import linear_layers

    args = _megatron_args(tmp_path, espace_config=None, espace_projections=None,
                          transformer_impl="transformer_engine")
    fake_megatron_training.args = args
    model = w.ESPACEModelProvider(_base_provider)()
    assert all(not hasattr(m, "espace_proj") for m in linear_layers(model).values())
    assert args.hidden_dropout == 0.1 and args.dist_ckpt_strictness == "assume_ok_unexpected"


def test_provider_refuses_transformer_engine_spec(tmp_path, megatron_tp1,
                                                  fake_megatron_training):
    fake_megatron_training.args = _megatron_args(tmp_path,
                                                 transformer_impl="transformer_engine")
    with pytest.raises(SystemExit, match="--transformer-impl local"):
        w.ESPACEModelProvider(_base_provider)()


def test_provider_with_virtual_pipeline_chunks(tmp_path, megatron_tp1, fake_megatron_training):
    """Each chunk gets the rules matching its layers; a rule matching no chunk fails last."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from megatron_espace.surgery import linear_layers

    cfg = tmp_path / "vpp.yaml"
    cfg.write_text("layers:\n"
                   "  - {match: 'decoder.layers.0.mlp.*', rank: 16, method: mse}\n"
                   "  - {match: 'decoder.layers.3.self_attention.*', rank: 8, method: mse}\n")

    def chunk_provider(pre_process=True, post_process=True, vp_stage=None, config=None,
                       pg_collection=None):
        model = _gpt(seed=vp_stage)
        for module in model.modules():  # chunk 1 holds global layers 2 and 3
            if isinstance(module, TransformerLayer):
                module.layer_number += 2 * vp_stage
        return model

    args = _megatron_args(tmp_path, espace_config=str(cfg),
                          virtual_pipeline_model_parallel_size=2)
    fake_megatron_training.args = args
    provider = w.ESPACEModelProvider(chunk_provider)
    chunks = [provider(vp_stage=i) for i in range(2)]
    ranks = {n: m.projection_rank for c in chunks for n, m in linear_layers(c).items()
             if getattr(m, "projection_rank", None)}
    assert ranks == {"decoder.layers.0.mlp.linear_fc1": 16, "decoder.layers.0.mlp.linear_fc2": 16,
                     "decoder.layers.3.self_attention.linear_qkv": 8,
                     "decoder.layers.3.self_attention.linear_proj": 8}

    cfg.write_text("layers:\n  - {match: 'decoder.layers.0.mlp.*', rank: 16, method: mse}\n"
                   "  - {match: 'decoder.layers.7.*', rank: 8, method: mse}\n")
    provider = w.ESPACEModelProvider(chunk_provider)
    provider(vp_stage=0)
    with pytest.raises(ValueError, match=r"layers\[1\].match.*decoder.layers.7"):
        provider(vp_stage=1)

    # an error in a rule that only a later chunk uses still names its place in the file
    cfg.write_text("layers:\n  - {match: 'decoder.layers.0.mlp.*', rank: 16, method: mse}\n"
                   "  - {match: 'decoder.layers.3.self_attention.*', rank: 64, method: mse}\n")
    provider = w.ESPACEModelProvider(chunk_provider)
    provider(vp_stage=0)
    with pytest.raises(ValueError, match=r"vpp.yaml: layers\[1\].rank: 64 >= K=64"):
        provider(vp_stage=1)


# ------------------------------------------------------------------------- scripts


@pytest.mark.parametrize("overlap,step_wgrad", [(False, True), (True, True), (False, False)])
def test_setup_defers_weight_grads(tmp_path, megatron_tp1, fake_megatron_training, overlap,
                                   step_wgrad):
    """``step_wgrad_setup`` wraps the built DDP chunks' ``no_sync`` (accumulation.py) and
    sets ``config.no_sync_func`` where Megatron-LM's ``train()`` will not (no overlap)."""
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig

    model = _espace()
    model.config.no_sync_func = None
    ddp = DDP(model.config, DistributedDataParallelConfig(overlap_grad_reduce=overlap), model)
    plain_no_sync = ddp.no_sync
    fake_megatron_training.args = _megatron_args(tmp_path, overlap_grad_reduce=overlap,
                                                 espace_step_wgrad=step_wgrad)
    built = w.step_wgrad_setup(lambda *a, **k: ([ddp], "optimizer", "scheduler"))("provider")
    assert built == ([ddp], "optimizer", "scheduler")
    wrapped = ddp.no_sync != plain_no_sync
    assert wrapped == step_wgrad
    # with overlap Megatron-LM's train() sets it to the chunks' no_sync; it asserts it unset
    assert model.config.no_sync_func == (ddp.no_sync if step_wgrad and not overlap else None)
    if step_wgrad:
        with ddp.no_sync():
            assert all(m.espace_step.deferring for m in _projected_layers(model))
        assert not any(m.espace_step.deferring for m in _projected_layers(model))


def _projected_layers(model):
    from megatron_espace.surgery import linear_layers

    return [m for m in linear_layers(model).values() if m.projection_rank]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    assert script.is_file()
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _dry(script, env=None, args=()):
    settings = ("TOOL", "DATA_PATH", "LOAD", "SAVE", "ESPACE_CONFIG", "ESPACE_PROJECTIONS",
                "GPUS_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID",
                "MEGATRON_LM_PATH", "TP", "PP", "BF16")  # megatron_tp1 sets MASTER_* here
    full = {k: v for k, v in os.environ.items() if k not in settings}
    full.update(DRY_RUN="1", **(env or {}))
    return subprocess.run(["bash", str(script), *args], env=full, capture_output=True,
                          text=True, timeout=60)


def test_single_node_command():
    out = _dry(LAUNCH / "train_single_node.sh",
               dict(GPUS_PER_NODE="2", TP="2", DATA_PATH="0.3 /d/a 0.7 /d/b", LOAD="/ckpt/b",
                    ESPACE_CONFIG="e.yaml", ESPACE_PROJECTIONS="p.safetensors", BF16="0"),
               ["--lr", "3e-4"])
    assert out.returncode == 0, out.stderr
    cmd = out.stdout.split()
    assert cmd[:3] == [os.environ.get("PYTHON", "python"), "-m", "torch.distributed.run"]
    assert "--nproc_per_node=2" in cmd and "megatron_espace.train" in cmd
    flags = " ".join(cmd)
    for expected in ("--tensor-model-parallel-size 2", "--data-path 0.3 /d/a 0.7 /d/b",
                     "--load /ckpt/b", "--espace-config e.yaml",
                     "--espace-projections p.safetensors", "--lr 3e-4"):
        assert expected in flags, expected
    assert "--bf16" not in cmd and "cuda" not in flags.lower()


@pytest.mark.parametrize("tool, module", [("calibrate", "megatron_espace.calibrate"),
                                          ("sensitivity", "megatron_espace.sensitivity"),
                                          ("convert", "megatron_espace.convert")])
def test_tools_get_their_flags(tool, module):
    env = dict(TOOL=tool, DATA_PATH="/d/a", LOAD="/ckpt/b", SAVE="/ckpt/c",
               ESPACE_CONFIG="e.yaml", ESPACE_PROJECTIONS="p.safetensors")
    out = _dry(LAUNCH / "train_single_node.sh", env)
    assert out.returncode == 0, out.stderr
    assert module in out.stdout.split()
    assert ("--data-path" in out.stdout) == (tool != "convert")
    assert {"calibrate": "--out projections.safetensors",
            "sensitivity": "--target-compression 0.5",
            "convert": "--save /ckpt/c"}[tool] in out.stdout


@pytest.mark.parametrize("env, message", [
    ({}, "needs DATA_PATH"),
    ({"DATA_PATH": "/d", "ESPACE_CONFIG": "e.yaml"}, "go together"),
    ({"DATA_PATH": "/d", "TOOL": "bogus"}, "TOOL=bogus"),
    ({"DATA_PATH": "/d", "TOOL": "calibrate"}, "needs ESPACE_CONFIG"),
])
def test_single_node_refuses_incomplete_settings(env, message):
    out = _dry(LAUNCH / "train_single_node.sh", env)
    assert out.returncode != 0 and message in out.stderr


def test_multi_node_command():
    script = LAUNCH / "train_multi_node.sh"
    out = _dry(script, dict(DATA_PATH="/d", NNODES="4", MASTER_ADDR="node0"))
    assert out.returncode != 0 and "NODE_RANK" in out.stderr
    out = _dry(script, dict(DATA_PATH="/d", NNODES="4", NODE_RANK="3", MASTER_ADDR="node0",
                            MASTER_PORT="6000", GPUS_PER_NODE="8"))
    assert out.returncode == 0, out.stderr
    for expected in ("--nnodes=4", "--node_rank=3", "--nproc_per_node=8",
                     "--rdzv_backend=c10d", "--rdzv_endpoint=node0:6000"):
        assert expected in out.stdout.split(), expected


def test_slurm_script_runs_one_torchrun_per_node(tmp_path):
    """With stand-ins for scontrol and srun: MASTER_ADDR is the first host, NODE_RANK the
    node id, one launch per node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho gpu-a17; echo gpu-a18\n")
    (bin_dir / "srun").write_text(
        "#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\n"
        "for i in 0 1; do SLURM_NODEID=$i \"$@\"; done\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-a[17-18]",
               SLURM_JOB_NUM_NODES="2", SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(ROOT),
               SLURM_GPUS_ON_NODE="4", DATA_PATH="/d")
    out = _dry(LAUNCH / "slurm_espace.sbatch", env, ["--eval-iters", "5"])
    assert out.returncode == 0, out.stderr
    lines = [line.split() for line in out.stdout.splitlines() if "torch.distributed.run" in line]
    assert len(lines) == 2
    for rank, cmd in enumerate(lines):
        assert f"--node_rank={rank}" in cmd and "--nnodes=2" in cmd
        assert "--rdzv_endpoint=gpu-a17:29500" in cmd and "--rdzv_id=4242" in cmd
        assert "--nproc_per_node=4" in cmd and cmd[-2:] == ["--eval-iters", "5"]
    assert "#SBATCH --ntasks-per-node=1" in (LAUNCH / "slurm_espace.sbatch").read_text()


def test_megatron_lm_script_command(tmp_path):
    script = LAUNCH / "megatron_lm_espace.sh"
    out = _dry(script, dict(DATA_PATH="/d"))
    assert out.returncode != 0 and "MEGATRON_LM_PATH" in out.stderr
    checkout = tmp_path / "Megatron-LM"
    checkout.mkdir()
    (checkout / "pretrain_gpt.py").write_text("")
    out = _dry(script, dict(MEGATRON_LM_PATH=str(checkout), DATA_PATH="/d", LOAD="/ckpt/b",
                            ESPACE_CONFIG="e.yaml", ESPACE_PROJECTIONS="p.safetensors"),
               ["--use-flash-attn"])
    assert out.returncode == 0, out.stderr
    cmd = out.stdout.split()
    assert str(WRAPPER) in cmd and cmd[-1] == "--use-flash-attn"
    flags = " ".join(cmd)
    for expected in ("--transformer-impl local", "--ckpt-format torch_dist", "--load /ckpt/b",
                     "--espace-config e.yaml", "--espace-projections p.safetensors",
                     "--max-position-embeddings 1024"):
        assert expected in flags, expected
    out = _dry(script, dict(MEGATRON_LM_PATH=str(checkout), DATA_PATH="/d",
                            ESPACE_PROJECTIONS="p.safetensors"))
    assert out.returncode != 0 and "go together" in out.stderr


# ------------------------------------------------------------------------- both pretrain() APIs


# pretrain()'s signature at the two ends of the supported range (Megatron-LM
# megatron/training/training.py at core_v0.16.1 and core_v0.19.2), defaults elided
def _pretrain_v0_16(train_valid_test_dataset_provider, model_provider, model_type,
                    forward_step_func, process_non_loss_data_func=None,
                    extra_args_provider=None, args_defaults={}, get_embedding_ranks=None,
                    get_position_embedding_ranks=None, non_loss_data_func=None, store=None,
                    inprocess_call_wrapper=None):
    pass


def _pretrain_v0_19(cfg_container, train_valid_test_dataset_provider, model_type,
                    forward_step_func, model_provider=None, process_non_loss_data_func=None,
                    get_embedding_ranks=None, get_position_embedding_ranks=None,
                    non_loss_data_func=None, store=None, inprocess_call_wrapper=None,
                    p2p_communicator=None, pg_collection=None, skip_model_parallel_init=False):
    pass


def _pretrain_v0_18(cfg_container, train_valid_test_dataset_provider, model_provider,
                    model_type, forward_step_func, process_non_loss_data_func=None,
                    get_embedding_ranks=None, get_position_embedding_ranks=None,
                    non_loss_data_func=None, store=None, inprocess_call_wrapper=None):
    pass


@pytest.mark.parametrize("pretrain, api", [(_pretrain_v0_16, "args"), (_pretrain_v0_18, "config"),
                                           (_pretrain_v0_19, "config")])
def test_pretrain_api_detected(pretrain, api):
    assert w.pretrain_api(pretrain) == api
    with pytest.raises(SystemExit, match="not one this wrapper knows"):
        w.pretrain_api(lambda cfg_container, provider: None)


def test_pretrain_api_of_the_installed_wheel():
    """megatron-core >= 0.17 wheels ship megatron/training: read its pretrain() (it needs
    python >= 3.12 to import, so from the source) and its config-container helpers."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("megatron.core")
    training = Path(spec.origin).parent.parent / "training"
    if not (training / "training.py").is_file():
        pytest.skip("this megatron-core wheel ships no megatron/training (< 0.17)")

    def functions(path):
        tree = ast.parse((training / path).read_text())
        return {n.name: [a.arg for a in n.args.args + n.args.kwonlyargs]
                for n in tree.body if isinstance(n, ast.FunctionDef)}

    api = w.pretrain_api(functions("training.py")["pretrain"])
    from megatron.core import __version__

    assert api == ("config" if w._version_tuple(__version__) >= (0, 18) else "args")
    if api == "config":
        assert {"extra_args_provider", "args_defaults"} <= set(
            functions("arguments.py")["parse_and_validate_args"])
        assert "args" in functions("argument_utils.py")["pretrain_cfg_container_from_args"]


@pytest.mark.parametrize("pretrain", [_pretrain_v0_16, _pretrain_v0_18, _pretrain_v0_19],
                         ids=["core_v0.16.1", "core_v0.18.2", "core_v0.19.2"])
def test_main_calls_pretrain_as_megatron_lm_expects(pretrain, monkeypatch):
    """main() against stand-ins with pretrain()'s real signature: the call must bind, the
    provider must be ESPACE's, the flags must go through the ESPACE parser either way."""
    import inspect

    calls = {}

    def recording(*args, **kwargs):
        calls["bound"] = inspect.signature(pretrain).bind(*args, **kwargs).arguments

    recording.__signature__ = inspect.signature(pretrain)
    training = types.ModuleType("megatron.training")
    training.pretrain = recording
    training.set_startup_timestamps = lambda **k: None
    training.inprocess_restart = types.SimpleNamespace(
        maybe_wrap_for_inprocess_restart=lambda fn: (fn, "store"))
    arguments = types.ModuleType("megatron.training.arguments")
    arguments.parse_and_validate_args = lambda extra_args_provider, args_defaults: (
        calls.setdefault("parsed", (extra_args_provider, args_defaults)) and "ARGS")
    argument_utils = types.ModuleType("megatron.training.argument_utils")
    argument_utils.pretrain_cfg_container_from_args = lambda args: ("CONTAINER", args)
    training.training = types.ModuleType("megatron.training.training")
    training.training.setup_model_and_optimizer = setup = lambda *a, **k: None
    gpt = types.ModuleType("pretrain_gpt")
    gpt.train_valid_test_datasets_provider = lambda *a: None
    gpt.model_provider, gpt.gpt_builder, gpt.forward_step, gpt.get_embedding_ranks = (
        print, repr, len, abs)  # distinct callables
    for name, module in (("megatron.training", training), ("pretrain_gpt", gpt),
                         ("megatron.training.training", training.training),
                         ("megatron.training.arguments", arguments),
                         ("megatron.training.argument_utils", argument_utils)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(w, "add_megatron_lm_to_path", lambda: None)
    monkeypatch.setattr(w, "use_installed_dataset_helpers", lambda: None)
    w.main()
    bound = calls["bound"]
    assert isinstance(bound["model_provider"], w.ESPACEModelProvider)
    base = bound["model_provider"].base_provider
    assert base.func is gpt.model_provider and base.args == (gpt.gpt_builder,)
    assert bound["forward_step_func"] is gpt.forward_step and bound["store"] == "store"
    assert gpt.train_valid_test_datasets_provider.is_distributed
    wrapped = training.training.setup_model_and_optimizer  # A and dW once per step
    assert wrapped is not setup and wrapped.__qualname__.startswith("step_wgrad_setup")
    if "cfg_container" in bound:
        assert bound["cfg_container"] == ("CONTAINER", "ARGS")
        assert calls["parsed"] == (w.extra_args_provider, w.ARGS_DEFAULTS)
    else:
        assert bound["extra_args_provider"] is w.extra_args_provider
        assert bound["args_defaults"] == w.ARGS_DEFAULTS


@pytest.mark.parametrize("patch", ["pretrain_gpt_espace.patch",
                                   "pretrain_gpt_espace-core_v0.19.2.patch"])
def test_patch_touches_only_pretrain_gpt(patch):
    text = (PATCHES / patch).read_text()
    files = [line.split()[-1] for line in text.splitlines() if line.startswith("+++ ")]
    assert files == ["b/pretrain_gpt.py"]
    assert "--espace-config" in text and "apply_espace" in text
    # core_v0.19.2's pretrain() takes the provider by keyword, after a config container
    assert ("'model_provider': espace_model_provider" in text) == ("0.19.2" in patch)


@pytest.mark.parametrize("minor, patch", [("16", "pretrain_gpt_espace.patch"),
                                          ("19", "pretrain_gpt_espace-core_v0.19.2.patch"),
                                          ("18", None)])
def test_check_patch_picks_the_checkouts_patch(tmp_path, minor, patch):
    """Without Megatron-LM's file here, a stand-in pretrain_gpt.py: the right patch is named
    (and refused, since the file is not Megatron-LM's)."""
    (tmp_path / "pretrain_gpt.py").write_text("print('not Megatron-LM')\n")
    info = tmp_path / "megatron" / "core" / "package_info.py"
    info.parent.mkdir(parents=True)
    info.write_text(f"MAJOR = 0\nMINOR = {minor}\nPATCH = 2\n")
    out = subprocess.run(["bash", str(PATCHES / "check_patch.sh"), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    if patch is None:
        assert out.returncode == 2 and "has no ESPACE patch" in out.stderr
    else:
        assert out.returncode == 1 and f"FAILED: {patch} does not apply" in out.stderr


# ------------------------------------------------------------------------- with a checkout


@needs_checkout
def test_patch_applies_to_the_checkout():
    out = subprocess.run(["bash", str(PATCHES / "check_patch.sh"), MEGATRON_LM_PATH],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_checkout
def test_wrapper_against_megatron_lm():
    """pretrain_gpt imports through the wrapper, exposes what the wrapper calls, and
    Megatron-LM's own parser takes the ESPACE flags with the defaults the wrapper expects."""
    code = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location('w', {str(WRAPPER)!r})
w = importlib.util.module_from_spec(spec); spec.loader.exec_module(w)
w.add_megatron_lm_to_path()
w.use_installed_dataset_helpers()
try:
    import pretrain_gpt
except ModuleNotFoundError as e:
    print('MISSING', e.name); sys.exit(3)
for name in ('model_provider', 'gpt_builder', 'forward_step', 'get_embedding_ranks',
             'train_valid_test_datasets_provider', 'has_nvidia_modelopt'):
    assert hasattr(pretrain_gpt, name), name
from megatron.training.arguments import parse_args
sys.argv = ['x', '--espace-config', 'c.yaml', '--espace-projections', 'p.safetensors']
args = parse_args(w.extra_args_provider)
assert args.espace_config == 'c.yaml' and args.espace_projections == 'p.safetensors'
assert args.espace_step_wgrad is True and args.overlap_grad_reduce is False
assert args.dist_ckpt_strictness == 'assume_ok_unexpected', args.dist_ckpt_strictness
# step_wgrad_setup replaces the module global that pretrain() calls
import inspect
from megatron.training import training
assert 'setup_model_and_optimizer(' in inspect.getsource(training.pretrain)
assert 'config.no_sync_func is None' in inspect.getsource(training.train)
assert args.transformer_impl == 'transformer_engine'
assert '--transformer-impl local' in w.layer_spec_problem(args)
sys.argv = ['x', '--transformer-impl', 'local']
assert w.layer_spec_problem(parse_args(w.extra_args_provider)) is None
print('OK')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=str(ROOT))
    if out.returncode == 3:
        pytest.skip(f"Megatron-LM's dependencies are not installed: {out.stdout.strip()}")
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
