"""The ``--save`` directory of a training run: one job at a time, and where a run resumes.

A save directory holds Megatron-LM's layout: ``iter_XXXXXXX/`` checkpoints and
``latest_checkpointed_iteration.txt`` (the tracker), written only after a checkpoint is
complete. :func:`lock` gives one job the directory: rank 0 creates ``.espace-save.lock``
holding its pid, host, process start time and SLURM job id. A lock whose process is gone
(same host, pid dead or reused) or that belongs to an earlier run of the same SLURM job (a
requeue keeps the job id) is stale and is taken over; any other lock refuses the job.
"""

import errno
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Optional

TRACKER = "latest_checkpointed_iteration.txt"
LOCK = ".espace-save.lock"
_ITER = re.compile(r"iter_(\d{7})")


def tracker_iteration(directory) -> Optional[int]:
    """The iteration ``directory``'s tracker names (None: no tracker or ``release``).

    A tracker holding anything but a number or ``release`` raises ``ValueError`` naming it.
    """
    tracker = Path(directory) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if text == "release":
        return None
    if not text.isdigit():
        raise ValueError(f"{tracker}: holds {text[:40]!r}, not an iteration number or "
                         "'release'; fix or remove it")
    return int(text)


def checkpoints(directory) -> dict:
    """``{iteration: path}`` of the complete-named ``iter_XXXXXXX`` directories (no
    ``.tmp``/``.old`` suffix)."""
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    return {int(m.group(1)): p for p in directory.iterdir()
            if (m := _ITER.fullmatch(p.name)) and p.is_dir()}


def newer_than(directory, iteration: int) -> list:
    """The checkpoints in ``directory`` after ``iteration``, oldest first: a run that starts
    at ``iteration`` would overwrite them."""
    return [p for it, p in sorted(checkpoints(directory).items()) if it > iteration]


# ----------------------------------------------------------------------------- the lock


def _start_time(pid: int) -> Optional[float]:
    """The start time of process ``pid``, or None when there is none."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "start_time": _start_time(os.getpid()),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _stale_reason(holder: dict) -> Optional[str]:
    """Why the lock ``holder`` wrote is stale, or None when its job may still run."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is not None and holder.get("slurm_job_id") == job:
        return f"it was taken by an earlier run of SLURM job {job} (a requeue)"
    if holder.get("host") != socket.gethostname():
        return None  # another host's processes cannot be checked from here
    started = _start_time(int(holder.get("pid", -1)))
    if started is None:
        return f"process {holder.get('pid')} is gone"
    if holder.get("start_time") is not None and abs(started - holder["start_time"]) > 1:
        return f"process {holder.get('pid')} is gone (its pid now belongs to another process)"
    return None


class SaveLock:
    """The exclusive lock on a ``--save`` directory; :meth:`release` (or exit) frees it."""

    def __init__(self, directory):
        self.path = Path(directory) / LOCK
        self.owner = _owner()

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a note when a stale lock was taken over.

        Raises ``SystemExit`` naming the holder when another job has it, and when the
        directory cannot be created or written.
        """
        directory = self.path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
            tmp = directory / f".{LOCK}.{os.getpid()}"
            tmp.write_text(json.dumps(self.owner))
        except OSError as e:
            raise SystemExit(f"--save {directory}: not writable ({e.strerror or e}); "
                             "checked before training so no work is lost") from None
        note = None
        try:
            for _ in range(3):
                try:
                    os.link(tmp, self.path)  # atomic, fails if the lock exists (NFS too)
                    return note
                except FileExistsError:
                    pass
                note = self._take_over_if_stale()
            raise SystemExit(f"--save {directory}: could not take {self.path}; another job "
                             "keeps taking it")
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over_if_stale(self) -> str:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None  # released meanwhile: try again
        try:
            holder = json.loads(text)
            assert isinstance(holder, dict)
        except (ValueError, AssertionError):
            raise SystemExit(f"--save {self.path.parent}: the lock file {self.path} is not "
                             "one this tool wrote; remove it if no job uses this directory"
                             ) from None
        mine = holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()
        reason = "this process took it before" if mine else _stale_reason(holder)
        if reason is None:
            raise SystemExit(
                f"--save {self.path.parent}: in use by another job (pid {holder.get('pid')} on "
                f"host {holder.get('host')}, since {holder.get('since')}); one job per save "
                f"directory. If that job is gone, remove {self.path}")
        aside = self.path.with_name(f"{LOCK}.stale{os.getpid()}")
        try:
            os.replace(self.path, aside)  # only one of several racing jobs moves it
        except FileNotFoundError:
            return None
        aside.unlink(missing_ok=True)
        if mine:
            return None
        return (f"took over the stale lock {self.path} of pid {holder.get('pid')} on host "
                f"{holder.get('host')}: {reason}")

    def release(self) -> None:
        """Remove the lock if it is still this process's."""
        try:
            if json.loads(self.path.read_text()).get("pid") == self.owner["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass


_held = []


def lock(directory) -> SaveLock:
    """Lock ``directory`` for this process (see :class:`SaveLock`); it is released by
    :func:`release_all`, which ``runtime.run_main`` and interpreter exit call."""
    import atexit

    held = SaveLock(directory)
    note = held.acquire()
    if note:
        print(note, flush=True)
    if not _held:
        atexit.register(release_all)
    _held.append(held)
    return held


def release_all() -> None:
    while _held:
        _held.pop().release()


def is_disk_full(error: BaseException, directory) -> bool:
    """Whether ``error`` (or what it wraps) is a full disk under ``directory``."""
    seen = set()
    stack = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e):
            return True
        stack += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # torch's CheckpointException
        if isinstance(failures, dict):
            stack += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    try:  # torch's own writers lose the errno ("unexpected pos 704 vs 598")
        import shutil

        return shutil.disk_usage(directory).free < (1 << 20)
    except OSError:
        return False
