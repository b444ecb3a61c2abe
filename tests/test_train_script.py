"""scripts/train.py: notebook 02 as a command, with or without torchrun (2 gloo processes on CPU)."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import cpc_utils as cu

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--image_size", "64", "--width", "8", "--epochs", "3", "--test_negatives", "128", "--category", "brick",
        "--val_fraction", "0.5"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return cu.make_demo_dataset(tmp_path_factory.mktemp("train") / "data", ["brick"], n_train=16, n_test_good=2,
                                n_per_defect=1, image_size=64)


@pytest.mark.parametrize("processes", [1, 2])
def test_train_script_writes_what_the_notebook_writes(processes, root, tmp_path):
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    out = tmp_path / "out"
    proc = subprocess.run([*launcher, str(ROOT / "scripts" / "train.py"), "--data_root", str(root), *TINY,
                           "--output_dir", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["category"] == "brick" and m["epochs_trained"] == 3 and m["config"]["model"]["width"] == 8
    assert {"model.pt", "roc.png", "heatmaps.png", "checkpoints"} <= {p.name for p in out.iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder or lock left
    assert proc.stdout.count("wrote ") == 1  # one process speaks


def test_train_script_help_and_bad_values(tmp_path):
    help_ = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--help"], capture_output=True,
                           text=True, timeout=60)
    assert help_.returncode == 0 and "--category VALUE" in help_.stdout and "torchrun" in help_.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--epochs", "0"], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode != 0 and bad.stderr.strip() == "train.py: ParameterError: epochs=0: must be >= 1"


def test_train_script_refuses_a_data_folder_as_output_dir_before_training(root, tmp_path):
    """--output_dir naming the category's own data folder: one line, exit 1, the data untouched."""
    out = root / "brick"
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--data_root", str(root), *TINY,
                           "--output_dir", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"})
    assert proc.returncode == 1 and proc.stderr.strip() == (
        f"train.py: FileExistsError: output_dir {out} is not empty and not a run folder of cpc_utils (it holds "
        ".cpc_utils_demo, ground_truth/, test/, train/); a run replaces only an earlier run's folder: choose a new "
        "or empty output_dir")
    assert " epochs in " not in proc.stdout  # stopped before training (the train cell prints "N epochs in T s")
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert not list(root.glob(".brick*"))  # no staging folder or lock


def train(root: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--data_root", str(root), *TINY, *args],
                          capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"})


def test_a_diverging_run_is_one_line_naming_the_lr(root, tmp_path):
    proc = train(root, tmp_path, "--epochs", "1", "--lr", "1e308", "--output_dir", str(tmp_path / "out"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]  # after tqdm's progress lines
    assert message.startswith("train.py: FloatingPointError: the "), message
    assert "diverged with lr=1e+308" in message and "try a lower lr" in message
    run = json.loads((tmp_path / ".out.partial" / "run.json").read_text())  # issue 28.10: said, and unlocked
    assert run["status"] == "failed" and run["error"].startswith("FloatingPointError: the ")
    assert not (tmp_path / ".out.lock").exists()


def test_a_folder_that_only_looks_like_a_run_is_kept(root, tmp_path):
    """Issue 28.1, as reported: myexp/ holds the user's own metrics.json and photo.png; the run
    stops in one line before training, naming them, and both files stay."""
    myexp = tmp_path / "myexp"
    myexp.mkdir()
    (myexp / "metrics.json").write_text('{"accuracy": 0.9}')
    (myexp / "photo.png").write_bytes(b"my photo")
    proc = train(root, tmp_path, "--output_dir", str(myexp))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().startswith(f"train.py: FileExistsError: output_dir {myexp} is not empty and not a "
                                          "run folder of cpc_utils (it holds metrics.json, photo.png)")
    assert sorted(p.name for p in myexp.iterdir()) == ["metrics.json", "photo.png"]
    assert (myexp / "photo.png").read_bytes() == b"my photo"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["myexp"]  # no staging folder or lock left


def test_a_category_folder_as_data_root_says_what_was_meant(root, tmp_path):
    """Issue 28.8: --data_root naming the category's own folder: one line with the options meant."""
    proc = train(root / "brick", tmp_path, "--output_dir", str(tmp_path / "out"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"did you mean data_root={str(root)!r} and category='brick'" in proc.stderr
    assert f"scripts/train.py --data_root {root} --category brick)?" in proc.stderr


def test_a_stopped_run_prints_the_command_that_continues_it_quoted(root, tmp_path):
    """A time budget stops training after epoch 1; the command printed resumes it, with the
    output path (which has a space) as one word."""
    out = tmp_path / "my results" / "brick"
    proc = train(root, tmp_path, "--time_budget", "0.001", "--output_dir", str(out))
    assert proc.returncode == 1, proc.stderr[-3000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("train.py: TimeBudgetReached: stopped after epoch 1 of 3"), proc.stderr[-3000:]
    words = shlex.split(message.split("resume=True to continue: ", 1)[1])
    assert words[-2:] == ["--resume", "True"] and str(out) in words
    assert words[:2] == [sys.executable, str(ROOT / "scripts" / "train.py")]


def test_default_output_goes_under_the_working_directory(root, tmp_path):
    """With no --output_dir the run writes results/notebook02/... where the command runs (as the
    notebook does under papermill), never into the repository it was started from."""
    proc = train(root, tmp_path, "--epochs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "results" / "notebook02" / "brick" / "resnet18v2" / "metrics.json").exists()


def test_a_grid_too_small_for_pred_steps_stops_before_the_data_is_read(tmp_path):
    """The check runs in the configuration step: the missing data root is never reached."""
    proc = train(tmp_path / "no such data", tmp_path, "--pred_steps", "20")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().startswith("train.py: ParameterError: a 7x7 grid leaves no context for pred_steps=20"), \
        proc.stderr


@pytest.mark.parametrize("case", ["locked", "truncated checkpoint", "unwritable"])
def test_train_script_says_in_one_line_why_a_run_cannot_go_on(case, root, tmp_path):
    """A folder another process writes, a last.pt cut short, a path the file system refuses (as a full disk
    or a read-only folder would): one line naming the file, no traceback."""
    out = tmp_path / ("x" * 300 if case == "unwritable" else "out")  # a name the file system refuses, like a full disk
    if case == "locked":
        (tmp_path / ".out.lock").write_text(json.dumps({"pid": 1, "host": "another-host", "started": "earlier"}))
    elif case == "truncated checkpoint":
        (tmp_path / ".out.partial" / "checkpoints").mkdir(parents=True)
        (tmp_path / ".out.partial" / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 cut short")
        cu.save_json({"written_by": "cpc_utils.begin_run"}, tmp_path / ".out.partial" / cu.RUN_MARKER)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--data_root", str(root), *TINY,
                           "--output_dir", str(out), "--resume", "True"], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith("train.py: OSError: " if case == "unwritable" else "train.py: RunBlocked: ")
    assert {"locked": str(tmp_path / ".out.lock"), "truncated checkpoint": str(tmp_path / ".out.partial" / "checkpoints"
                                                                               / "last.pt"),
            "unwritable": "File name too long"}[case] in line
