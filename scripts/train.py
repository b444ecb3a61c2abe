"""Train and evaluate CPC-AD on one category from the command line: notebook 02 as a script,
also under torchrun (DistributedDataParallel, one process per GPU or CPU share).

    python scripts/train.py --category brick --epochs 40 --output_dir results/train/brick
    torchrun --nproc_per_node 2 scripts/train.py --category bottle --data_root /data/mvtec_ad \\
        --image_size 768 --subimage_size 256 --subimage_stride 128 --patch_size 64 --stride 32 --width 64
    torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint HOST:29500 scripts/train.py ...

Every parameter of notebook 02 is an option spelled as in the notebook (`--name value`, values
as Python literals where the default is not a string: --width 32, --lr 1e-3, --detector None).
The script runs the notebook's own code cells in order (one source of truth), so it writes
the same files into --output_dir: metrics.json, model.pt, the figures and the checkpoints.
Under torchrun every process trains on its share of each batch (cu.train_model); rank 0
alone writes files and, after training, scores and evaluates while the others exit.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "02_cpc_anomaly_detection.ipynb"


def notebook_cells(path: Path) -> tuple[str, list[str]]:
    """(the parameters cell, the other code cells), IPython magics dropped."""
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    def source(c):
        return "\n".join(line for line in "".join(c["source"]).splitlines() if not line.lstrip().startswith("%"))
    params = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(params) != 1:
        raise SystemExit(f"{path}: expected one cell tagged 'parameters'")
    return source(params[0]), [source(c) for c in cells if c is not params[0]]


def parse_args(defaults: dict, argv: list[str] | None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    for name, default in defaults.items():
        parser.add_argument(f"--{name}", default=default, metavar="VALUE",
                            type=str if isinstance(default, str) else _literal, help=f"default: {default!r}")
    return vars(parser.parse_args(argv))


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # e.g. a device name; the notebook's own checks name what is wrong


def rerun_command(argv: list[str] | None) -> str:
    """This command, quoted for a shell (paths with spaces), continuing from its checkpoint."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join([sys.executable, str(Path(__file__).resolve()), *args, "--resume", "True"])


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")
    params_source, cells = notebook_cells(NOTEBOOK)
    defaults: dict = {}
    exec(params_source, {}, defaults)
    values = parse_args(defaults, argv)
    for name in ("data_root", "output_dir"):  # relative to where the command runs, not the repository
        if values[name] and not Path(values[name]).is_absolute():
            values[name] = str(Path(values[name]).resolve())
    sys.path.insert(0, str(ROOT))
    import cpc_utils as cu
    rank, world = cu.init_distributed()
    # no chdir to the repository: the defaults (results/notebook02/..., the demo data) are relative
    # to where the command runs, as for the notebook under papermill; the code's folder may be read-only
    namespace: dict = {"__name__": "__notebook__", **values}
    quiet = open(os.devnull, "w") if rank else None  # rank 0 speaks for everyone
    with contextlib.redirect_stdout(quiet) if quiet else contextlib.nullcontext():
        for source in cells:
            try:
                exec(compile(source, str(NOTEBOOK), "exec"), namespace)
            except cu.TimeBudgetReached as e:  # not a failure: the same command with --resume True continues
                raise SystemExit(f"train.py: TimeBudgetReached: {e}: {rerun_command(argv)}") from None
            except KeyboardInterrupt:
                raise SystemExit(f"train.py: interrupted; to continue from the last checkpoint: "
                                 f"{rerun_command(argv)}") from None
            except (OSError, ValueError, FloatingPointError, cu.RunBlocked) as e:
                # bad input (an output_dir that is not a run folder), a data error, a full disk or a
                # read-only folder (cu.save_atomic names the file), divergence, a folder locked by
                # another run, a checkpoint that cannot be read
                raise SystemExit(f"train.py: {type(e).__name__}: {e}") from None
            if rank and "cu.train_model(" in source:
                break  # training done: scoring, evaluation and files are rank 0's
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
