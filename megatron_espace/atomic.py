"""Atomic file writes whose files get the mode the umask gives.

Every file this project writes goes through :func:`replacing`: the content goes to a
temporary file beside the target, which gets mode ``0o666 & ~umask`` (``safetensors`` and
``tempfile`` create 0600 whatever the umask) and is renamed over the target only once it
is complete, so neither a reader nor a crash ever sees half a file.
"""

import contextlib
import json
import os
from pathlib import Path


def umask() -> int:
    """The process umask, read without changing it (``/proc``), else by setting it back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666 & ~umask``."""
    return 0o666 & ~umask()


@contextlib.contextmanager
def replacing(path):
    """Yield a temporary path beside ``path`` (same suffix) to write; on success it gets
    :func:`file_mode` and is renamed over ``path``; on an error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj, indent: int = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent))


def save_safetensors(path, tensors: dict, metadata: dict = None) -> None:
    """``safetensors.torch.save_file`` through :func:`replacing`."""
    from safetensors.torch import save_file

    with replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def savefig(fig, path, **kwargs) -> None:
    """``fig.savefig`` through :func:`replacing` (the format follows ``path``'s suffix)."""
    with replacing(path) as tmp:
        fig.savefig(tmp, **kwargs)


def read_json_object(path, error=ValueError) -> dict:
    """The JSON object in ``path``; ``error`` naming the file when it is not one."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object")
    return value
