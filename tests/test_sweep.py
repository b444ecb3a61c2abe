"""scripts/sweep.py: notebook 02 over category x encoder, resumable, failures recorded.

One tiny tree, one results folder, five sweeps in a row:
  1. (broken, brick) x resnet18v2: the broken category (no defect images) fails and is recorded,
     brick still runs;
  2. brick x (resnet18v2, densenet): resnet18v2 is skipped as finished, densenet runs, the
     failure record of broken stays (it still has no result), the summary covers all three;
  3. the same again: both skipped, nothing re-run;
  4. resnet18v2 with another width: run again from scratch, not reported as finished;
  5. resnet18v2 with more epochs: its training continues from its checkpoint;
  6. resnet18v2 with fewer epochs again: trained anew, not the longer model relabelled.
Then, without training: a second sweep into a locked run folder, and a full disk.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import shutil

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


def sweep(data_root: Path, results: Path, *encoders: str, epochs: int | tuple = 1, params: tuple = (),
          run: str = "t", categories: tuple = ("brick",), extra: tuple = ()) -> subprocess.CompletedProcess:
    ladder = epochs if isinstance(epochs, tuple) else (epochs,)
    return subprocess.run([sys.executable, str(SWEEP), "--data-root", str(data_root), "--categories", *categories,
                           "--encoders", *encoders, "--epochs", *map(str, ladder), "--run", run, "--results", str(results),
                           *extra, "--param", *TINY, *params], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"})


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("sweep")
    root = cu.make_demo_dataset(tmp / "data", categories=["brick"], n_train=8, n_test_good=2, n_per_defect=1,
                                image_size=64)
    broken = root / "broken"  # a category whose test split has no defect images: fails when loaded
    shutil.copytree(root / "brick" / "train", broken / "train")
    shutil.copytree(root / "brick" / "test" / "good", broken / "test" / "good")
    results = tmp / "results"
    run = results / "t"
    first = sweep(root, results, "resnet18v2", categories=("broken", "brick"))
    failures_after_first = json.loads((run / "failures.json").read_text()) if (run / "failures.json").exists() else None
    mtime = (run / "brick" / "resnet18v2" / "metrics.json").stat().st_mtime_ns
    second = sweep(root, results, "resnet18v2", "densenet")
    third = sweep(root, results, "resnet18v2", "densenet")
    m_before = json.loads((run / "brick" / "resnet18v2" / "metrics.json").read_text())
    mtime_third = (run / "brick" / "resnet18v2" / "metrics.json").stat().st_mtime_ns
    fourth = sweep(root, results, "resnet18v2", params=("width=4",))
    m_wider = json.loads((run / "brick" / "resnet18v2" / "metrics.json").read_text())
    fifth = sweep(root, results, "resnet18v2", epochs=2, params=("width=4",))
    m_longer = json.loads((run / "brick" / "resnet18v2" / "metrics.json").read_text())
    sixth = sweep(root, results, "resnet18v2", epochs=1, params=("width=4",))
    m_shorter = json.loads((run / "brick" / "resnet18v2" / "metrics.json").read_text())
    return {"sixth": sixth, "m_shorter": m_shorter, "root": root, "results": results, "run": run, "first": first, "second": second, "third": third,
            "fourth": fourth, "fifth": fifth, "failures_after_first": failures_after_first, "r18_mtime": mtime, "r18_mtime_third": mtime_third,
            "m_before": m_before, "m_wider": m_wider, "m_longer": m_longer}


def test_failing_pair_is_recorded_and_the_sweep_goes_on(sweeps):
    first, run = sweeps["first"], sweeps["run"]
    assert first.returncode == 1, first.stdout + first.stderr
    failures = sweeps["failures_after_first"]
    assert list(failures) == ["broken/resnet18v2"]
    assert "ValueError" in failures["broken/resnet18v2"]["error"] and "AUROC needs both" in failures["broken/resnet18v2"]["error"]
    assert "broken/resnet18v2: FAILED" in first.stdout and "[2/2] brick/resnet18v2: done" in first.stdout


def test_sweep_writes_the_tree_and_summary(sweeps):
    second, run = sweeps["second"], sweeps["run"]
    assert "Traceback" not in second.stderr, second.stdout + second.stderr
    for enc in ("resnet18v2", "densenet"):
        out = run / "brick" / enc
        m = sweeps["m_before"] if enc == "resnet18v2" else json.loads((out / "metrics.json").read_text())
        assert m["category"] == "brick" and m["encoder"] == enc and m["epochs_trained"] == 1
        assert m["config"]["grid"]["image_size"] == 64 and m["config"]["parameters"]["resume"] is True
        assert (out / "02_cpc_anomaly_detection.ipynb").exists() and (out / "roc.png").exists()
        assert not list(run.glob("brick/.*")) and not (run / "brick" / f"{enc}.failed.ipynb").exists()
    assert (run / "broken" / "resnet18v2.failed.ipynb").exists()  # the failed pair's notebook, beside its folder
    # broken/resnet18v2 was not part of this sweep but still has no result: its failure record stays
    assert list(json.loads((run / "failures.json").read_text())) == ["broken/resnet18v2"]
    assert second.returncode == 1 and "- broken/resnet18v2: failed: " in (run / "summary.md").read_text()
    for name in ("summary.md", "summary.csv", "comparison.png"):
        assert (run / name).exists()
    summary = (run / "summary.md").read_text()
    assert "| brick | tuning | resnet18v2 |" in summary and "| brick | tuning | densenet |" in summary
    assert "[1/2] brick/resnet18v2: finished before with these parameters, skipped" in second.stdout


def test_rerun_skips_finished_pairs(sweeps):
    third, run = sweeps["third"], sweeps["run"]
    assert third.stdout.count("finished before with these parameters, skipped") == 2
    assert "0 run, 2 skipped, 1 failed, 0 missing" in third.stdout  # the failed pair of sweep 1 is still counted
    assert sweeps["r18_mtime_third"] == sweeps["r18_mtime"]


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


def test_sweep_knows_the_encoders_and_answers_help_without_torch():
    assert load_sweep().ENCODERS == tuple(cu.ENCODERS)
    code = ("import runpy, sys; sys.argv = ['sweep.py', '--help']\ntry:\n    runpy.run_path(%r, run_name='__main__')\n"
            "except SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch imported'") % str(SWEEP)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: sweep.py" in proc.stdout and "--categories bottle cable --encoders resnet18v2 \\\n" in proc.stdout
    assert proc.stdout.count("Run notebook 02 (CPC-AD) through papermill") == 1


def test_changed_parameters_run_again(sweeps):
    fourth, before, wider = sweeps["fourth"], sweeps["m_before"], sweeps["m_wider"]
    assert "finished before with other parameters.width: running again" in fourth.stdout, fourth.stdout
    assert before["config"]["model"]["width"] == 8 and wider["config"]["model"]["width"] == 4
    assert cu.fingerprint_diff(before["fingerprint"], wider["fingerprint"]) == ["parameters.width"]
    assert "1 run, 0 skipped" in fourth.stdout


def test_more_epochs_continue_training(sweeps):
    fifth, wider, longer = sweeps["fifth"], sweeps["m_wider"], sweeps["m_longer"]
    assert "(continuing its training)" in fifth.stdout, fifth.stdout
    assert longer["epochs_trained"] == 2 and longer["history"][0] == wider["history"][0]


def test_fewer_epochs_train_anew(sweeps):
    """epochs=1 after a 2-epoch run: a 1-epoch model, not the 2-epoch one relabelled (nor a failed pair)."""
    sixth, shorter = sweeps["sixth"], sweeps["m_shorter"]
    assert "(its results stay until this run finishes)" in sixth.stdout, sixth.stdout
    assert "brick/resnet18v2: done in" in sixth.stdout  # (the sweep's exit 1 is broken's failure, kept from the first)
    assert shorter["epochs"] == 1 and shorter["epochs_trained"] == 1 and len(shorter["history"]) == 1



    import socket
    lock = sweeps["run"] / ".sweep.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "now"}))
        second = sweep(sweeps["root"], sweeps["results"], "resnet18v2")
    finally:
        holder.kill()
        holder.wait()
        lock.unlink()
    assert second.returncode != 0 and f"being written by process {holder.pid}" in second.stderr, second.stderr


def test_a_full_disk_stops_the_sweep_cleanly(tmp_path, monkeypatch, capsys):
    """The first pair hits ENOSPC: recorded, the sweep stops, the rest are listed as missing;
    when even failures.json cannot be written, one clear line and exit status 2."""
    root = cu.make_demo_dataset(tmp_path / "data", categories=["brick", "gravel"], n_train=8, n_test_good=2,
                                n_per_defect=1, image_size=64)
    mod = load_sweep()

    def full(notebook, out, parameters):
        raise OSError(28, f"cannot write {out}/checkpoints/last.pt: the disk is full (no space left on device)")
    monkeypatch.setattr(mod, "run_pair", full)
    argv = ["--data-root", str(root), "--encoders", "resnet18v2", "--results", str(tmp_path / "r"), "--run", "full"]
    assert mod.main(argv) == 1
    out = capsys.readouterr().out
    assert "the disk is full; stopping" in out and "0 run, 0 skipped, 1 failed, 1 missing" in out
    failures = json.loads((tmp_path / "r" / "full" / "failures.json").read_text())
    assert list(failures) == ["brick/resnet18v2"] and "disk is full" in failures["brick/resnet18v2"]["error"]

    def no_space(obj, path):
        raise OSError(28, f"cannot write {path}: the disk is full (no space left on device)")
    monkeypatch.setattr(cu, "save_json_ours", no_space)
    assert mod.main(argv) == 2
    assert "sweep: cannot record the failures: [Errno 28] cannot write" in capsys.readouterr().out
    assert not (tmp_path / "r" / "full" / ".sweep.lock").exists()


def test_unknown_category_or_encoder_stops_before_running(tmp_path):
    root = cu.make_demo_dataset(tmp_path / "data", categories=["brick"], n_train=8, n_test_good=2, n_per_defect=1,
                                image_size=64)
    proc = sweep(root, tmp_path / "r", "resnet18v2", categories=("brick", "brikc"))
    assert proc.returncode != 0 and "no category 'brikc'" in proc.stderr and "available: brick" in proc.stderr
    proc = sweep(root, tmp_path / "r", "resnet18")
    assert proc.returncode == 2 and "invalid choice: 'resnet18'" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_a_stopped_sweep_ends_cleanly_and_says_how_to_resume(tmp_path):
    """SIGTERM (what a scheduler sends; Ctrl-C takes the same path) while a pair trains: one line,
    exit status 130, the kernel stopped, the locks released, the pair's checkpoint kept."""
    import signal
    import psutil
    root = cu.make_demo_dataset(tmp_path / "data", categories=["brick"], n_train=8, n_test_good=2, n_per_defect=1,
                                image_size=64)
    proc = subprocess.Popen([sys.executable, str(SWEEP), "--data-root", str(root), "--categories", "brick",
                             "--encoders", "resnet18v2", "--epochs", "100000", "--run", "t", "--results",
                             str(tmp_path / "r"), "--param", *TINY, "patience=100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"})
    lines = []
    for line in proc.stdout:  # progress lines arrive as epochs finish
        lines.append(line)
        if "epoch " in line and "/100000" in line:  # training: the kernel runs, a checkpoint exists
            kernels = psutil.Process(proc.pid).children(recursive=True)
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    out = "".join(lines) + rest
    assert proc.returncode == 130, out
    assert "sweep: interrupted. Run the same command again to resume" in out and "Traceback" not in out
    assert kernels and not any(k.is_running() and k.status() != psutil.STATUS_ZOMBIE for k in kernels)
    pair = tmp_path / "r" / "t" / "brick"
    assert (pair / ".resnet18v2.partial" / "checkpoints" / "last.pt").exists()
    assert not (tmp_path / "r" / "t" / ".sweep.lock").exists()


def test_shards_split_the_pairs_deterministically(tmp_path):
    """Three machines, four pairs: every pair in exactly one share, the same on every call."""
    root = cu.make_demo_dataset(tmp_path / "data", categories=["brick", "gravel"], n_train=8, n_test_good=2,
                                n_per_defect=1, image_size=64)
    shares = []
    for i in (1, 2, 3):
        proc = sweep(root, tmp_path / "r", "resnet18v2", "densenet", categories=("brick", "gravel"),
                     extra=("--shard", f"{i}/3", "--dry-run"))
        assert proc.returncode == 0, proc.stderr
        shares.append([line.split("] ")[1].split(": would")[0] for line in proc.stdout.splitlines() if ": would " in line])
    assert shares == [["brick/resnet18v2", "gravel/densenet"], ["brick/densenet"], ["gravel/resnet18v2"]]
    bad = sweep(root, tmp_path / "r", "resnet18v2", extra=("--shard", "4/3", "--dry-run"))
    assert bad.returncode != 0 and "need 1 <= I <= N" in bad.stderr


def test_time_budget_too_small_starts_nothing(tmp_path):
    root = cu.make_demo_dataset(tmp_path / "data", categories=["brick"], n_train=8, n_test_good=2, n_per_defect=1,
                                image_size=64)
    proc = sweep(root, tmp_path / "r", "resnet18v2", extra=("--time-budget", "30s"))
    assert "too little to start brick/resnet18v2; stopping" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == 1 and "0 run, 0 skipped, 0 failed, 1 missing" in proc.stdout


@pytest.mark.parametrize("case", ["time budget", "results is a file", "empty run name", "run is a path",
                                  "unwritable run folder", "missing device"])
def test_a_bad_results_folder_run_name_or_time_budget_is_one_line_before_anything_runs(case, tmp_path):
    """Each is said in one line, exit 1, nothing written: not a traceback (--time-budget 11x, a file in the
    way of the first write) nor a run folder that is the results tree itself (--run "")."""
    root = cu.make_demo_dataset(tmp_path / "data", categories=["brick"], n_train=8, n_test_good=2, n_per_defect=1,
                                image_size=64)
    (tmp_path / "afile").write_text("a user's file")
    results, run, extra = tmp_path / "r", "t", ()
    if case == "time budget":
        extra = ("--time-budget", "11x")
    elif case == "missing device":
        extra = ("--devices", "cpu,cuda:99")
    elif case == "results is a file":
        results = tmp_path / "afile"
    elif case == "unwritable run folder":
        run = "x" * 300  # a name the file system refuses, as a read-only folder would be
    else:
        run = "" if case == "empty run name" else "../escaped"
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = sweep(root, results, "resnet18v2", run=run, extra=extra)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("sweep: ")
    assert {"time budget": "'11x': expected seconds", "results is a file": f"{tmp_path / 'afile'} is a file",
            "empty run name": "--run '': expected a folder name",
            "run is a path": "--run '../escaped': expected a folder name",
            "unwritable run folder": "File name too long", "missing device": "--devices cpu,cuda:99: device='cuda:99'"
            }[case] in proc.stderr
    if case == "unwritable run folder":  # the results folder was made before its run folder was refused
        assert not any((tmp_path / "r").iterdir())
        (tmp_path / "r").rmdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == before and (tmp_path / "afile").read_text() == "a user's file"


def test_a_pair_named_twice_runs_once_and_resume_must_be_a_bool(tmp_path):
    """--categories brick brick: one pair, not two runs of one folder (with --devices, at once, one of
    them then failing on the other's lock); --param resume=no: refused, not taken as resume=True."""
    root = cu.make_demo_dataset(tmp_path / "data", categories=["brick"], n_train=8, n_test_good=2, n_per_defect=1,
                                image_size=64)
    proc = sweep(root, tmp_path / "r", "resnet18v2", "resnet18v2", categories=("brick", "brick"), extra=("--dry-run",))
    assert proc.returncode == 0 and "[1/1] brick/resnet18v2: would run" in proc.stdout, proc.stdout + proc.stderr
    proc = sweep(root, tmp_path / "r", "resnet18v2", params=("resume=no",))
    assert proc.returncode == 1 and proc.stderr.strip() == "sweep: --param resume='no': expected True or False"
    assert not (tmp_path / "r").exists()


def test_two_pairs_at_once_on_two_cpu_devices(tmp_path):
    """--devices cpu,cpu: both pairs run (overlapping in time), each on its device, with the
    usual summary; OMP threads split between the kernels."""
    root = cu.make_demo_dataset(tmp_path / "data", categories=["brick", "gravel"], n_train=8, n_test_good=2,
                                n_per_defect=1, image_size=64)
    proc = sweep(root, tmp_path / "r", "resnet18v2", categories=("brick", "gravel"), extra=("--devices", "cpu,cpu"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 run, 0 skipped, 0 failed, 0 missing" in proc.stdout
    starts = [i for i, line in enumerate(proc.stdout.splitlines()) if "running on cpu" in line]
    dones = [i for i, line in enumerate(proc.stdout.splitlines()) if ": done in" in line]
    assert len(starts) == 2 and max(starts) < min(dones)  # the second started before the first finished
    for cat in ("brick", "gravel"):
        m = json.loads((tmp_path / "r" / "t" / cat / "resnet18v2" / "metrics.json").read_text())
        assert m["device"] == "cpu"


def test_an_unreadable_metrics_json_is_a_failed_pair_and_the_sweep_goes_on(sweeps, tmp_path):
    """A truncated metrics.json (a copy cut short, a full disk outside the project): the dry run
    and the sweep report that pair as failed, naming the file, leave it as it is, run or skip
    the others, and write the summary without it."""
    results = tmp_path / "results"
    shutil.copytree(sweeps["run"], results / "t")
    broken = results / "t" / "brick" / "densenet" / "metrics.json"
    broken.write_text(broken.read_text()[:100])
    args = dict(epochs=1, params=("width=4",))  # resnet18v2's last settings (sweep 6): finished, skipped
    dry = sweep(sweeps["root"], results, "densenet", "resnet18v2", extra=("--dry-run",), **args)
    assert dry.returncode == 1 and "Traceback" not in dry.stderr, dry.stdout + dry.stderr
    assert f"[1/2] brick/densenet: would fail: cannot read {broken}: " in dry.stdout
    assert "[2/2] brick/resnet18v2: would skip (finished with these parameters)" in dry.stdout
    proc = sweep(sweeps["root"], results, "densenet", "resnet18v2", **args)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert f"[1/2] brick/densenet: FAILED: cannot read {broken}: " in proc.stdout
    assert "[2/2] brick/resnet18v2: finished before with these parameters, skipped" in proc.stdout
    assert len(broken.read_text()) == 100  # left for the user to look at
    failures = json.loads((results / "t" / "failures.json").read_text())
    assert "(truncated or corrupt); delete that file to run this pair again" in failures["brick/densenet"]["error"]
    summary = (results / "t" / "summary.md").read_text()
    assert "- brick/densenet: failed: cannot read" in summary and "| brick | tuning | resnet18v2 |" in summary
    assert "| brick | tuning | densenet |" not in summary


def test_dry_run_reports_invalid_parameters(tmp_path):
    """The notebook's own checks run in the dry run: a value it would refuse is reported as a
    failure with its message (and exit status 1), not as 'would run'."""
    root = cu.make_demo_dataset(tmp_path / "data", categories=["brick"], n_train=8, n_test_good=2, n_per_defect=1,
                                image_size=64)
    proc = sweep(root, tmp_path / "r", "resnet18v2", params=("width=wide",), extra=("--dry-run",))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert "[1/1] brick/resnet18v2: would fail: ParameterError: width='wide': expected int, got str" in proc.stdout
    proc = sweep(root, tmp_path / "r", "resnet18v2", params=("pred_steps=7",), extra=("--dry-run",))
    assert "would fail: ParameterError: a 7x7 grid leaves no context for pred_steps=7" in proc.stdout, proc.stdout
    assert not (tmp_path / "r").exists()


def test_a_stopped_sweep_prints_its_command_quoted(tmp_path):
    """The command that resumes the sweep, printed when it stops, keeps a path with a space as one word."""
    root = cu.make_demo_dataset(tmp_path / "data", categories=["brick"], n_train=8, n_test_good=2, n_per_defect=1,
                                image_size=64)
    results = tmp_path / "my results"
    proc = sweep(root, results, "resnet18v2", extra=("--time-budget", "30s"))
    lines = proc.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if "again (in the next session) to resume:" in line)
    words = shlex.split(lines[at + 1])
    assert words[:2] == [sys.executable, str(SWEEP)] and words[words.index("--results") + 1] == str(results), words
    assert words[words.index("--time-budget") + 1] == "30s"


def test_results_go_under_kaggle_working_on_kaggle(tmp_path, monkeypatch, capsys):
    """Notebook 02's rule: /kaggle/working when it exists (the code is a read-only input there)."""
    root = cu.make_demo_dataset(tmp_path / "data", categories=["brick"], n_train=8, n_test_good=2, n_per_defect=1,
                                image_size=64)
    mod = load_sweep()
    monkeypatch.setattr(mod, "KAGGLE_WORKING", tmp_path / "kaggle" / "working")
    monkeypatch.chdir(tmp_path)
    argv = ["--data-root", str(root), "--encoders", "resnet18v2", "--run", "mvtec", "--dry-run"]
    assert mod.main(argv) == 0
    assert f"results: {tmp_path / 'results' / 'mvtec'}\n" in capsys.readouterr().out  # not on Kaggle: the cwd
    (tmp_path / "kaggle" / "working").mkdir(parents=True)
    assert mod.main(argv) == 0
    assert f"results: {tmp_path / 'kaggle' / 'working' / 'results' / 'mvtec'}\n" in capsys.readouterr().out


def test_a_sweep_run_from_elsewhere_writes_nothing_into_the_code(tmp_path):
    """Kaggle's layout: the code a read-only dataset, the command run from the working folder.
    Root ignores permission bits, so 'read-only' is checked as: nothing in the code's copy is
    added or changed, and the results are under the working directory."""
    code, work = tmp_path / "input" / "cpc-ad", tmp_path / "working"
    code.mkdir(parents=True)
    for name in ("cpc_utils.py", "scripts", "notebooks"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, code / name)
    work.mkdir()
    root = cu.make_demo_dataset(tmp_path / "data", categories=["brick"], n_train=8, n_test_good=2, n_per_defect=1,
                                image_size=64)

    def snapshot():
        return {str(p.relative_to(code)): (p.stat().st_mtime_ns, p.stat().st_size) for p in code.rglob("*")}
    before = snapshot()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg",
           "PYTHONDONTWRITEBYTECODE": "1"}  # on a read-only mount Python skips its bytecode cache silently
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, str(code / "scripts" / "sweep.py"), "--data-root", str(root),
                           "--encoders", "resnet18v2", "--epochs", "1", "--run", "mvtec", "--param", *TINY],
                          cwd=work, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert snapshot() == before
    pair = work / "results" / "mvtec" / "brick" / "resnet18v2"
    assert (pair / "metrics.json").exists() and (pair / "02_cpc_anomaly_detection.ipynb").exists()
    assert (work / "results" / "mvtec" / "summary.md").exists()


# ---- an epoch ladder ------------------------------------------------------------------

TIMING = ("train_seconds", "train_wall_seconds", "score_seconds")


@pytest.fixture(scope="module")
def ladders(tmp_path_factory) -> dict:
    """One tiny tree, and in order: a ladder of 1 and 2 epochs (seed 3); the same rungs trained
    separately (resume=False); the ladder again (nothing to do); the ladder extended to 3 epochs;
    a ladder on a category that fails; a dry run of a ladder with a new rung."""
    tmp = tmp_path_factory.mktemp("ladder")
    root = cu.make_demo_dataset(tmp / "data", categories=["brick"], n_train=8, n_test_good=2, n_per_defect=1,
                                image_size=64)
    shutil.copytree(root / "brick" / "train", root / "broken" / "train")  # no defect images: fails when loaded
    shutil.copytree(root / "brick" / "test" / "good", root / "broken" / "test" / "good")
    results, seed = tmp / "results", ("--seeds", "3")
    out = {"root": root, "results": results}
    out["ladder"] = sweep(root, results, "resnet18v2", epochs=(2, 1), run="ladder", extra=seed)  # any order
    out["separate"] = sweep(root, results, "resnet18v2", epochs=(1, 2), run="separate", extra=seed,
                            params=("resume=False",))
    out["again"] = sweep(root, results, "resnet18v2", epochs=(1, 2), run="ladder", extra=seed)
    out["metrics"] = {n: json.loads((results / "ladder" / "brick" / "resnet18v2" / "seed3" / f"e{n}" / "metrics.json")
                                    .read_text()) for n in (1, 2)}
    out["longer"] = sweep(root, results, "resnet18v2", epochs=(1, 2, 3), run="ladder", extra=seed)
    out["broken"] = sweep(root, results, "resnet18v2", epochs=(1, 2), run="ladder", categories=("broken",))
    out["dry"] = sweep(root, results, "resnet18v2", epochs=(1, 2, 3, 4), run="ladder", extra=(*seed, "--dry-run"))
    return out


def test_a_ladder_trains_once_and_each_rung_gets_its_folder(ladders):
    proc, rungs = ladders["ladder"], ladders["results"] / "ladder" / "brick" / "resnet18v2" / "seed3"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "x 1 seed (3) x an epoch ladder (1, 2: each pair trained once, to 2)" in proc.stdout
    assert "[1/2] brick/resnet18v2/seed3/e1: running ..." in proc.stdout
    assert "[2/2] brick/resnet18v2/seed3/e2: continuing the training of e1 to 2 epochs ..." in proc.stdout
    e1, e2 = ladders["metrics"][1], ladders["metrics"][2]
    assert (e1["epochs"], e1["epochs_trained"], e2["epochs"], e2["epochs_trained"]) == (1, 1, 2, 2)
    assert e1["config"]["parameters"]["seed"] == e2["config"]["parameters"]["seed"] == 3
    assert e2["history"][0] == e1["history"][0]  # the first epoch was trained once, by the 1-epoch rung
    assert e2["chosen_epoch"] == cu.chosen_epoch(e2["history"]) and 1 <= e2["chosen_epoch"] <= 2
    for rung in ("e1", "e2"):
        assert (rungs / rung / "02_cpc_anomaly_detection.ipynb").exists() and (rungs / rung / "roc.png").exists()
    summary = (ladders["results"] / "ladder" / "summary.md").read_text()
    assert "| brick | 1 |" in summary and "| brick | 2 |" in summary  # one line per rung in the class table
    assert (ladders["results"] / "ladder" / "epochs.png").exists()


def test_a_rung_is_identical_to_a_separate_run_of_its_epochs(ladders):
    """The 2-epoch rung continued the 1-epoch rung; the separate one trained 2 epochs from the
    start (resume=False): every metric, threshold and loss is the same, to the last digit."""
    separate = ladders["separate"]
    assert separate.returncode == 0 and "continuing" not in separate.stdout, separate.stdout + separate.stderr
    for n in (1, 2):
        a = ladders["metrics"][n]
        b = json.loads((ladders["results"] / "separate" / "brick" / "resnet18v2" / "seed3" / f"e{n}" / "metrics.json")
                       .read_text())
        differ = sorted(k for k in a if a[k] != b.get(k))
        assert differ == sorted(["config", "history", *TIMING]), differ  # when and where (seconds), not what
        assert [{k: v for k, v in h.items() if k != "seconds"} for h in a["history"]] == \
               [{k: v for k, v in h.items() if k != "seconds"} for h in b["history"]]
        assert a["fingerprint"] == b["fingerprint"] and a["image_auroc"] == b["image_auroc"]


def test_a_finished_rung_is_never_recomputed_and_a_longer_ladder_continues_the_longest(ladders):
    again, longer = ladders["again"], ladders["longer"]
    assert again.returncode == 0 and again.stdout.count("finished before with these parameters, skipped") == 2
    assert "0 run, 2 skipped, 0 failed, 0 missing" in again.stdout
    assert longer.returncode == 0, longer.stdout + longer.stderr
    assert longer.stdout.count("finished before with these parameters, skipped") == 2
    assert "[3/3] brick/resnet18v2/seed3/e3: continuing the training of e2 to 3 epochs ..." in longer.stdout
    e3 = json.loads((ladders["results"] / "ladder" / "brick" / "resnet18v2" / "seed3" / "e3" / "metrics.json").read_text())
    assert e3["history"][:2] == ladders["metrics"][2]["history"] and e3["epochs_trained"] == 3
    rungs = ladders["results"] / "ladder" / "brick" / "resnet18v2" / "seed3"  # training state: the longest rung's only
    assert [(rungs / f"e{n}" / "checkpoints").exists() for n in (1, 2, 3)] == [False, False, True]
    assert all((rungs / f"e{n}" / "model.pt").exists() for n in (1, 2, 3))  # what scoring needs stays


def test_a_failed_rung_stops_its_ladder_and_the_longer_rungs_say_why(ladders):
    broken = ladders["broken"]
    assert broken.returncode == 1 and "Traceback" not in broken.stderr, broken.stdout + broken.stderr
    assert "[1/2] broken/resnet18v2/e1: FAILED" in broken.stdout
    assert "[2/2] broken/resnet18v2/e2: not run (broken/resnet18v2/e1 failed)" in broken.stdout
    failures = json.loads((ladders["results"] / "ladder" / "failures.json").read_text())
    assert "AUROC needs both" in failures["broken/resnet18v2/e1"]["error"]
    assert failures["broken/resnet18v2/e2"]["error"] == "not run: broken/resnet18v2/e1, the shorter rung it continues, failed"
    summary = (ladders["results"] / "ladder" / "summary.md").read_text()
    assert "- broken/resnet18v2/e2: failed: not run" in summary
    assert "brick/resnet18v2/seed3/e3" in summary  # the other ladder's rungs, from earlier sweeps, are kept


def test_a_dry_run_of_a_ladder_says_what_each_rung_would_do(ladders):
    dry = ladders["dry"]
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "[1/4] brick/resnet18v2/seed3/e1: would skip (finished with these parameters)" in dry.stdout
    assert "[4/4] brick/resnet18v2/seed3/e4: would continue the previous rung's training" in dry.stdout
    assert not (ladders["results"] / "ladder" / "brick" / "resnet18v2" / "seed3" / "e4").exists()


@pytest.mark.parametrize("args, text", [
    (["--epochs", "1", "2", "--param", "epochs=3"], "give epochs once"),
    (["--seeds", "1", "--param", "seed=3"], "give seed once"),
    (["--epochs", "0", "2"], "expected whole numbers of at least 1"),
])
def test_ladder_and_seed_options_are_checked_before_anything_runs(args, text, tmp_path):
    root = cu.make_demo_dataset(tmp_path / "data", categories=["brick"], n_train=4, n_test_good=1, n_per_defect=1,
                                image_size=32)
    proc = subprocess.run([sys.executable, str(SWEEP), "--data-root", str(root), "--results", str(tmp_path / "r"),
                           *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and text in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "r").exists()


def test_pruning_a_rung_deletes_only_the_training_state_it_wrote(tmp_path):
    sweep_mod = load_sweep()
    for extra in ((), ("notes.txt",)):
        rung = tmp_path / f"e{len(extra)}"
        for name in ("last.pt", "best.pt", "progress.json", *extra):
            (rung / "checkpoints").mkdir(parents=True, exist_ok=True)
            (rung / "checkpoints" / name).write_text("x")
        (rung / "model.pt").write_text("bundle")
        sweep_mod.prune_checkpoints(rung)
        assert (rung / "model.pt").exists()
        left = sorted(p.name for p in (rung / "checkpoints").iterdir()) if (rung / "checkpoints").exists() else None
        assert left == (["notes.txt"] if extra else None)


def test_a_scoring_change_rescores_finished_pairs_without_training(sweeps, tmp_path):
    """Another reduction for a finished pair: the sweep says it rescores, the notebook loads the
    pair's model.pt instead of training (its history and training time are kept), and only the
    scoring changed in the record; the dry run says the same beforehand."""
    results = tmp_path / "results"
    shutil.copytree(sweeps["results"], results)
    (results / "t" / "failures.json").unlink()  # the broken category's record: not this test's subject
    pair = results / "t" / "brick" / "resnet18v2"
    before = json.loads((pair / "metrics.json").read_text())
    # the pair's last run was width 4, 1 epoch, its detector and reduction chosen on validation: force
    # its detector with another reduction
    reduce = next(r for r in cu.REDUCES if r != before["image_reduce"])
    params = ("width=4", f"detector={before['detector']}", f"reduce={reduce}")
    dry = sweep(sweeps["root"], results, "resnet18v2", params=params, extra=("--dry-run",))
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "would rescore its trained weights (finished with other parameters.detector, parameters.reduce)" \
        in dry.stdout
    proc = sweep(sweeps["root"], results, "resnet18v2", params=params)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rescoring its trained weights" in proc.stdout and "1 run, 0 skipped" in proc.stdout
    after = json.loads((pair / "metrics.json").read_text())
    notebook = (pair / "02_cpc_anomaly_detection.ipynb").read_text()
    assert "rescoring the finished run" in notebook and "train: " not in notebook  # no training progress bar
    assert after["history"] == before["history"] and after["train_seconds"] == before["train_seconds"]
    assert (after["detector"], after["image_reduce"]) == (before["detector"], reduce)
    assert after["selection"]["mode"] == "fixed" and before["selection"]["mode"] == "validation"
    assert after["pixel_auroc"] == before["pixel_auroc"]  # the same maps: the reduction is image-level only
    assert after["image_auroc"] == after[f"image_auroc_{reduce}"] == before[f"image_auroc_{reduce}"]


def test_the_executed_notebook_is_on_its_runs_list_of_files(sweeps):
    """The sweep's copy of the notebook, written after the run finished, is the run's own: a
    rerun may replace it; it is recorded before it is moved in."""
    out = sweeps["run"] / "brick" / "densenet"
    assert "02_cpc_anomaly_detection.ipynb" in json.loads((out / cu.RUN_MARKER).read_text())["files"]
    assert cu.is_run_folder(out)


def test_a_parameter_written_at_its_default_is_the_same_run(sweeps, tmp_path):
    """Issue 28.13: --param lr=0.0002 (TrainConfig's default) and the notebook's lr=None resolve
    to the same value: the finished pair is skipped, not trained again."""
    results = tmp_path / "results"
    shutil.copytree(sweeps["results"], results)
    params = ("width=4", "lr=0.0002", "negatives='batch'", "reduce='auto'")  # sweep 6's pair, the defaults spelled out
    dry = sweep(sweeps["root"], results, "resnet18v2", params=params, extra=("--dry-run",))
    assert "[1/1] brick/resnet18v2: would skip (finished with these parameters)" in dry.stdout, dry.stdout + dry.stderr
    base = {"data_root": "", "category": "brick", "width": 4}
    assert cu.cpcad_fingerprint(base, sweeps["root"], "brick") == \
        cu.cpcad_fingerprint({**base, "lr": 2e-4, "pred_steps": 1}, sweeps["root"], "brick")
    assert cu.cpcad_fingerprint(base, sweeps["root"], "brick") != \
        cu.cpcad_fingerprint({**base, "lr": 1e-3}, sweeps["root"], "brick")


USERS_FILES = {"summary.md": b"# my notes", "summary.csv": b"a,b\n1,2\n", "comparison.png": b"my chart",
               "failures.json": b'{"brick/resnet18v2": "my own list"}'}


@pytest.mark.parametrize("name", USERS_FILES)
def test_a_users_file_in_the_sweeps_folder_stops_it_before_anything_runs(name, tmp_path):
    """Issue 28.3: summary.md, summary.csv, comparison.png or failures.json of the user's in
    --results X --run proj: named in one line before any pair runs, kept byte for byte."""
    root = cu.make_demo_dataset(tmp_path / "data", categories=["brick"], n_train=8, n_test_good=2, n_per_defect=1,
                                image_size=64)
    run = tmp_path / "r" / "t"
    run.mkdir(parents=True)
    (run / name).write_bytes(USERS_FILES[name])
    proc = sweep(root, tmp_path / "r", "resnet18v2")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert proc.stderr.strip().startswith(f"sweep: {run / name} is a file that cpc_utils did not write"), proc.stderr
    assert sorted(p.name for p in run.iterdir()) == [name] and (run / name).read_bytes() == USERS_FILES[name]


def test_a_failure_record_of_another_shape_is_named_not_read(sweeps, tmp_path):
    """Issue 28.3: a failures.json the sweep recorded as its own but of another shape (edited by
    hand) is one line, not an AttributeError in the summary."""
    results = tmp_path / "results"
    shutil.copytree(sweeps["results"], results)
    (results / "t" / "failures.json").write_text('{"broken/resnet18v2": "edited"}')
    proc = sweep(sweeps["root"], results, "resnet18v2", params=("width=4",))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert "is not a sweep's failure record (its entry 'broken/resnet18v2' has no error message)" in proc.stderr


@pytest.mark.parametrize("where", ["category folder", "missing"])
def test_a_wrong_data_root_is_one_line_that_says_what_was_meant(where, tmp_path):
    """Issue 28.8: --data-root naming one category's folder, or nothing: no traceback; the first
    says which options were meant."""
    root = cu.make_demo_dataset(tmp_path / "data", categories=["brick"], n_train=8, n_test_good=2, n_per_defect=1,
                                image_size=64)
    data_root = root / "brick" if where == "category folder" else tmp_path / "nonexistent"
    proc = subprocess.run([sys.executable, str(SWEEP), "--data-root", str(data_root), "--run", "t", "--results",
                           str(tmp_path / "r")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"sweep: --data-root {data_root}: ")
    assert (f"did you mean data_root={str(root)!r} and category='brick' (scripts/sweep.py --data-root {root} "
            "--categories brick;" in proc.stderr) if where == "category folder" else "which does not exist" in proc.stderr
    assert not (tmp_path / "r").exists()
