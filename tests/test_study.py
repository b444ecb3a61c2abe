"""scripts/study.py: one tiny study end to end (two categories, one from each half, one seed,
one epoch), its per-run files, the report built from them, and the resume that skips
finished runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cpc_utils as cu

ROOT = Path(__file__).resolve().parent.parent


def study(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "study.py"), *args], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"})


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("study")
    root = cu.make_demo_dataset(tmp / "data", ["brick", "capsule"], n_train=20, n_test_good=2, n_per_defect=1,
                                image_size=64)
    args = ["--data-root", str(root), "--categories", "brick", "capsule", "--settings", "fast", "--seeds", "0",
            "--epochs", "2", "--eval-every", "1", "--jobs", "1", "--out", str(tmp / "out")]
    first = study(*args)
    mtime = (tmp / "out" / "runs" / "fast" / "brick" / "seed0.json").stat().st_mtime_ns
    second = study(*args)
    mtime_after_second = (tmp / "out" / "runs" / "fast" / "brick" / "seed0.json").stat().st_mtime_ns
    before = json.loads((tmp / "out" / "runs" / "fast" / "brick" / "seed0.json").read_text())
    rescore = study(*args, "--rescore")
    return {"out": tmp / "out", "root": root, "first": first, "second": second, "mtime": mtime, "before": before,
            "rescore": rescore, "mtime_after_second": mtime_after_second}


def test_study_writes_every_run_with_val_and_test_metrics(tiny_study):
    first, out = tiny_study["first"], tiny_study["out"]
    assert first.returncode == 0, first.stdout + first.stderr
    for category, half in (("brick", "tuning"), ("capsule", "confirmation")):
        r = json.loads((out / "runs" / "fast" / category / "seed0.json").read_text())
        assert (r["half"], r["seed"], r["setting"]) == (half, 0, "fast")
        assert set(r["val"]) == set(r["test"]) == set(cu.DETECTORS)
        for split in ("val", "test", "baseline_val", "baseline_test"):
            m = r[split]["cpcad"] if split in ("val", "test") else r[split]
            assert all(0 <= m[f"image_auroc_{k}"] <= 1 for k in cu.REDUCES) and 0 <= m["pixel_auroc"] <= 1
        assert [("val_detection" in h) for h in r["history"]] == [True, True]  # --eval-every 1
        assert (out / "runs" / "fast" / category / "seed0" / "model.pt").exists()  # run_cpcad's run folder
        assert json.loads((out / "runs" / "fast" / category / "seed0" / "metrics.json").read_text())["category"] == category


def test_study_report_has_both_halves(tiny_study):
    text = (tiny_study["out"] / "tables.md").read_text()
    assert "## Tuning half, validation" in text and "## Confirmation half, test" in text
    assert "| fast | cpcad |" in text and "| fast | pixel baseline |" in text
    rows = (tiny_study["out"] / "runs.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 * (len(cu.DETECTORS) + 1)  # header + runs x splits x (detectors + baseline)


def test_study_rerun_skips_finished_runs(tiny_study):
    second = tiny_study["second"]
    assert second.returncode == 0, second.stdout + second.stderr
    assert "2 runs (2 finished before)" in second.stdout
    assert tiny_study["mtime_after_second"] == tiny_study["mtime"]


def test_study_rescore_keeps_training_and_redoes_evaluation(tiny_study):
    rescore = tiny_study["rescore"]
    assert rescore.returncode == 0, rescore.stdout + rescore.stderr
    assert "rescoring 2 of 2 runs" in rescore.stdout
    after = json.loads((tiny_study["out"] / "runs" / "fast" / "brick" / "seed0.json").read_text())
    before = tiny_study["before"]
    assert after["history"] == before["history"] and after["train_seconds"] == before["train_seconds"]
    assert after["val"] == before["val"] and after["test"] == before["test"]  # same weights, same scores


def test_study_baseline_is_on_the_detectors_score_grid(tiny_study, tmp_path, monkeypatch):
    """Like for like: with dense scoring the raw-pixel baseline is scored on the same 13x13 grid
    as the detector's maps, not on the 7x7 training grid; --rebaseline recomputes it the same way."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import study as st
    monkeypatch.setitem(st.SETTINGS, "dense_tiny", ("test: dense scoring", {"dense_scoring": True}))
    job = dict(setting="dense_tiny", category="brick", seed=0, epochs=1, eval_every=1, threads=1,
               data_root=str(tiny_study["root"]), out=str(tmp_path / "runs" / "dense_tiny" / "brick" / "seed0.json"))
    st.run_one(job)
    run = json.loads(Path(job["out"]).read_text())
    assert run["baseline_grid"] == 13 and run["config"]["grid"]["stride"] == 16  # 128 px, 32 px patches
    assert "dense_tiny/brick/seed0: baseline on the 13x13 grid" in st.rebaseline(job)
    again = json.loads(Path(job["out"]).read_text())
    assert again == run  # the same numbers: the rebaseline uses the same grid and data


class Payload:
    """What a planted model.pt could hold: a full unpickle of it (not weights-only) creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_study_refuses_weights_holding_code(tiny_study, tmp_path):
    """--rescore reads a run's model.pt as tensors and plain types only: a planted payload is
    refused in one line naming the file, and never runs."""
    import shutil
    import torch
    out, marker = tmp_path / "out", tmp_path / "payload-ran"
    shutil.copytree(tiny_study["out"], out)
    weights = out / "runs" / "fast" / "brick" / "seed0" / "model.pt"
    torch.save({**torch.load(weights, weights_only=True), "extra": Payload(marker)}, weights)
    data = cu.make_demo_dataset(tmp_path / "data", ["brick"], n_train=20, n_test_good=2, n_per_defect=1,
                                image_size=64)
    proc = study("--data-root", str(data), "--categories", "brick", "--settings", "fast", "--seeds", "0",
                 "--epochs", "2", "--eval-every", "1", "--jobs", "1", "--out", str(out), "--rescore")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"FAILED RunBlocked: refusing checkpoint {weights}" in proc.stdout and "nothing in it was run" in proc.stdout
    assert not marker.exists()


def test_untrained_control_and_per_defect_auroc(tiny_study, tmp_path, monkeypatch):
    """The untrained setting scores the network as initialised (no history, no training time),
    and each run records every detector's and the baseline's image AUROC per defect type, on
    validation by synthetic kind and on test by defect folder; the report tabulates them."""
    import shutil
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import study as st
    import study_report
    monkeypatch.setitem(st.SETTINGS, "untrained", ("test: untrained", {"epochs": 0}))
    out = tmp_path / "out"
    shutil.copytree(tiny_study["out"], out)
    job = dict(setting="untrained", category="brick", seed=0, epochs=2, eval_every=1, threads=1,
               data_root=str(tiny_study["root"]), out=str(out / "runs" / "untrained" / "brick" / "seed0.json"))
    assert "(untrained)" in st.run_one(job)
    run = json.loads(Path(job["out"]).read_text())
    assert run["history"] == [] and run["train_seconds"] == 0 and run["epochs"] == 0
    assert set(run["per_defect"]) == {"val", "test"}
    assert set(run["per_defect"]["test"]) == set(cu.DETECTORS) | {"pixel baseline"}
    assert set(run["per_defect"]["test"]["knn_stats"]["top10"]) == set(cu.demo_defects("brick"))
    assert set(run["per_defect"]["val"]["knn_stats"]["top10"]) <= set(cu.SYNTHETIC_KINDS)
    text = study_report.write_report(out, ("fast", "knn_stats", "top10"))
    assert "same network untrained (knn_stats, top10) | untrained |" in text
    section = text.split("## Per defect type: validation against test")[1]
    assert "| flat (flat_fill) |" in section and "untrained (knn_stats): val / test" in section


def test_selection_study_set_takes_notebook_parameters_and_refuses_others(monkeypatch):
    """`--set NAME=VALUE` (a training lever through the same protocol): VALUE is JSON where it parses,
    an unknown NAME is an error, and one study folder never mixes settings in its tables."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "scripts"))
    import selection_study as ss
    got = ss.parse_overrides(["defect_negatives=outlier", "negatives=image", "num_negatives=31"], cu.RunParameters)
    assert got == {"defect_negatives": "outlier", "negatives": "image", "num_negatives": 31}
    for bad in (["defect_negative=outlier"], ["defect_negatives"]):
        with pytest.raises(SystemExit, match="NAME=VALUE"):
            ss.parse_overrides(bad, cu.RunParameters)
    assert ss.overrides_said([{"overrides": {}}, {}]) == ""
    assert ss.overrides_said([{"overrides": {"defect_negatives": True}}]) == " except `defect_negatives=True`"
    with pytest.raises(ValueError, match="different --set"):
        ss.overrides_said([{"overrides": {}}, {"overrides": {"defect_negatives": True}}])
