r"""Run notebook 02 (CPC-AD) through papermill for every category x encoder.

    python scripts/sweep.py --data-root data/demo --run demo
    python scripts/sweep.py --data-root /data/mvtec --categories bottle cable --encoders resnet18v2 \
        --epochs 50 --run mvtec --param image_size=256 patch_size=64 stride=32 width=64

Each pair writes results/<run>/<category>/<encoder>/: the executed notebook, metrics.json and
the figures.

An epoch ladder, the study's experiment (class x encoder x training length):

    python scripts/sweep.py --data-root /data/mvtec --epochs 30 55 70 --seeds 0 1 2 --devices auto

trains each pair once, to the largest budget, and evaluates it at every one: the 55-epoch rung
continues the 30-epoch rung's training from its checkpoint (exact resume: the same weights and
metrics as a separate 55-epoch run with that seed), and each rung gets its own folder,
<category>/<encoder>[/seed<K>]/e<N>/ (with metrics.json recording `chosen_epoch`, the epoch
of the weights early stopping kept); only the longest rung keeps its checkpoints/ unless
--keep-checkpoints. --seeds 0 1 2 runs every pair once per seed, in seed<K>/. Notebook 03 reads
such a tree as the study's table.

results/ is relative to where the command runs (--results; on Kaggle under
/kaggle/working, as notebook 02 does), never the repository's folder unless the command runs
there: the code may be a read-only copy (a Kaggle dataset under /kaggle/input).

A pair is skipped only when its metrics.json records the same fingerprint
(parameters as they resolve, data files, code version: cu.cpcad_fingerprint) as this sweep asks for; with other
parameters it is run again (continuing from its checkpoints when only epochs or patience
grew), and the previous results stay in place until the new run has finished. An
interrupted pair continues from its last checkpoint. A failing pair (also one whose
metrics.json cannot be read, which is left as it is) is recorded in
results/<run>/failures.json (kept until that pair succeeds, also by sweeps over other pairs)
and the sweep goes on; a full disk stops it cleanly. A lock keeps two sweeps out of one run
folder. At the end cu.write_summary writes summary.md (parameters, the class x encoder
table, every run, the finished, failed and missing pairs), summary.csv, comparison.png (and
epochs.png when a pair was run for several epoch counts). Exits 1 if any pair failed or is
missing; `python -m cpc_utils summary results/<run>` rewrites the summary alone. These files
are listed in results/<run>/.cpc_utils_files as the sweep writes them: a file of yours under
one of their names stops the sweep, before any pair runs, and is kept.

Progress: each pair's epoch, losses, seconds per epoch and an estimate of the time left,
read from the progress.json its notebook writes every epoch, then one line with its result.
Ctrl-C (or SIGTERM) stops the sweep and its kernel; the same command resumes it.

Parallel and long sweeps: --devices runs one pair per device at once (auto: every GPU;
cpu,cpu: two pairs sharing the CPU cores); --shard I/N gives machine I of N its share of
the pairs, all writing into one results folder (a SLURM job array: --shard
$((SLURM_ARRAY_TASK_ID + 1))/$SLURM_ARRAY_TASK_COUNT); --time-budget 11h stops before 11 hours
at an epoch boundary, with checkpoints, so the next session resumes.

Defaults are the notebook's own parameters (its `parameters` cell): `make demo` runs every demo
category with them and resnet18v2.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # cpc_utils.py, when the package is not installed

NOTEBOOK = ROOT / "notebooks" / "02_cpc_anomaly_detection.ipynb"
KAGGLE_WORKING = Path("/kaggle/working")  # the folder a Kaggle session keeps; its inputs are read-only
ENCODERS = ("resnet18v2", "resnet50v2", "densenet")
MIN_PAIR_SECONDS = 120  # with --time-budget: less than this left, no new pair is started  # cu.ENCODERS, spelled out: --help must not import torch


def notebook_parameters(notebook: Path) -> dict:
    """The notebook's parameters and their defaults, read from its `parameters` cell."""
    import papermill
    return {name: ast.literal_eval(p["default"]) for name, p in papermill.inspect_notebook(str(notebook)).items()}


def parse_params(pairs: list[str], defaults: dict) -> dict:
    """`key=value` strings -> {key: value}. A value is a Python literal (3, 0.1, None, True) unless
    the notebook's default is a string, in which case it stays the raw text."""
    params = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--param takes key=value, got {pair!r}")
        if key not in defaults:
            raise SystemExit(f"unknown notebook parameter {key!r}; known: {', '.join(defaults)}")
        if isinstance(defaults[key], str):
            params[key] = text
        else:
            try:
                params[key] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                params[key] = text
    return params


def work_dir() -> Path:
    """Where relative paths (results/, the demo data) go: /kaggle/working on Kaggle, else the
    current directory; notebook 02's rule for its output_dir. Never the code's own folder unless
    the command runs there: on Kaggle that is a read-only dataset."""
    return KAGGLE_WORKING if KAGGLE_WORKING.is_dir() else Path()


def read_json(path: Path) -> dict:
    """A JSON object the project wrote; a truncated or corrupt file is ValueError naming it."""
    try:
        value = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, or bytes that are not text
        raise ValueError(f"cannot read {path}: {e} (truncated or corrupt)") from None
    if not isinstance(value, dict):
        raise ValueError(f"cannot read {path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_failures(path: Path) -> dict[str, dict]:
    """A sweep's failure record ({pair: {"category", "encoder", "error", ...}}); {} when there is
    none. A file the sweep did not write there, or not of that shape, is ValueError naming it:
    it is neither read as a record nor replaced by one."""
    import cpc_utils as cu
    if not path.exists() and not path.is_symlink():
        return {}
    try:
        cu.check_ours(path)
        record = read_json(path)
    except (FileExistsError, ValueError) as e:
        raise ValueError(f"{e}; a sweep keeps its failure record there") from None
    bad = next((k for k, v in record.items() if not (isinstance(v, dict) and isinstance(v.get("error"), (str, type(None))))), None)
    if bad is not None:
        raise ValueError(f"{path} is not a sweep's failure record (its entry {bad!r} has no error message); "
                         "delete it to start a new record")
    return record


def check_parameters(parameters: dict) -> str | None:
    """None, or the pipeline's own message for a parameter it would refuse (a ParameterError
    such as `epochs='ten': expected int, got str`): `cu.plan_run`, which reads and writes nothing."""
    import cpc_utils as cu
    try:
        cu.plan_run(cu.RunParameters(**parameters))
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def failed_notebook(out: Path) -> Path:
    """Where a failed pair's partly executed notebook is kept: beside the pair's folder, so a
    previous finished run inside it stays as it was."""
    return out.parent / f"{out.name}.failed.ipynb"


def run_pair(notebook: Path, out: Path, parameters: dict) -> None:
    """Execute the notebook (it writes `out` itself when it finishes), keeping the executed copy
    in `out` on success and beside it on failure.

    papermill runs in a worker thread so that Ctrl-C reaches this one (nbclient's own SIGINT
    handler only schedules a cleanup and the run goes on); the kernel, started in a session of
    its own, is then stopped here.
    """
    import papermill
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, error = out.parent / f".{out.name}.running.ipynb", []

    def execute():
        try:  # the kernel's log level: no "running over TCP without encryption" warning per pair
            papermill.execute_notebook(str(notebook), str(tmp), parameters=parameters, cwd=str(ROOT),
                                       progress_bar=False, kernel_name="python3",
                                       extra_arguments=["--IPKernelApp.log_level=CRITICAL"])
        except BaseException as e:
            error.append(e)

    worker = threading.Thread(target=execute, daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.5)
    except KeyboardInterrupt:
        stop_children()
        raise
    if error:
        if tmp.exists():  # keep the partly executed notebook, with its traceback, for reading
            keep_failed_notebook(tmp, failed_notebook(out))
        raise error[0]
    import cpc_utils as cu
    cu.record_run_files(out, [notebook.name])  # the run's own file from now on: replaced with the run
    tmp.replace(out / notebook.name)
    cu.remove_ours(failed_notebook(out))


def keep_failed_notebook(tmp: Path, keep: Path) -> None:
    """Move a failed pair's notebook `tmp` to `keep`, recorded as the sweep's; where a file of
    the user's has that name, it stays, and the notebook stays at `tmp` (said)."""
    import cpc_utils as cu
    try:
        cu.record_ours(keep)
        tmp.replace(keep)
    except (OSError, ValueError) as e:
        say(f"sweep: the failed notebook stays at {tmp}: {e}")


def interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def stop_children(timeout: float = 5.0) -> None:
    """Terminate this process's children (the running pair's kernel), then kill what is left."""
    import psutil
    children = psutil.Process().children(recursive=True)
    for child in children:
        child.terminate()
    for child in psutil.wait_procs(children, timeout=timeout)[1]:
        child.kill()


class Progress(threading.Thread):
    """Prints a running pair's progress from the progress.json its notebook writes each epoch
    (cu.train_model): on a terminal one line rewritten in place, else a line per tenth of the
    epochs, so logs stay short."""

    def __init__(self, out: Path, tag: str, interval: float = 2.0):
        super().__init__(daemon=True)
        self.file = out.parent / f".{out.name}.partial" / "checkpoints" / "progress.json"
        self.tag, self.interval, self.stop = tag, interval, threading.Event()
        self.tty = sys.stdout.isatty()
        self.shown = False

    def run(self) -> None:
        last = printed = None
        while not self.stop.wait(self.interval):
            try:
                p = json.loads(self.file.read_text())
            except (OSError, ValueError):  # not written yet (the notebook is loading data)
                continue
            if p["epoch"] == last:
                continue
            last, step = p["epoch"], max(1, p["epochs"] // 10)
            val = f" (validation {p['val_loss']:.3f})" if p.get("val_loss") is not None else ""
            left = p["seconds"] * (p["epochs"] - p["epoch"])
            line = (f"{self.tag}: epoch {p['epoch']}/{p['epochs']}, loss {p['train_loss']:.3f}{val}, "
                    f"{p['seconds']:.1f} s/epoch, " + (f"about {fmt_time(left)} of training left" if left
                                                        else "training done, scoring"))
            if self.tty:
                say(f"\r{line:<120}", end="")
                self.shown = True
            elif printed is None or p["epoch"] // step > printed // step or p["epoch"] == p["epochs"]:
                say(line)  # the first, then one per tenth of the epochs, and the last
                printed = p["epoch"]

    def finish(self) -> None:
        self.stop.set()
        self.join()
        if self.shown:
            say()


def pair_parameters(params: dict, root: Path, category: str, encoder: str, out: Path) -> dict:
    """The notebook's parameters for one pair: the sweep's, plus what the sweep sets itself."""
    return {**params, "data_root": str(root), "category": category, "encoder": encoder, "output_dir": str(out)}


def rung(run_dir: Path, root: Path, params: dict, category: str, encoder: str, seed: int | None,
         epochs: int | None, ladder: bool) -> tuple[str, Path, dict]:
    """(key, folder, notebook parameters) of one run: <category>/<encoder>[/seed<K>][/e<N>], the
    seed folder with --seeds, the epochs folder in a ladder (several --epochs)."""
    parts = [category, encoder] + ([f"seed{seed}"] if seed is not None else []) + ([f"e{epochs}"] if ladder else [])
    out = run_dir.joinpath(*parts)
    pair = pair_parameters(params, root, category, encoder, out)
    pair.update({k: v for k, v in (("seed", seed), ("epochs", epochs)) if v is not None})
    return "/".join(parts), out, pair


def pair_state(out: Path, fingerprint: dict) -> tuple[str, list[str]]:
    """("finished" | "changed" | "partial" | "new", fields that differ from `fingerprint`).

    "changed": finished with another fingerprint (an older run's parameters, data or code);
    "partial": an unfinished run in the staging folder (cu.begin_run), continued if its
    fingerprint differs at most in what a resumed run may change.
    A metrics.json or run.json that cannot be read (truncated, corrupt) is ValueError naming it.
    """
    import cpc_utils as cu
    metrics, staged = out / "metrics.json", out.parent / f".{out.name}.partial" / "run.json"
    if metrics.exists():
        diff = cu.fingerprint_diff(read_json(metrics).get("fingerprint"), fingerprint)
        return ("changed" if diff else "finished"), diff
    if staged.exists():
        return "partial", cu.fingerprint_diff(read_json(staged).get("fingerprint"), fingerprint)
    return "new", []


def trained_epochs(out: Path, state: str) -> int:
    """Epochs a pair's earlier run trained: its metrics.json's ("changed"), else its staged
    progress.json's ("partial"); 0 when unknown. A run is continued only up to more epochs."""
    try:
        if state == "changed":
            return int(read_json(out / "metrics.json").get("epochs_trained", 0))
        if state == "partial":
            return int(read_json(out.parent / f".{out.name}.partial" / "checkpoints" / "progress.json").get("epoch", 0))
    except (OSError, ValueError, TypeError):  # no progress yet: the run resumes nothing, or begins again
        pass
    return 0


def prune_checkpoints(out: Path) -> None:
    """Delete a finished rung's training state (last.pt, best.pt, progress.json: what
    cu.train_model writes), and its checkpoints/ folder if that leaves it empty; anything else
    in it stays. model.pt, all that scoring needs, is outside."""
    for name in ("last.pt", "best.pt", "progress.json"):
        (out / "checkpoints" / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty (something not ours), or already gone
        (out / "checkpoints").rmdir()


def error_message(e: BaseException) -> str:
    """The notebook's own exception (papermill wraps it), else the exception itself."""
    if type(e).__name__ == "PapermillExecutionError":
        return f"{e.ename}: {e.evalue}"
    return f"{type(e).__name__}: {e}"


_PRINT_LOCK = threading.Lock()


def say(*args, **kwargs) -> None:
    """print, flushed, one whole line at a time: with --devices, pairs and their progress print
    from threads of their own, and print writes the text and its newline separately, so two
    unlocked lines could run together."""
    with _PRINT_LOCK:
        print(*args, **kwargs, flush=True)


def fmt_time(seconds: float) -> str:
    """12 s, 3 min 05 s, 1 h 02 min: no more precision than a person waiting needs."""
    s = int(round(seconds))
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60:02d} s" if s < 3600 else f"{s // 3600} h {s % 3600 // 60:02d} min"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--data-root", default="", help="MVTec AD root (default: found as cpc_utils does, else the demo data)")
    parser.add_argument("--categories", nargs="+", help="default: every category under the data root")
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=ENCODERS, metavar="ENCODER",
                        help="%(choices)s; default: all")
    parser.add_argument("--epochs", type=int, nargs="+", metavar="N", help="default: the notebook's; several "
                        "(e.g. 30 55 70): an epoch ladder, each pair trained once and evaluated at each, in e<N>/")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="K", help="one run per seed, in seed<K>/ "
                        "(default: the notebook's seed, no seed folder)")
    parser.add_argument("--keep-checkpoints", action="store_true", help="in a ladder, keep every rung's "
                        "checkpoints/ (default: only the longest rung's, which a longer ladder continues; "
                        "a shorter rung's model.pt is all that scoring needs)")
    parser.add_argument("--run", default="sweep", help="results go to <results>/<run>/ (default: %(default)s)")
    parser.add_argument("--results", default="results", help="a relative path is under the current directory, "
                        "on Kaggle under /kaggle/working (default: %(default)s)")
    parser.add_argument("--param", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="any other notebook parameter, e.g. width=32 lr=1e-3")
    parser.add_argument("--devices", metavar="LIST", help="run one pair per device at once: auto (every CUDA "
                        "device, else the CPU) or a list such as cuda:0,cuda:1 or cpu,cpu (default: one at a time "
                        "on the notebook's device)")
    parser.add_argument("--shard", metavar="I/N", help="run only share I of N (1 <= I <= N) of the pairs, e.g. one "
                        "machine of a SLURM job array; all shards can write into one results folder")
    parser.add_argument("--time-budget", metavar="DURATION", help="stop before this much time has passed "
                        "(e.g. 11h on a 12-hour Kaggle session), at an epoch boundary with a checkpoint; "
                        "the same command resumes")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the arguments, list each pair and what a run would do with it, and stop")
    parser.add_argument("--notebook", default=str(NOTEBOOK), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import cpc_utils as cu  # torch: imported after the arguments are parsed, so --help is instant
    signal.signal(signal.SIGTERM, interrupted)  # a scheduler's stop (SLURM's time limit) ends like Ctrl-C
    notebook = Path(args.notebook)
    defaults = notebook_parameters(notebook)
    params = parse_params(args.param, defaults)
    for key in ("category", "encoder", "output_dir", "data_root"):
        if key in params:
            raise SystemExit(f"--param {key}=... is set by the sweep itself; use its own option")
    for key, option in (("epochs", "--epochs"), ("seed", "--seeds")):
        if key in params and getattr(args, option[2:]):
            raise SystemExit(f"sweep: give {key} once: --param {key}=... or {option}, not both")
    if any(n < 1 for n in args.epochs or ()):
        raise SystemExit(f"sweep: --epochs {' '.join(map(str, args.epochs))}: expected whole numbers of at least 1")
    rungs = sorted(set(args.epochs)) if args.epochs else [None]  # None: the notebook's (or --param's) epochs
    seeds = list(dict.fromkeys(args.seeds)) if args.seeds else [None]
    ladder = len(rungs) > 1
    if len(rungs) == 1 and rungs[0] is not None:
        params["epochs"] = rungs[0]
    resume = params.pop("resume", True)  # by default an interrupted pair continues from its last checkpoint
    if not isinstance(resume, bool):  # "no" would be truthy: the pairs would resume against the user's word
        raise SystemExit(f"sweep: --param resume={resume!r}: expected True or False")
    try:
        root = cu.resolve_data_root(args.data_root, work_dir() / "data" / "demo").resolve()
    except (OSError, ValueError) as e:  # no dataset there, or a category folder given as the root: said, no traceback
        raise SystemExit(f"sweep: --data-root {args.data_root or '(none)'}: {e}") from None
    available = cu.list_categories(root)
    categories = list(dict.fromkeys(args.categories or available))  # named twice: one run per folder, not two
    args.encoders = list(dict.fromkeys(args.encoders))
    unknown = [c for c in categories if c not in available]
    if unknown:  # before anything runs: a typo must not cost a sweep
        raise SystemExit(f"sweep: no category {', '.join(map(repr, unknown))} under {root}; "
                         f"available: {', '.join(available)}")
    if args.run in ("", ".", "..") or Path(args.run).name != args.run:  # "" would make <results> itself the run
        raise SystemExit(f"sweep: --run {args.run!r}: expected a folder name (results go to <results>/<run>/)")
    run_dir = (work_dir() / args.results).resolve() / args.run
    blocking = next((p for p in (run_dir, *run_dir.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():  # found now, not when the first pair writes
        raise SystemExit(f"sweep: results folder {run_dir}: {blocking} is a file, not a folder; choose another "
                         "--results or --run")
    pairs = [(c, e, k) for c in categories for e in args.encoders for k in seeds]
    shard = parse_shard(args.shard)
    if shard:  # a deterministic share: every N-th pair from the I-th, the same on every machine
        pairs = pairs[shard[0] - 1::shard[1]]
    chains = [[rung(run_dir, root, {**defaults, **params}, c, e, k, n, ladder) for n in rungs] for c, e, k in pairs]
    try:
        budget = cu.parse_duration(args.time_budget)
    except ValueError as e:
        raise SystemExit(f"sweep: --time-budget {args.time_budget!r}: {str(e).split(': ', 1)[1]}") from None
    devices = parse_devices(args.devices)
    for device in devices or ():  # cuda:7 on a 2-GPU machine: said now, not by every pair failing
        try:
            cu.resolve_device(device)
        except ValueError as e:
            raise SystemExit(f"sweep: --devices {args.devices}: {e}") from None
    shown = {k: v for k, v in {**defaults, **params}.items() if k not in ("category", "encoder", "output_dir", "data_root", "resume")
             and not (k == "epochs" and ladder) and not (k == "seed" and args.seeds)}
    axes = (f" x {len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))})" if args.seeds else "") + (
        f" x an epoch ladder ({', '.join(map(str, rungs))}: each pair trained once, to {rungs[-1]})" if ladder else "")
    say(f"sweep {args.run}: {len(categories)} categories x {len(args.encoders)} encoders{axes} from {root}\n"
          f"parameters: {', '.join(f'{k}={v!r}' for k, v in shown.items())}\nresults: {run_dir}")

    rerun = shlex.join([sys.executable, str(Path(__file__).resolve()), *(sys.argv[1:] if argv is None else argv)])

    suffix = f".shard{shard[0]}of{shard[1]}" if shard else ""  # shards share the folder, not these files
    try:  # what the sweep writes beside the runs must not be a user's file: found now, not after the runs
        cu.check_summary_files(run_dir)
        read_failures(run_dir / f"failures{suffix}.json")
    except (OSError, ValueError) as e:
        raise SystemExit(f"sweep: {e}") from None

    if args.dry_run:  # each run's parameters checked as the pipeline checks them, nothing written
        bad, total = 0, sum(map(len, chains))
        for n, (key, out, pair) in enumerate((r for chain in chains for r in chain), 1):
            problem = check_parameters({**pair, "resume": resume})
            try:
                state, diff = pair_state(out, cu.cpcad_fingerprint(pair, root, pair["category"]))
            except ValueError as e:
                problem = problem or str(e)
            if problem:
                bad += 1
                say(f"[{n}/{total}] {key}: would fail: {problem}")
                continue
            first = out.name == f"e{rungs[0]}" or not ladder
            what = {"finished": "skip (finished with these parameters)",
                    "new": "run" if first or not resume else "continue the previous rung's training",
                    "changed": f"rescore its trained weights (finished with other {', '.join(diff)})"
                               if set(diff) <= set(cu.RESCORE_CHANGES) else
                               f"run again (finished with other {', '.join(diff)})",
                    "partial": "continue (interrupted)" if not diff else f"run (interrupted with other {', '.join(diff)})"}
            say(f"[{n}/{total}] {key}: would {what[state]}")
        return 1 if bad else 0
    lock = run_dir / f".sweep{suffix}.lock"
    try:
        cu.acquire_lock(lock)
    except (RuntimeError, OSError) as e:  # another sweep's lock; a read-only or refused results folder
        raise SystemExit(f"sweep: {e}") from None
    try:
        return sweep(notebook, run_dir, root, chains, {**defaults, **params}, resume,
                     run_dir / f"failures{suffix}.json", budget, devices, rerun, args.keep_checkpoints)
    except KeyboardInterrupt:
        say("\nsweep: interrupted. Run the same command again to resume (finished pairs are skipped, "
              f"an interrupted one continues from its last checkpoint):\n  {rerun}")
        return 130
    finally:
        lock.unlink(missing_ok=True)


def parse_devices(text: str | None) -> list[str] | None:
    """"auto" -> every CUDA device (else ["cpu"]); "cuda:0,cuda:1" -> that list; None -> None.

    Several CPU entries share the cores: each kernel is given an equal share of threads
    (OMP_NUM_THREADS, unless set), so two pairs at once do not fight over every core.
    """
    if text is None:
        return None
    if text == "auto":
        import torch
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
    else:
        devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices or any(not (d == "cpu" or d == "mps" or d.startswith("cuda")) for d in devices):
        raise SystemExit(f"--devices {text!r}: expected auto or a list of cpu, mps, cuda, cuda:N")
    n_cpu = sum(d == "cpu" for d in devices)
    if n_cpu > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n_cpu))  # inherited by the kernels
    return devices


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """"2/4" -> (2, 4); None -> None."""
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SystemExit(f"--shard takes I/N, e.g. 1/4, got {text!r}") from None
    if not 1 <= i <= n:
        raise SystemExit(f"--shard {text}: need 1 <= I <= N")
    return i, n


def sweep(notebook: Path, run_dir: Path, root: Path, chains: list[list[tuple[str, Path, dict]]], params: dict,
          resume: bool, failures_file: Path, budget: float | None = None, devices: list[str] | None = None,
          rerun: str = "the same command", keep_checkpoints: bool = False) -> int:
    """Run every run not finished with these parameters; write the summary.

    `chains`: per (category, encoder, seed), its runs as (key, folder, notebook parameters),
    one per epoch budget of a ladder in ascending order (`rung`); a chain's runs go in order,
    each later one continuing the training of the one before (cu.stage_continuation). With
    several `devices`, as many chains run at once, each pinned to its own device. `rerun`:
    the command that resumes this sweep, shell-quoted, printed when it stops early. Once a
    rung has finished, the checkpoints/ of the rung it continued are deleted (they are
    training state, and the longer rung now holds it; model.pt stays) unless `keep_checkpoints`:
    on Kaggle's 20 GB a ladder would otherwise keep three copies of every pair's training state.
    """
    import cpc_utils as cu
    try:
        failures = read_failures(failures_file)
    except (OSError, ValueError) as e:
        say(f"sweep: {e}")
        return 2
    unreadable = set()  # metrics.json files that cannot be read: their runs fail, the summary leaves them out
    total = sum(map(len, chains))
    t_start, status, counts = time.perf_counter(), {}, {"done": 0, "skipped": 0}
    guard, stop = threading.Lock(), threading.Event()  # shared state of the workers; stop: start no new run

    def fail(key: str, out: Path, run_params: dict, error: str, notebook_copy: Path | None) -> None:
        with guard:
            failures[key] = {"category": run_params["category"], "encoder": run_params["encoder"], "error": error,
                             "output_dir": str(out), "notebook": str(notebook_copy) if notebook_copy else None}
            status[key] = "failed"

    def continued_from(out: Path, state: str, continues: bool, before: Path | None, fingerprint: dict) -> Path | None:
        """The previous rung whose training this one takes up, when that is further along than
        its own (`continues`: an interrupted or earlier run of fewer epochs) and differs only in epochs."""
        if not resume or before is None:
            return None
        try:
            previous = read_json(before / "metrics.json")
        except (OSError, ValueError):
            return None
        if set(cu.fingerprint_diff(previous.get("fingerprint"), fingerprint)) - {"parameters.epochs"}:
            return None
        if continues and trained_epochs(out, state) >= int(previous.get("epochs_trained", 0)):
            return None
        return before if (before / "checkpoints" / "last.pt").is_file() else None

    def run(n: int, key: str, out: Path, run_params: dict, device: str | None, before: Path | None) -> str:
        """One run; "finished", "failed" or "stopped" (the sweep stops: a time budget, a full disk)."""
        tag = f"[{n}/{total}] {key}"
        run_params = {**run_params, **({"device": device} if device else {})}
        try:
            fingerprint = cu.cpcad_fingerprint(run_params, root, run_params["category"])
            state, diff = pair_state(out, fingerprint)
        except ValueError as e:  # a damaged result is not replaced (nor its run repeated) without the user's say
            with guard:
                unreadable.add(out / "metrics.json")
            fail(key, out, run_params, f"{e}; delete that file to run this pair again", None)
            say(f"{tag}: FAILED: {failures[key]['error']}")
            return "failed"
        if state == "finished":
            with guard:
                counts["skipped"] += 1
                status[key] = "finished"
                failures.pop(key, None)
            say(f"{tag}: finished before with these parameters, skipped")
            return "finished"
        rescores = state == "changed" and set(diff) <= set(cu.RESCORE_CHANGES)  # run_cpcad rescores its weights
        continues = (resume and state in ("partial", "changed") and set(diff) <= set(cu.RESUMABLE_CHANGES)
                     and trained_epochs(out, state) <= run_params["epochs"] and not rescores)  # fewer: anew
        why = {"changed": f"finished before with other {', '.join(diff)}: rescoring its trained weights" if rescores
                          else f"finished before with other {', '.join(diff)}: running again"
                          + (" (continuing its training)" if continues else " (its results stay until this run finishes)"),
               "partial": "continuing an interrupted run" if continues else
                          f"an interrupted run with other {', '.join(diff)} is discarded; running",
               "new": "running"}[state]
        left = None if budget is None else budget - (time.perf_counter() - t_start)
        if left is not None and left < MIN_PAIR_SECONDS:
            say(f"sweep: the time budget leaves {fmt_time(max(left, 0))}, too little to start {key}; stopping. "
                  f"Run the same command again (in the next session) to resume:\n  {rerun}")
            return "stopped"
        source = continued_from(out, state, continues, before, fingerprint)
        if source is not None:  # a ladder's rung: take up the previous rung's training, do not repeat it
            try:
                cu.stage_continuation(out, source, fingerprint)
            except (OSError, cu.RunBlocked) as e:
                fail(key, out, run_params, f"{type(e).__name__}: {e}", None)
                say(f"{tag}: FAILED: {failures[key]['error']}")
                return "failed"
            why, continues = f"continuing the training of {source.name} to {run_params['epochs']} epochs", True
        say(f"{tag}: {why}{f' on {device}' if device else ''} ...")
        if left is not None and "time_budget" in params:
            run_params["time_budget"] = left  # training stops at an epoch boundary before it runs out
        t0, progress = time.perf_counter(), Progress(out, tag)
        progress.start()
        try:
            run_pair(notebook, out, {**run_params, "resume": bool(continues or (resume and state == "new"))})
        except Exception as e:  # one bad run must not stop the sweep: record it and go on
            progress.finish()
            message = error_message(e)
            if message.startswith("KeyboardInterrupt"):  # Ctrl-C reached the kernel first
                raise KeyboardInterrupt from e
            if message.startswith("TimeBudgetReached"):  # not a failure: resumable
                say(f"{tag}: {message}\nsweep: time budget reached; stopping. Run the same command "
                      f"again (in the next session) to resume:\n  {rerun}")
                return "stopped"
            fail(key, out, run_params, message, failed_notebook(out))
            say(f"{tag}: FAILED after {fmt_time(time.perf_counter() - t0)}: {message}")
            if "No space left on device" in message or "disk is full" in message:
                say("sweep: the disk is full; stopping. Free some space and run the same command to resume:"
                    f"\n  {rerun}")
                return "stopped"
            return "failed"
        finally:
            progress.finish()
        m = json.loads((out / "metrics.json").read_text())
        with guard:
            counts["done"] += 1
            status[key] = "finished"
            failures.pop(key, None)
        learned = m.get("learning", {}).get("status", "ok")
        chosen = m.get("chosen_epoch")
        say(f"{tag}: done in {fmt_time(time.perf_counter() - t0)} (elapsed {fmt_time(time.perf_counter() - t_start)}): "
              f"{m.get('detector', 'cpcad')}: image AUROC ({m.get('image_reduce', 'mean')}) {m['image_auroc']:.3f} "
              f"(baseline {m['baseline_image_auroc']:.3f}), pixel AUROC {m['pixel_auroc']:.3f} "
              f"(baseline {m['baseline_pixel_auroc']:.3f}), {m['epochs_trained']} epochs"
              + (f" (weights of epoch {chosen})" if chosen is not None and chosen != m["epochs_trained"] else "")
              + ("" if learned == "ok" else f"; WARNING {m['learning']['message']}"))
        return "finished"

    def run_chain(first: int, chain: list[tuple[str, Path, dict]], device: str | None) -> None:
        before = None
        for i, (key, out, run_params) in enumerate(chain):
            if stop.is_set():
                return
            result = run(first + i, key, out, run_params, device, before)
            if result == "stopped":
                stop.set()
                return
            if result == "failed":  # the longer rungs would continue it: not run, said why
                for j, (later, later_out, later_params) in enumerate(chain[i + 1:], first + i + 1):
                    fail(later, later_out, later_params, f"not run: {key}, the shorter rung it continues, failed", None)
                    say(f"[{j}/{total}] {later}: not run ({key} failed)")
                return
            if before is not None and not keep_checkpoints and cu.is_run_folder(before):
                prune_checkpoints(before)  # out continued its training, or finished before
            before = out

    starts = [1 + sum(map(len, chains[:i])) for i in range(len(chains))]
    todo = list(zip(starts, chains))
    def worker(device: str | None) -> None:
        while not stop.is_set():
            with guard:
                if not todo:
                    return
                first, chain = todo.pop(0)
            run_chain(first, chain, device)

    if not devices or len(devices) == 1:
        worker(devices[0] if devices else None)
    else:  # one thread per device; Ctrl-C arrives in this (main) thread, which then stops the kernels
        threads = [threading.Thread(target=worker, args=(d,), daemon=True) for d in devices]
        for t in threads:
            t.start()
        try:
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(0.5)
        except KeyboardInterrupt:
            stop.set()
            stop_children()
            raise
    done, skipped = counts["done"], counts["skipped"]
    for chain in chains:
        for key, _, _ in chain:
            status.setdefault(key, "missing")  # not reached: the sweep stopped early
    for key in failures:
        status.setdefault(key, "failed")  # failed in an earlier sweep and not run since

    try:
        if failures:
            cu.save_json_ours(failures, failures_file)
        else:
            cu.remove_ours(failures_file)
    except (OSError, ValueError) as e:
        say(f"sweep: cannot record the failures: {e}")
        return 2
    missing = [k for k, v in status.items() if v == "missing"]
    say(f"\n{done} run, {skipped} skipped, {sum(v == 'failed' for v in status.values())} failed, "
          f"{len(missing)} missing in {fmt_time(time.perf_counter() - t_start)}")
    if any(p not in unreadable for p in run_dir.rglob("metrics.json")):
        try:  # with shards: every shard's failures, so the summary covers the whole folder
            every_failure = {k: v for f in sorted(run_dir.glob("failures*.json")) for k, v in read_failures(f).items()}
            cu.write_summary(run_dir, status, every_failure, unreadable)
        except (OSError, ValueError) as e:
            say(f"sweep: cannot write the summary: {e}")
            return 2
        say((run_dir / "summary.md").read_text())
        say(f"results in {run_dir} (summary.md, summary.csv, comparison.png, <category>/<encoder>/)")
    if failures:
        say(f"failures recorded in {failures_file}:")
        for pair, f in failures.items():
            say(f"  {pair}: {f['error'].splitlines()[0] if f['error'] else ''}")
    return 1 if failures or missing else 0


if __name__ == "__main__":
    sys.exit(main())
