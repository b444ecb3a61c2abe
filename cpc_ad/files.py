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


# A folder shared with the user (a sweep's results folder, notebook 03's output folder) holds
# some files the project wrote and maybe some of the user's: the project replaces only the
# former, which FILES_MANIFEST lists.
FILES_MANIFEST = ".cpc_utils_files"
SCORE_MANIFEST = ".cpc_utils_score"  # in every `score --out` folder: the files score wrote there


def written_here(folder: str | os.PathLike, manifest: str = FILES_MANIFEST) -> set[str]:
    """The files (relative, posix) the project recorded writing into `folder` (its `manifest`:
    FILES_MANIFEST, SCORE_MANIFEST or the demo's), empty when it recorded none; an entry that
    leaves the folder (absolute, or with "..") is never the project's file there. A manifest
    that cannot be read is ValueError naming it."""
    path = Path(folder) / manifest
    if not path.is_file():
        return set()
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read {path}, the list of the files cpc_utils wrote in {folder} ({e}); "
                         "move that folder's files elsewhere and delete it") from None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise ValueError(f"{path} is not a list of files written by cpc_utils; move that folder's files elsewhere "
                         "and delete it")
    return {f for f in files if not Path(f).is_absolute() and ".." not in Path(f).parts}


def check_ours(path: str | os.PathLike) -> None:
    """Raise FileExistsError unless `path` is absent or a file the project wrote (FILES_MANIFEST
    of its folder lists it): a user's summary.md, or a link, is never replaced."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and (not path.is_file() or path.name not in written_here(path.parent))):
        what = "a link" if path.is_symlink() else "a folder" if path.is_dir() else "a file"
        raise FileExistsError(f"{path} is {what} that cpc_utils did not write (not listed in "
                              f"{path.parent / FILES_MANIFEST}); it would be replaced: move it away, or write "
                              "into another folder")


def record_ours(path: str | os.PathLike) -> None:
    """Record `path` in its folder's FILES_MANIFEST before the project writes it there, refused
    (`check_ours`) where it holds a file the project did not write; the next write then knows
    it as the project's."""
    path = Path(path)
    check_ours(path)
    files = written_here(path.parent)
    if path.name not in files:
        save_json({"written_by": "cpc_utils", "files": sorted(files | {path.name})}, path.parent / FILES_MANIFEST)


def save_ours(obj, path: str | os.PathLike, writer: Callable = torch.save) -> None:
    """`save_atomic` into a folder shared with the user, never over a file of the user's
    (`record_ours`)."""
    record_ours(path)
    save_atomic(obj, path, writer)


def save_text_ours(text: str, path: str | os.PathLike) -> None:
    """A text file, written as `save_ours` writes (UTF-8)."""
    save_ours(text, path, lambda s, f: f.write(s.encode()))


def save_json_ours(obj, path: str | os.PathLike) -> None:
    """`save_json`, written as `save_ours` writes."""
    save_text_ours(json.dumps(obj, indent=2, default=_json_default), path)


def remove_ours(path: str | os.PathLike) -> None:
    """Delete `path` if the project wrote it (an earlier summary's figure); anything else stays."""
    path = Path(path)
    if path.is_file() and not path.is_symlink() and path.name in written_here(path.parent):
        path.unlink()
