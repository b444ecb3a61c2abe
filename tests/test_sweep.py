"""scripts/sweep.py: notebook 02 over category x encoder, resumable, failures recorded.

One tiny tree, one results folder, three sweeps in a row:
  1. brick x (bogus, resnet18v2): the bogus encoder fails and is recorded, resnet18v2 still runs;
  2. brick x (resnet18v2, densenet): resnet18v2 is skipped as finished, densenet runs, the
     failure record goes, the summary covers both;
  3. the same again: both skipped, nothing re-run.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cpc_utils as cu

ROOT = Path(__file__).resolve().parent.parent
SWEEP = ROOT / "scripts" / "sweep.py"
TINY = ["image_size=64", "patch_size=16", "stride=8", "width=8", "test_negatives=128", "val_fraction=0.5", "device=cpu"]


def load_sweep():
    spec = importlib.util.spec_from_file_location("sweep", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sweep(data_root: Path, results: Path, *encoders: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SWEEP), "--data-root", str(data_root), "--categories", "brick",
                           "--encoders", *encoders, "--epochs", "1", "--run", "t", "--results", str(results),
                           "--param", *TINY], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"})


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("sweep")
    root = cu.make_demo_dataset(tmp / "data", categories=["brick"], n_train=8, n_test_good=2, n_per_defect=1,
                                image_size=64)
    results = tmp / "results"
    run = results / "t"
    first = sweep(root, results, "bogus", "resnet18v2")
    failures_after_first = json.loads((run / "failures.json").read_text()) if (run / "failures.json").exists() else None
    mtime = (run / "brick" / "resnet18v2" / "metrics.json").stat().st_mtime_ns
    second = sweep(root, results, "resnet18v2", "densenet")
    third = sweep(root, results, "resnet18v2", "densenet")
    return {"run": run, "first": first, "second": second, "third": third,
            "failures_after_first": failures_after_first, "r18_mtime": mtime}


def test_failing_pair_is_recorded_and_the_sweep_goes_on(sweeps):
    first, run = sweeps["first"], sweeps["run"]
    assert first.returncode == 1, first.stdout + first.stderr
    failures = sweeps["failures_after_first"]
    assert list(failures) == ["brick/bogus"]
    assert "unknown encoder 'bogus'" in failures["brick/bogus"]["error"]
    assert "brick/bogus: FAILED" in first.stdout and "[2/2] brick/resnet18v2: done" in first.stdout


def test_sweep_writes_the_tree_and_summary(sweeps):
    second, run = sweeps["second"], sweeps["run"]
    assert second.returncode == 0, second.stdout + second.stderr
    for enc in ("resnet18v2", "densenet"):
        out = run / "brick" / enc
        m = json.loads((out / "metrics.json").read_text())
        assert m["category"] == "brick" and m["encoder"] == enc and m["epochs_trained"] == 1
        assert m["config"]["grid"]["image_size"] == 64 and m["config"]["parameters"]["resume"] is True
        assert (out / "02_cpc_anomaly_detection.ipynb").exists() and (out / "roc.png").exists()
        assert not list(out.glob(".*.running.ipynb")) and not list(out.glob("*.failed.ipynb"))
    assert not (run / "failures.json").exists()  # the failure was not part of this sweep
    for name in ("summary.md", "summary.csv", "comparison.png"):
        assert (run / name).exists()
    summary = (run / "summary.md").read_text()
    assert "| brick | tuning | resnet18v2 |" in summary and "| brick | tuning | densenet |" in summary
    assert "[1/2] brick/resnet18v2: finished before, skipped" in second.stdout


def test_rerun_skips_finished_pairs(sweeps):
    third, run = sweeps["third"], sweeps["run"]
    assert third.returncode == 0, third.stdout + third.stderr
    assert third.stdout.count("finished before, skipped") == 2 and "0 run, 2 skipped, 0 failed" in third.stdout
    assert (run / "brick" / "resnet18v2" / "metrics.json").stat().st_mtime_ns == sweeps["r18_mtime"]


def test_param_values_are_parsed_against_the_notebook_defaults():
    sweep_mod = load_sweep()
    defaults = {"width": 16, "lr": None, "similarity": None, "category": "brick", "resume": False}
    assert sweep_mod.parse_params(["width=8", "lr=1e-3", "similarity=cosine", "category=007", "resume=True"],
                                  defaults) == {"width": 8, "lr": 1e-3, "similarity": "cosine", "category": "007",
                                                "resume": True}
    with pytest.raises(SystemExit, match="unknown notebook parameter 'widht'"):
        sweep_mod.parse_params(["widht=8"], defaults)
    with pytest.raises(SystemExit, match="key=value"):
        sweep_mod.parse_params(["width"], defaults)


def test_sweep_reads_the_notebook_defaults():
    params = load_sweep().notebook_parameters(ROOT / "notebooks" / "02_cpc_anomaly_detection.ipynb")
    assert params["encoder"] == "resnet18v2" and isinstance(params["epochs"], int) and params["data_root"] == ""
