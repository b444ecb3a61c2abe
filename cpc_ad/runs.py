"""A run's identity and folder. What determines a run's result is fingerprinted (parameters,
data, and the code that trains and the code that scores, each hashed without docstrings or
comments); a run writes into a staging folder and replaces the previous run only once it
succeeded; locks keep two processes out of one folder."""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Sequence

import torch

from .files import SCORE_MANIFEST, _json_default, save_json, written_here
from .data import _category_files
from .devices import _distributed


class RunBlocked(RuntimeError):
    """A run cannot start or go on for a reason its user can fix (another process holds its
    folder, a checkpoint that cannot be read): the message names the file and what to do, so
    command-line entry points print it as one line, not a traceback."""


# A run's identity and folder: what determines its result is fingerprinted; a run writes into
# a staging folder next to its output and replaces the previous run only once it succeeded.

# where and how long a run computes, not what: a pair finished on cuda:1 is not rerun on cuda:0
NOT_IDENTITY = ("resume", "output_dir", "num_heatmaps", "data_root", "time_budget", "device")
RESUMABLE_TRAIN = ("epochs", "patience", "time_budget")  # what a resumed run may change
RESUMABLE_CHANGES = tuple(f"parameters.{k}" for k in RESUMABLE_TRAIN)


# The code a result depends on, by part: a change in "train" retrains, one in "score" only
# rescores the saved weights. Whole modules, or the named top-level definitions of one; each is
# hashed as its syntax tree without docstrings, so comments, docstrings and layout never count,
# and plots, reports, the CLI and run bookkeeping are not part of any result.
CODE_PARTS = {
    "train": {"data": None, "synthetic": None, "checks": None, "patches": None, "encoders": None, "devices": None,
              "models": None, "corruption": None, "training": None,
              "pipeline": ("RunParameters", "MODEL_PARAMETERS", "plan_run", "load_run_data", "run_cpcad",
                           "_run_in", "pretrain_pooled", "load_init")},
    "score": {"scoring": None, "head": None, "selection": None, "metrics": None, "schema": ("SCHEMA_VERSION", "METRIC_KEYS", "METRIC_FAMILIES",
                                                           "MetricsRecord"),
              "bundle": ("BUNDLE_FORMAT", "BUNDLE_VERSION", "save_bundle"),
              "pipeline": ("SCORING_PARAMETERS", "evaluate", "_score_and_evaluate", "_headline", "_select")},
}
# what a rescore may change: the scoring code and the parameters of ScoringConfig and the thresholds
RESCORE_CHANGES = ("code.score", *(f"parameters.{k}" for k in ("detector", "reduce", "candidates", "test_negatives",
                                                                 "dense_scoring", "target_fpr")))
RESUMABLE_CHANGES = (*RESUMABLE_CHANGES, *RESCORE_CHANGES)  # training resumes whatever scoring will be


def _code_digest(modules: dict[str, Sequence[str] | None], package: Path) -> str:
    import ast
    h = hashlib.sha256()
    for module, names in modules.items():
        tree = ast.parse((package / f"{module}.py").read_text())
        for node in ast.walk(tree):  # docstrings are documentation, not code
            body = getattr(node, "body", None)
            if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                    and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant)
                    and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        nodes = [n for n in tree.body if names is None or _defines(n) & set(names)]
        if names is not None and {d for n in nodes for d in _defines(n)} < set(names):
            raise RuntimeError(f"CODE_PARTS names definitions that {module}.py lacks: "
                               f"{sorted(set(names) - {d for n in nodes for d in _defines(n)})}")
        h.update(module.encode() + b"\0" + "\n".join(ast.dump(n) for n in nodes).encode())
    return h.hexdigest()[:12]


def _defines(node) -> set[str]:
    import ast
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return {node.target.id}
    return set()


_CODE: dict[str, str] = {}


def code_fingerprint(package: str | os.PathLike | None = None) -> dict[str, str]:
    """{"train": digest, "score": digest} of the code a run's result depends on (`CODE_PARTS`),
    of this package or of the copy of it in folder `package`."""
    if package is not None:
        return {part: _code_digest(modules, Path(package)) for part, modules in CODE_PARTS.items()}
    if not _CODE:
        _CODE.update(code_fingerprint(Path(__file__).parent))
    return dict(_CODE)


def code_version() -> str:
    """The code a run used, as one string "<train>-<score>" (no git needed)."""
    code = code_fingerprint()
    return f"{code['train']}-{code['score']}"


def data_fingerprint(root: str | os.PathLike, category: str) -> dict:
    """The files a category's run reads: {"root", "category", "files", "digest"} (names and sizes).

    The files are those `load_category` reads (`_category_files`, symlinked folders included):
    deleting a training image changes the digest however train/good got there.
    """
    cat_dir = Path(root).resolve() / category
    train, test = _category_files(cat_dir)
    files = sorted({*train, *(f for f, _, _ in test), *(m for _, _, m in test if m is not None)})
    size = lambda p: p.stat().st_size if p.exists() else "missing"  # noqa: E731 (a dangling link: the loader says so)
    listing = "\n".join(f"{p.relative_to(cat_dir).as_posix()} {size(p)}" for p in files)
    return {"root": str(cat_dir.parent), "category": category, "files": len(files),
            "digest": hashlib.sha256(listing.encode()).hexdigest()[:16]}


def run_fingerprint(parameters: dict, root: str | os.PathLike, category: str) -> dict:
    """What determines a run's result: its parameters (all but NOT_IDENTITY), the data, the code.

    Notebook 02 stores it in its checkpoints and metrics.json; resume and scripts/sweep.py
    compare it (`fingerprint_diff`), so results of other settings are never taken as current.
    """
    params = {k: v for k, v in sorted(parameters.items()) if k not in NOT_IDENTITY}
    return json.loads(json.dumps({"parameters": params, "data": data_fingerprint(root, category),
                                  "code": code_fingerprint()}, default=_json_default))


def fingerprint_diff(old: dict, new: dict, ignore: Sequence[str] = ()) -> list[str]:
    """Dotted names of the fields where two fingerprints differ, e.g. ["parameters.width", "code"]."""
    def flat(d, prefix=""):
        return {k2: v2 for k, v in d.items()
                for k2, v2 in (flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}).items()}
    a, b = flat(old or {}), flat(new or {})
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in ignore]


def acquire_lock(path: str | os.PathLike, what: str | None = None) -> Path:
    """Create lock file `path` ({"pid", "host", "started"}), or raise RunBlocked naming `what`
    it guards (e.g. "output_dir results/x"; default the lock's folder) and its holder.

    A lock left by a process that no longer exists on this host is taken over; one held by
    this process (a notebook cell run again in the same kernel) is kept.
    """
    import socket
    path, host = Path(path), socket.gethostname()
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == host and holder.get("pid") == os.getpid():
                return path
            if holder.get("host") == host and not _alive(holder.get("pid")):
                path.unlink(missing_ok=True)  # its process is gone: a crash, a killed kernel
                continue
            raise RunBlocked(f"{what or path.parent} is being written by process {holder.get('pid')} on "
                               f"{holder.get('host')} since {holder.get('started')} (lock {path}); wait for it "
                               "to finish, or delete the lock file if that process is gone") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        return path
    raise RunBlocked(f"cannot take the lock {path}")


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except PermissionError:  # exists, owned by someone else
        return True
    except (OSError, TypeError, ValueError):
        return False
    return True


RUN_MARKER = ".cpc_utils_run"  # in every run folder this module writes; once finished, it lists the run's files
# A run folder is recognised by what this project wrote there: its marker and, once the run has
# finished (`finish_run`), the marker's list of every file and folder in it. Anything not on the
# list (a user's notes, photo.png, checkpoints/mine.pt) is the user's: named, never deleted.
# A staging folder (`.<name>.partial`, being written) and a run of a cpc_utils from before the
# list have no list; theirs is what a run writes, by name (LEGACY_RUN_FILES, LEGACY_RUN_FOLDERS).
LEGACY_RUN_FILES = ("metrics.json", "model.pt", "run.json", "*.png", "*.ipynb", ".*.tmp")
LEGACY_RUN_FOLDERS = {"checkpoints": ("last.pt", "best.pt", "progress.json", ".*.tmp"), "checkpoints/seed*": (
    "last.pt", "best.pt", "progress.json", ".*.tmp")}  # train_model's files; notebook 01's, one folder per seed


def _read_marker(path: Path) -> dict | None:
    """The run marker of folder `path` as a dict, None when it has none (or a file not of ours)."""
    try:
        marker = json.loads((path / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _score_outputs(path: Path) -> set[str]:
    """What `python -m cpc_utils score` wrote into folder `path` (notebook 02 suggests a run's
    scored/), by its SCORE_MANIFEST: those files, their folders and the manifest, relative."""
    try:
        files = written_here(path, SCORE_MANIFEST)
    except ValueError:
        return set()
    return {SCORE_MANIFEST} | files | {p.as_posix() for f in files for p in Path(f).parents if p != Path(".")}


def _legacy_entry(rel: Path, patterns: Sequence[str] | None = None) -> bool:
    """Whether a run writes an entry at `rel` (relative to its folder) by LEGACY_RUN_FILES /
    LEGACY_RUN_FOLDERS, for folders without the marker's list of files; with `patterns`, whether
    `rel` is one of them, whole (Path.match alone matches from the right)."""
    if patterns is not None:
        return any(rel.match(f) and len(rel.parts) == len(Path(f).parts) for f in patterns)
    if len(rel.parts) == 1:
        return _legacy_entry(rel, LEGACY_RUN_FILES)
    return any(_legacy_entry(rel.parent, [folder]) and any(rel.match(f) for f in names)
               for folder, names in LEGACY_RUN_FOLDERS.items())


def _foreign_entries(path: Path) -> list[str]:
    """The entries under folder `path` (relative, folders with a trailing /) that no run of
    this project wrote there: not on its marker's list of files (or, without one, not what a
    run writes), and not a `score` output's; every link. Folders holding only the project's
    files are not listed themselves."""
    marker = _read_marker(path) or {}
    listed = set(marker["files"]) if isinstance(marker.get("files"), list) else None
    foreign: list[str] = []
    for folder, dirs, files in os.walk(path):  # links are not followed: each is foreign
        here = Path(folder).relative_to(path)
        scored = next(((p, _score_outputs(path / p)) for p in [here, *here.parents]
                       if (path / p / SCORE_MANIFEST).is_file()), None)
        for name in sorted(dirs) + sorted(files):
            rel, full = here / name, Path(folder) / name
            if full.is_symlink():
                ours = False
            elif scored is not None:
                ours = rel.relative_to(scored[0]).as_posix() in scored[1]
            elif name in dirs:  # a score output's folder is checked file by file inside
                ours = (full / SCORE_MANIFEST).is_file() or (rel.as_posix() + "/" in listed if listed is not None
                                                              else _legacy_entry(rel, LEGACY_RUN_FOLDERS))
            else:
                ours = rel.as_posix() == RUN_MARKER or (rel.as_posix() in listed if listed is not None
                                                        else _legacy_entry(rel))
            if not ours:
                foreign.append(rel.as_posix() + ("/" if full.is_dir() and not full.is_symlink() else ""))
        dirs[:] = [d for d in dirs if (here / d).as_posix() + "/" not in foreign]  # a foreign folder: named once
    return foreign


def _listing(path: Path) -> list[str]:
    """Every entry under folder `path`, relative, folders with a trailing / (the marker's list)."""
    entries = []
    for folder, dirs, files in os.walk(path):
        here = Path(folder).relative_to(path)
        entries += [(here / d).as_posix() + "/" for d in dirs] + [(here / f).as_posix() for f in files]
    return sorted(e for e in entries if e != RUN_MARKER)


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a run folder this module wrote and holds nothing else, so a run may
    replace it: it carries RUN_MARKER, and every entry in it, subfolders included, is on the
    marker's list of what the run wrote (`finish_run`; for a staging folder or a run of an older
    cpc_utils, what a run writes), or a `score` output's. Without the marker a folder is not a
    run of ours, however much it looks like one (a user's metrics.json and photo.png). A user's
    file added to a finished run's folder makes it not replaceable: the next run stops and names
    it instead of deleting it."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink() or _read_marker(path) is None:
        return False
    return not _foreign_entries(path)


def record_run_files(out: str | os.PathLike, names: Sequence[str]) -> None:
    """Add `names` (relative to the finished run folder `out`) to its marker's list of files,
    before writing them there: scripts/sweep.py's executed copy of the notebook."""
    out = Path(out)
    marker = _read_marker(out)
    if marker is None or not isinstance(marker.get("files"), list):
        raise FileNotFoundError(f"{out} is not a finished run folder of cpc_utils (no {RUN_MARKER} listing its files)")
    save_json({**marker, "files": sorted(set(marker["files"]) | set(names))}, out / RUN_MARKER)


def _check_replaceable(path: Path, what: str) -> None:
    """Raise FileExistsError unless `path` is absent, an empty folder or a run folder of ours:
    a run never deletes what it did not write (a data folder, notes, an earlier sweep)."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir() or path.is_symlink():
        raise FileExistsError(f"{what} {path} is {'a link' if path.is_symlink() else 'a file'}, not a run folder; "
                              "choose another output_dir")
    entries = sorted(e.name + ("/" if e.is_dir() else "") for e in path.iterdir())
    if entries and not is_run_folder(path):
        if _read_marker(path) is not None:  # our run, with something of the user's added
            foreign = _foreign_entries(path)
            raise FileExistsError(f"{what} {path} is an earlier run of cpc_utils, but it also holds "
                                  f"{', '.join(foreign[:5])}{' and more' if len(foreign) > 5 else ''}, which the run "
                                  "did not write; move that out (a run replaces the whole folder) or choose another "
                                  "output_dir")
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        older = " (if it is a run of a cpc_utils older than its run marker, delete it yourself)" \
            if (path / "run.json").is_file() else ""
        raise FileExistsError(f"{what} {path} is not empty and not a run folder of cpc_utils (it holds {shown})"
                              f"{older}; a run replaces only an earlier run's folder: choose a new or empty output_dir")


def _remove_run(path: Path) -> None:
    """Delete a run folder of ours (`_check_replaceable` said so), its marker and run.json last,
    so a deletion cut short leaves a folder that is still recognisably ours."""
    import shutil
    if not path.exists():
        return
    for e in path.iterdir():
        if e.name in (RUN_MARKER, "run.json"):
            continue
        if e.is_dir() and not e.is_symlink():
            shutil.rmtree(e)
        else:
            e.unlink()
    shutil.rmtree(path)


def _named(out: str | os.PathLike) -> Path:
    """`out` as a path with a name of its own: "." or "a/.." name no folder, so their staging
    and previous-run siblings would land inside them; the absolute path does."""
    out = Path(out)
    return out.resolve() if out.name in ("", "..") else out


def begin_run(out: str | os.PathLike, fingerprint: dict, resume: bool = False) -> Path:
    """Lock output folder `out` and return the staging folder this run writes into.

    Nothing of a previous run in `out` is touched until `finish_run` replaces it, so a run that
    fails (a bad parameter, a crash, Ctrl-C) loses no model and leaves no results that claim
    to be its own. The staging folder is `out`'s hidden sibling `.<name>.partial`; its
    run.json records the fingerprint and status, its RUN_MARKER that it is a run folder.
    An `out` that holds anything but an earlier run (`is_run_folder`), e.g. a data folder or
    a results tree, is a FileExistsError naming it and some of its entries, before anything
    is written; an `out` inside the data folder of `fingerprint`'s category is a ValueError.
    resume=True continues an unfinished staging run, or else a copy of `out`'s checkpoints
    (to train a finished run further). Under torchrun only rank 0 prepares the
    folder; the others wait for it and get its path.
    """
    import shutil
    out = _named(out)
    work, old = out.parent / f".{out.name}.partial", out.parent / f".{out.name}.old"
    data = (fingerprint or {}).get("data") or {}
    if data.get("root") and data.get("category"):  # its figures would be read as that category's images
        cat_dir = Path(data["root"], data["category"]).resolve()
        if cat_dir in out.resolve().parents:
            raise ValueError(f"output_dir {out} is inside the data folder {cat_dir}: the run's files (figures, "
                             f"model.pt) would be read as {data['category']}'s images by the next run; choose an "
                             "output_dir outside the data")
    rank, world = _distributed()
    if rank != 0:
        torch.distributed.barrier()  # rank 0 has prepared `work`
        return work
    lock = acquire_lock(out.parent / f".{out.name}.lock", f"output_dir {out}")
    try:
        if old.exists() and not out.exists():  # a switch-over was interrupted: put the previous run back
            _check_replaceable(old, "the previous run's copy")
            old.rename(out)
        for path, what in ((out, "output_dir"), (work, "the staging folder"), (old, "the previous run's copy")):
            _check_replaceable(path, what)
    except FileExistsError:
        lock.unlink(missing_ok=True)
        raise
    has_checkpoint = lambda run: any((run / "checkpoints").rglob("last.pt"))  # noqa: E731 (notebook 01: one per seed)
    if not resume or not has_checkpoint(work):
        _remove_run(work)
        if resume and has_checkpoint(out):
            shutil.copytree(out / "checkpoints", work / "checkpoints")
        elif resume:  # e.g. a mistyped output_dir: said, so hours of training from epoch 0 are no surprise
            print(f"resume=True, but neither {out} nor its staging folder holds a checkpoint: training from the start")
    work.mkdir(parents=True, exist_ok=True)
    save_json({"written_by": "cpc_utils.begin_run", "output_dir": str(out)}, work / RUN_MARKER)
    save_json({"status": "running", "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "output_dir": str(out), "fingerprint": fingerprint}, work / "run.json")
    if world > 1:
        torch.distributed.barrier()
    return work


def finish_run(out: str | os.PathLike, work: str | os.PathLike, metrics: dict) -> Path:
    """Write metrics.json into the staging folder `work` (last), then make it `out`; unlock.

    The previous run in `out`, if any, is moved aside first and deleted once the new one is
    in place; `out` is checked again (`begin_run`'s rule), so a folder that became something
    else meanwhile is kept and this run stays in `work`. Returns the path of the metrics.json written.
    """
    out, work = _named(out), Path(work)
    old = out.parent / f".{out.name}.old"
    _check_replaceable(out, "output_dir")
    _check_replaceable(old, "the previous run's copy")
    save_json(metrics, work / "metrics.json")
    save_json({**json.loads((work / "run.json").read_text()), "status": "finished",
               "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, work / "run.json")
    save_json({**(_read_marker(work) or {}), "written_by": "cpc_utils.finish_run", "output_dir": str(out),
               "files": _listing(work)}, work / RUN_MARKER)  # from now on, what is not on this list is not ours
    _remove_run(old)
    if out.exists():
        out.rename(old)
    work.rename(out)
    _remove_run(old)
    (out.parent / f".{out.name}.lock").unlink(missing_ok=True)
    return out / "metrics.json"


def abandon_run(out: str | os.PathLike, work: str | os.PathLike, error: BaseException) -> None:
    """Record in the staging folder `work` why the run stopped (run.json's status "failed", or
    "stopped" for Ctrl-C and a time budget, with the error) and unlock `out`: a run that diverged
    or crashed leaves no "running" status and no lock behind it. The staging folder stays, so
    resume=True can continue from its checkpoints; the previous run in `out` is untouched."""
    from .training import TimeBudgetReached
    out, work = _named(out), Path(work)
    stopped = isinstance(error, (KeyboardInterrupt, TimeBudgetReached))
    try:
        run = json.loads((work / "run.json").read_text())
        save_json({**run, "status": "stopped" if stopped else "failed", "ended": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "error": f"{type(error).__name__}: {error}"}, work / "run.json")
    except (OSError, ValueError):  # a full disk, a staging folder gone: the lock must still go
        pass
    lock = out.parent / f".{out.name}.lock"
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return
    if holder.get("pid") == os.getpid():  # ours: not another process's that took it over
        lock.unlink(missing_ok=True)


def stage_continuation(out: str | os.PathLike, source: str | os.PathLike, fingerprint: dict) -> Path:
    """Prepare `out`'s staging folder to continue the training of the finished run `source`.

    What an epoch ladder does (scripts/sweep.py --epochs 20 40 60): the 40-epoch rung takes
    up the 20-epoch rung's training instead of starting over. Its checkpoints (best.pt, then
    last.pt, each copied to a temporary name and renamed) go into `out`'s staging folder, and
    `begin_run(out, fingerprint, resume=True)` with `train_model(resume=True)` continue from
    there. train_model resumes exactly (weights, optimizer, every RNG, early stopping's
    count), so the rung is the run a separate training to its epochs would give: same
    weights, same metrics. `train_model` still refuses a `source` whose configuration differs
    in more than the epochs. A staging folder already there (an interrupted rung of ours) is
    replaced; `out` itself is not touched. Returns the staging folder.
    """
    import shutil
    out, source = _named(out), Path(source)
    last = source / "checkpoints" / "last.pt"
    if not last.is_file():
        raise FileNotFoundError(f"{source} holds no checkpoints/last.pt to continue from")
    work = out.parent / f".{out.name}.partial"
    lock = acquire_lock(out.parent / f".{out.name}.lock", f"output_dir {out}")
    try:
        _check_replaceable(work, "the staging folder")
        _remove_run(work)
        (work / "checkpoints").mkdir(parents=True)
        save_json({"written_by": "cpc_utils.stage_continuation", "output_dir": str(out)}, work / RUN_MARKER)
        save_json({"status": "staged", "continues": str(source), "output_dir": str(out), "fingerprint": fingerprint},
                  work / "run.json")
        for name in ("best.pt", "last.pt"):  # last.pt last: without it the staging folder is not resumed
            if (source / "checkpoints" / name).is_file():
                tmp = work / "checkpoints" / f".{name}.tmp"
                shutil.copyfile(source / "checkpoints" / name, tmp)
                os.replace(tmp, work / "checkpoints" / name)
    finally:
        lock.unlink(missing_ok=True)
    return work


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu",
                    remedy: str = "delete it, or start over with resume=False") -> dict:
    """torch.load(weights_only=True) with a one-line error that names the file and the `remedy`.

    Checkpoints travel (a Kaggle run's output copied back in), so one is read as tensors and
    plain types only: a pickled object in it (a payload, or a checkpoint of older code that
    pickled one) is refused before anything in it runs, as is a truncated or corrupt file.
    """
    import pickle
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only met something other than tensors and plain types
        what = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), type(e).__name__)
        raise RunBlocked(f"refusing checkpoint {path}: it holds Python objects, not only tensors and plain "
                           f"types ({what}), and loading it could run code; nothing in it was run; {remedy}") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, ... for a bad file
        raise RunBlocked(f"cannot read checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__} "
                           f"(truncated or corrupt); {remedy}") from e


def is_rescorable(out: str | os.PathLike, fingerprint: dict) -> list[str] | None:
    """The fingerprint fields in which the finished run in `out` differs from `fingerprint`, when
    they are all scoring (`RESCORE_CHANGES`): its weights can be scored again instead of
    trained again. None when there is no finished run there, nothing differs, or training does."""
    out = Path(out)
    try:
        old = json.loads((out / "metrics.json").read_text()).get("fingerprint")
    except (OSError, ValueError):
        return None
    if not (out / "model.pt").is_file() or not isinstance(old, dict):
        return None
    diff = fingerprint_diff(old, fingerprint)
    return diff if diff and set(diff) <= set(RESCORE_CHANGES) else None


def load_trained_weights(out: str | os.PathLike, model: torch.nn.Module, checkpoints: str | os.PathLike) -> dict:
    """Load the finished run in `out`'s trained weights (its model.pt, weights_only) into `model`,
    copy its training checkpoints to `checkpoints` (a longer run can still continue it), and
    return its training record: {"history", "train_wall_seconds"}."""
    import shutil
    out = Path(out)
    remedy = f"delete {out} to train the run again"
    bundle = load_checkpoint(out / "model.pt", remedy=remedy)  # tensors and plain types only: nothing in it runs
    try:
        model.load_state_dict(bundle["state_dict"])
    except (KeyError, TypeError, RuntimeError) as e:  # not a bundle, or weights of another architecture
        raise RunBlocked(f"cannot rescore {out}: its model.pt does not fit this model ({str(e).splitlines()[0]}); "
                         f"{remedy}") from e
    metrics = json.loads((out / "metrics.json").read_text())
    if (out / "checkpoints").is_dir() and _distributed()[0] == 0:
        shutil.copytree(out / "checkpoints", checkpoints, dirs_exist_ok=True)
    return {"history": metrics["history"], "train_wall_seconds": metrics.get("train_wall_seconds", 0.0)}
