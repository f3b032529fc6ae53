"""Fault scenarios of the trainer (issue #12; the table is in tests/README.md): each gives a
clear error or the right behaviour. Most run one after another in one process (the import
and model build are paid once); the launcher kill runs under a real torchrun."""

import argparse
import builtins
import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import psutil
import pytest

from tests.harness import ROOT, _free_port, run_distributed

MODEL = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
         "--seq-length", "16", "--make-vocab-size-divisible-by", "256", "--micro-batch-size",
         "2", "--global-batch-size", "4", "--lr", "2e-3", "--eval-iters", "1",
         "--eval-interval", "0", "--log-interval", "1", "--split", "90,10,0"]
CONVERT_MODEL = MODEL[:10]  # the model flags convert takes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from megatron_espace.preprocess_data import preprocess
    from megatron_espace.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("faults")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    preprocess([str(stdlib / "json")], str(root / "text"), build_tokenizer("ByteLevel"),
               file_glob="*.py")
    return root


def _argv(root, *extra):
    return MODEL + ["--data-path", str(Path(root) / "text_text_document"),
                    "--data-cache-path", str(Path(root) / "cache"), *extra]


def _train(argv, expect_error=False):
    """``train.run`` in this process; returns (history or the error message, stdout)."""
    from megatron_espace import runtime, train

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            result = train.run(train.parse_args(argv))
    except SystemExit as e:
        runtime.destroy()
        if not expect_error:
            raise AssertionError(f"unexpected error: {e.code}\n{out.getvalue()}") from None
        return str(e.code), out.getvalue()
    assert not expect_error, f"expected an error:\n{out.getvalue()}"
    return result, out.getvalue()


def _tracker(directory) -> str:
    return (Path(directory) / "latest_checkpointed_iteration.txt").read_text()


def _scenarios(root):
    """Every in-process scenario, in one interpreter. Returns nothing: asserts."""
    from megatron_espace import arguments, convert, runtime, train
    from tests.common import random_projections

    root = Path(root)
    base = root / "base"
    _train(_argv(root, "--train-iters", "2", "--save", str(base)))

    # Megatron-LM's first launch: --load (= --save) holds nothing yet, --pretrained-checkpoint
    pre = root / "pre"
    res, out = _train(_argv(root, "--train-iters", "1", "--load", str(pre), "--save", str(pre),
                            "--pretrained-checkpoint", str(base)))
    assert f"loaded checkpoint with optimizer state from {base / 'iter_0000002'}; starting " \
        "at iteration 0" in out and res["iteration"] == 1, out

    # NaN: stops at the first bad iteration, exits with it, never saves it
    nan = root / "nan"
    msg, _ = _train(_argv(root, "--train-iters", "6", "--lr", "1e20", "--save", str(nan),
                          "--save-interval", "1"), expect_error=True)
    bad = int(re.search(r"iteration (\d+): loss", msg).group(1))
    assert "NaN/Inf" in msg and f"stays on iteration {bad - 1}" in msg, msg
    assert _tracker(nan) == str(bad - 1)
    assert sorted(p.name for p in nan.glob("iter_*")) == [
        f"iter_{i:07d}" for i in range(1, bad)]

    # projections "calibrated" on another checkpoint (info records which)
    args = train.parse_args(_argv(root, "--train-iters", "1"))
    runtime.initialize()
    projs = random_projections(arguments.build_model(args, vocab_size=257))
    runtime.destroy()
    projs.info["checkpoint"] = str(root / "other" / "iter_0000009")
    projs.save(root / "projections.safetensors")
    (root / "espace.yaml").write_text(
        "layers:\n  - match: '*.linear_fc1'\n    rank: 8\n    method: mse\n")
    esp_flags = ["--espace-config", str(root / "espace.yaml"),
                 "--espace-projections", str(root / "projections.safetensors")]

    # requeue: the same command resumes the run's own checkpoint, not the baseline
    esp = root / "esp"
    command = _argv(root, "--train-iters", "4", "--exit-interval", "2", "--load", str(base),
                    "--save", str(esp), *esp_flags)
    first, out = _train(command)
    assert first["iteration"] == 2 and "loaded baseline weights" in out, out
    assert f"calibrated on {root / 'other' / 'iter_0000009'}" in out, out
    assert f"baseline is {base / 'iter_0000002'}" in out, out
    second, out = _train(command)
    assert second["iteration"] == 4 and "loaded checkpoint" in out, out
    assert f"--load {base} is not read" in out, out
    assert sorted(p.name for p in esp.glob("iter_*")) == ["iter_0000002", "iter_0000004"]
    assert f"calibrated on {root / 'other'}" in out  # the baseline is remembered on resume

    # calibrate records a fingerprint of its checkpoint: compared by content, not by path
    from megatron_espace import fingerprint
    from megatron_espace.projection import Projections

    def warning(calibrated_on, baseline):
        recorded = Projections()
        recorded.info["checkpoint"] = fingerprint.checkpoint(calibrated_on)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            train._warn_other_checkpoint(argparse.Namespace(
                baseline=str(baseline), espace_projections="p.safetensors"), recorded)
        return out.getvalue()

    shutil.copytree(base / "iter_0000002", root / "copy" / "iter_0000002")
    assert warning(base / "iter_0000002", root / "copy" / "iter_0000002") == ""  # same bytes
    assert f"p.safetensors was calibrated on {nan / 'iter_0000001'}, but this run's baseline " \
        f"is {base / 'iter_0000002'}" in warning(nan / "iter_0000001", base / "iter_0000002")

    # never overwrite an iteration newer than the one loaded (tracker set back by hand)
    (esp / "latest_checkpointed_iteration.txt").write_text("2")
    msg, _ = _train(command, expect_error=True)
    assert "holds iter_0000004, newer than iteration 2" in msg, msg
    (esp / "latest_checkpointed_iteration.txt").write_text("4")

    # provenance: an ESPACE checkpoint does not silently load as the dense model
    dense = _argv(root, "--train-iters", "4", "--load", str(esp), "--skip-train")
    msg, _ = _train(dense, expect_error=True)
    assert "an ESPACE checkpoint" in msg and "--espace-config" in msg, msg
    assert "--espace-drop-projections" in msg and str(root / "espace.yaml") in msg, msg
    _train(dense + ["--espace-drop-projections"])

    # a compressed checkpoint is recognised from espace.json, the flag is suggested
    comp = root / "comp"
    convert.main(CONVERT_MODEL + ["--load", str(esp), "--save", str(comp), *esp_flags])
    msg, _ = _train(_argv(root, "--train-iters", "4", "--load", str(comp), "--skip-train",
                          *esp_flags), expect_error=True)
    assert "compressed ESPACE checkpoint (espace.json" in msg and "--espace-compressed" in msg
    msg, _ = _train(_argv(root, "--train-iters", "4", "--load", str(base), "--skip-train",
                          "--espace-compressed", *esp_flags), expect_error=True)
    assert "not a compressed checkpoint" in msg, msg

    # load errors name their root cause, uncut
    trunc = root / "trunc"
    shutil.copytree(base, trunc)
    shard = sorted((trunc / "iter_0000002").glob("*.distcp"))[0]
    os.truncate(shard, 100)
    msg, _ = _train(_argv(root, "--train-iters", "4", "--load", str(trunc), "--skip-train"),
                    expect_error=True)
    assert f"{shard}: truncated, 100 bytes" in msg, msg
    msg, _ = _train(_argv(root, "--train-iters", "4", "--load", str(base), "--skip-train",
                          "--ffn-hidden-size", "96"), expect_error=True)
    assert re.search(r"Global shape mismatch for loaded \(torch.Size\(\[2, 128, 32\]\)\) and "
                     r"expected \(\(2, 96, 32\)\) tensor for key decoder\.layers\.mlp\."
                     r"linear_fc1\.weight", msg), msg
    (trunc / "latest_checkpointed_iteration.txt").write_text("abc\n")
    msg, _ = _train(_argv(root, "--train-iters", "4", "--load", str(trunc), "--skip-train"),
                    expect_error=True)
    assert msg.startswith(f"--load {trunc}: {trunc}/latest_checkpointed_iteration.txt: "
                          "holds 'abc'"), msg

    # a --save that cannot be written is refused before training (root writes anywhere
    # but in sysfs)
    readonly = root / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    target = readonly if os.geteuid() != 0 else Path("/sys/kernel")
    msg, out = _train(_argv(root, "--train-iters", "4", "--save", str(target)),
                      expect_error=True)
    assert f"--save {target}: not writable" in msg and "iteration" not in out, (msg, out)

    # a full disk is named as such: the shards' writes hit ENOSPC (/dev/full)
    real_open = builtins.open

    def full_disk(file, mode="r", *a, **k):
        if str(file).endswith(".distcp") and "w" in mode:
            file = "/dev/full"
        return real_open(file, mode, *a, **k)

    builtins.open = full_disk
    try:
        msg, _ = _train(_argv(root, "--train-iters", "1", "--save", str(root / "full")),
                        expect_error=True)
    finally:
        builtins.open = real_open
    assert "no space left on device" in msg and "not saved" in msg, msg
    assert not (root / "full" / "iter_0000001").exists()
    assert not (root / "full" / "latest_checkpointed_iteration.txt").exists()


def test_fault_scenarios(data):
    run_distributed(_scenarios, nprocs=1, timeout=600, root=str(data))


def test_empty_split_refused_at_start(data, capsys):
    from megatron_espace import train

    with pytest.raises(SystemExit):
        train.parse_args(_argv(data, "--train-iters", "4", "--split", "100,0,0"))
    assert "--split 100,0,0 leaves no validation data, but --eval-iters 1" in \
        capsys.readouterr().err
    assert train.parse_args(_argv(data, "--train-iters", "4", "--split", "100,0,0",
                                  "--eval-iters", "0")).eval_iters == 0


def _torchrun(argv, nprocs=2):
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nprocs}",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
            "-m", "megatron_espace.train", *argv]


# set in this pytest process by an earlier in-process runtime.initialize; a child that
# inherited them would rendezvous on this process's port (EADDRINUSE)
_RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _env():
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}
    return dict(env, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def test_kill_launcher_lock_and_requeue(data):
    """kill -9 of torchrun leaves no worker and no checkpoint helper; while the job ran, a
    second job on its --save was refused with one line; the requeue takes over the stale
    lock and resumes."""
    save = data / "killed"
    command = _argv(data, "--train-iters", "1000", "--save", str(save), "--save-interval", "1")
    job = subprocess.Popen(_torchrun(command), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    family = []
    # the job's output keeps flowing once we stop reading it: a full pipe would block every
    # writer in it, a rank's resource tracker too (its leak warnings at exit), which then
    # outlives the kill
    drain = threading.Thread(target=job.stdout.read, daemon=True)
    watchdog = threading.Timer(400, os.killpg, (job.pid, signal.SIGKILL))  # bounds the wait
    watchdog.start()
    try:
        lines = []
        for line in job.stdout:  # until a checkpoint is in: the ranks' helpers then exist
            lines.append(line)
            if "saved checkpoint at iteration 1 " in line:
                break
        else:
            raise AssertionError("".join(lines[-40:]))
        drain.start()
        family = psutil.Process(job.pid).children(recursive=True)
        assert len(family) >= 4, family  # 2 ranks + their dist_checkpointing helpers

        other = subprocess.run(_torchrun(command), cwd=ROOT, env=_env(), capture_output=True,
                               text=True, timeout=300)
        assert other.returncode != 0
        errors = [x for x in other.stderr.splitlines() if "error:" in x]
        holder = json.loads((save / ".espace-save.lock").read_text())
        assert len(errors) == 1 and f"--save {save}: in use by another job (pid " \
            f"{holder['pid']} on host {holder['host']}" in errors[0], other.stderr
        # torchrun adds its own report; no rank printed a traceback
        assert "megatron_espace/" not in other.stderr and "[rank" not in other.stderr

        os.kill(job.pid, signal.SIGKILL)
        job.wait(timeout=30)
        gone, alive = psutil.wait_procs(family, timeout=180)
        assert not alive, [(p.pid, p.cmdline()) for p in alive]
    finally:
        watchdog.cancel()
        for p in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
        if drain.is_alive():
            drain.join(timeout=30)
        job.stdout.close()

    done = int(_tracker(save))
    requeue = subprocess.run(
        [sys.executable, "-m", "megatron_espace.train", *command, "--exit-interval", "1"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert requeue.returncode == 0, requeue.stderr[-3000:]
    assert f"took over the stale lock {save / '.espace-save.lock'} of pid {holder['pid']}" \
        in requeue.stdout, requeue.stdout
    assert f"loaded checkpoint with optimizer state from {save / f'iter_{done:07d}'} at " \
        f"iteration {done}" in requeue.stdout, requeue.stdout
    assert _tracker(save) == str(done + 1)
    assert not (save / ".espace-save.lock").exists()  # released on exit


def test_slurm_requeue_script_requeues_on_the_time_limit_signal(tmp_path):
    """launch/slurm_requeue.sbatch with stand-ins for scontrol and srun: USR1 (what
    ``--signal=B:USR1@600`` sends) stops the step and requeues the same job id."""
    import time

    script = ROOT / "launch" / "slurm_requeue.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@" in text
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(
        f"#!/usr/bin/env bash\necho \"$@\" >> {log}\n"
        "if [ \"$1\" = show ]; then echo node-a; fi\n")
    (bin_dir / "srun").write_text("#!/usr/bin/env bash\nexec sleep 60\n")  # a long step
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node-a",
               SLURM_JOB_NUM_NODES="1", SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(ROOT),
               SAVE=str(tmp_path / "ckpt"), DATA_PATH="/d")
    job = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not (log.is_file() and "show hostnames" in log.read_text()):
            assert time.monotonic() < deadline and job.poll() is None, job.stdout.read()
            time.sleep(0.1)
        time.sleep(0.5)
        job.send_signal(signal.SIGUSR1)
        out, _ = job.communicate(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, out
    assert "requeue 4242" in log.read_text().splitlines(), (log.read_text(), out)
    assert "requeueing job 4242" in out
