"""Atomic writes: every file the project writes goes through a temporary file and a rename,
so an interrupted run never leaves a half-written checkpoint, JSON or figure."""
from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch


def save_atomic(obj, path: str | os.PathLike, writer: Callable = torch.save) -> None:
    """Write through a temporary file in the same folder, then rename over `path`.

    A failed write leaves the previous `path` as it was and raises OSError naming the file and
    the cause (a full disk is ENOSPC, also when torch's zip writer reports it as "unexpected
    pos"). Files get the usual mode (0644 under the common umask 022), not mkstemp's 0600.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            writer(obj, f)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        full = getattr(e, "errno", None) == errno.ENOSPC or "unexpected pos" in str(e)
        if full or isinstance(e, OSError):
            kept = f"; the previous {path.name} is kept" if path.exists() else ""
            cause = "the disk is full (no space left on device)" if full else (e.strerror or str(e))
            raise OSError(errno.ENOSPC if full else e.errno, f"cannot write {path}: {cause}{kept}") from e
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_json(obj, path: str | os.PathLike) -> None:
    save_atomic(obj, path, lambda o, f: f.write(json.dumps(o, indent=2, default=_json_default).encode()))


def _json_default(o):
    if isinstance(o, (np.generic, np.ndarray, torch.Tensor)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")
