"""Train and evaluate CPC-AD on one category from the command line: notebook 02 as a script,
also under torchrun (DistributedDataParallel, one process per GPU or CPU share).

    python scripts/train.py --category brick --epochs 40 --output_dir results/train/brick
    torchrun --nproc_per_node 2 scripts/train.py --category bottle --data_root /data/mvtec_ad \\
        --image_size 768 --subimage_size 256 --subimage_stride 128 --patch_size 64 --stride 32 --width 64
    torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint HOST:29500 scripts/train.py ...

Every parameter of notebook 02 (`cu.RunParameters`) is an option spelled as in the notebook
(`--name value`, values as Python literals where the default is not a string: --width 32,
--lr 1e-3, --detector None). The script calls the notebook's own pipeline, `cu.run_cpcad`, so it
writes the same files into --output_dir: metrics.json, model.pt, the figures and the checkpoints.
Under torchrun every process trains on its share of each batch (cu.train_model); rank 0
alone writes files and, after training, scores and evaluates while the others exit.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import os
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parameter_defaults() -> dict:
    """Notebook 02's parameters and their defaults (`cu.RunParameters`)."""
    import cpc_utils as cu
    return {f.name: f.default for f in dataclasses.fields(cu.RunParameters)}


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
        return text  # e.g. a device name; the parameter checks name what is wrong


def rerun_command(argv: list[str] | None) -> str:
    """This command, quoted for a shell (paths with spaces), continuing from its checkpoint."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join([sys.executable, str(Path(__file__).resolve()), *args, "--resume", "True"])


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MPLBACKEND", "Agg")
    sys.path.insert(0, str(ROOT))  # cpc_utils.py, when the package is not installed
    import cpc_utils as cu
    values = parse_args(parameter_defaults(), argv)
    for name in ("data_root", "output_dir"):  # relative to where the command runs, not the repository
        if values[name] and not Path(values[name]).is_absolute():
            values[name] = str(Path(values[name]).resolve())
    rank, world = cu.init_distributed()
    # no chdir to the repository: the defaults (results/notebook02/..., the demo data) are relative
    # to where the command runs, as for the notebook under papermill; the code's folder may be read-only
    quiet = open(os.devnull, "w") if rank else None  # rank 0 speaks for everyone
    try:
        with contextlib.redirect_stdout(quiet) if quiet else contextlib.nullcontext():
            cu.run_cpcad(**values)
    except cu.TimeBudgetReached as e:  # not a failure: the same command with --resume True continues
        raise SystemExit(f"train.py: TimeBudgetReached: {e}: {rerun_command(argv)}") from None
    except KeyboardInterrupt:
        raise SystemExit(f"train.py: interrupted; to continue from the last checkpoint: "
                         f"{rerun_command(argv)}") from None
    except (OSError, ValueError, TypeError, FloatingPointError, cu.RunBlocked) as e:
        # bad input (an output_dir that is not a run folder, a value of the wrong type), a data
        # error, a full disk or a read-only folder (cu.save_atomic names the file), divergence, a
        # folder locked by another run, a checkpoint that cannot be read
        raise SystemExit(f"train.py: {type(e).__name__}: {e}") from None
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
