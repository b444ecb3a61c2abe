"""The command line: `python -m cpc_utils COMMAND` answers --help at once (before torch is
imported), lists every command, and turns bad input into one line without a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

import cpc_utils as cu
from conftest import metrics_record

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "cpc_utils", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_help_lists_every_command_without_importing_torch():
    code = ("import runpy, sys; sys.argv = ['cpc_utils', '--help']\n"
            "try:\n    runpy.run_module('cpc_utils', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'heavy import before --help'")
    proc = run(code=code)
    assert proc.returncode == 0, proc.stderr
    for command in ("demo-data", "summary", "score"):
        assert command in proc.stdout
    assert set(cu.cli_parser()._subparsers._group_actions[0].choices) == {"demo-data", "summary", "score"}


def test_summary_command(tmp_path):
    for cat, auroc in (("brick", 0.8), ("gravel", 0.6)):
        cu.save_json(metrics_record(category=cat, encoder="resnet18v2", epochs_trained=3, image_auroc=auroc,
                                    pixel_auroc=0.7), tmp_path / "run" / cat / "resnet18v2" / "metrics.json")
    proc = run("summary", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    assert "2 runs summarised" in proc.stdout and (tmp_path / "run" / "summary.md").exists()


def test_bad_input_is_one_line():
    proc = run("summary", "/no/such/results")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "python -m cpc_utils summary: no metrics.json under /no/such/results"
    proc = run("demo-data", "/tmp/never", "--categories", "bogus")
    assert proc.returncode == 1 and "unknown demo category 'bogus'" in proc.stderr and "Traceback" not in proc.stderr


def test_a_path_below_a_file_is_one_line(tmp_path):
    """An OSError (here: writing below a file) is said in one line, without "[Errno 20]"."""
    (tmp_path / "afile").write_text("x")
    proc = run("demo-data", str(tmp_path / "afile" / "demo"), "--categories", "brick")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == (f"python -m cpc_utils demo-data: cannot write {tmp_path}/afile/demo/brick/"
                                   f"{cu.DEMO_MANIFEST}: Not a directory")


def test_score_names_a_bad_device_before_reading_the_bundle(tmp_path):
    """--device is checked first: the message is about the device, not the bundle it would
    have been loaded onto (here no bundle exists at all)."""
    proc = run("score", str(tmp_path / "model.pt"), str(tmp_path), "--out", str(tmp_path / "o"), "--device", "gpu7")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == "python -m cpc_utils score: device='gpu7': expected auto, cpu, cuda, cuda:N or mps"
    if not torch.cuda.is_available():
        proc = run("score", str(tmp_path / "model.pt"), str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cuda")
        assert proc.stderr.strip() == ("python -m cpc_utils score: device='cuda': no CUDA device is available on "
                                       "this machine; use auto or cpu"), proc.stderr
