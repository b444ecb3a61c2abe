"""The notebooks, executed end to end on a tiny demo tree.

Each notebook runs through papermill with small parameters (64 px images, 16 px patches at
stride 8, width 8, one epoch) and must write its files; each runs again under nbval (lax) on a
copy with the same parameters injected; a wrong category must stop notebook 02 with
cpc_utils's own error. Static checks keep the committed notebooks clean: no outputs, one
`parameters` cell of flat literals, no def/class.
"""
from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import papermill as pm
import pytest

import cpc_utils as cu
from conftest import metrics_record

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = {p.name[:2]: p for p in sorted((ROOT / "notebooks").glob("*.ipynb"))}
TINY = dict(image_size=64, patch_size=16, stride=8, width=8, epochs=1, seed=0, device="cpu")
NB02_REQUIRED = ("data_root", "category", "encoder", "epochs", "image_size", "patch_size", "stride", "batch_size",
                 "lr", "num_negatives", "pred_steps", "seed", "device", "output_dir")
NB02_METRICS = ("category", "encoder", "epochs_trained", "image_auroc", "image_auroc_max", "image_f1_max",
                "pixel_auroc", "aupro", "baseline_image_auroc", "baseline_pixel_auroc", "baseline_aupro",
                "per_defect_auroc", "train_seconds", "final_train_loss", "final_val_loss", "chance_loss",
                "device", "config", "threshold", "threshold_rule", "val_fpr_at_threshold", "test_precision_at_threshold",
                "test_recall_at_threshold", "test_fpr_at_threshold", "pixel_threshold", "test_pixel_fpr_at_threshold")
UNIT_METRICS = ("image_auroc", "image_auroc_max", "image_f1_max", "pixel_auroc", "aupro", "baseline_image_auroc",
                "baseline_pixel_auroc", "baseline_aupro")


@pytest.fixture(scope="module", autouse=True)
def _one_thread_kernels():
    """Kernels inherit the environment: one thread each, as tiny tensors gain nothing from more."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("MPLBACKEND", "Agg")
        yield


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """The demo data in miniature: 3 categories x (8 train, 2 good + 1 test image per defect type)."""
    return cu.make_demo_dataset(tmp_path_factory.mktemp("tiny"), ["brick", "gravel", "tissue"], n_train=8,
                                n_test_good=2, n_per_defect=1, image_size=64)


@pytest.fixture(scope="module")
def fake_results(tmp_path_factory) -> Path:
    """An epoch ladder as scripts/sweep.py --epochs 1 2 --seeds 0 1 writes it, for notebook 03 to read."""
    root = tmp_path_factory.mktemp("results")
    for i, enc in enumerate(cu.ENCODERS):
        for seed in (0, 1):
            for epochs in (1, 2):
                history = [{"epoch": e, "train_loss": 4.0, "val_loss": 4.0 - e, "seconds": 1.0 + i} for e in range(1, epochs + 1)]
                cu.save_json(metrics_record(category="brick", encoder=enc, epochs=epochs, epochs_trained=epochs,
                                            chosen_epoch=epochs, history=history, seed=seed,
                                            image_auroc=0.5 + 0.1 * i + 0.02 * seed, pixel_auroc=0.6, aupro=0.3,
                                            baseline_image_auroc=0.55, baseline_pixel_auroc=0.7, baseline_aupro=0.2,
                                            detector="knn_stats", image_reduce="max", fixed_image_auroc=0.45,
                                            selection={"mode": "validation", "why": "as notebook 02 chooses"},
                                            score_grid=13, baseline_grid=13),  # the tiny runs' grid
                             root / "brick" / enc / f"seed{seed}" / f"e{epochs}" / "metrics.json")
    return root


def small_parameters(key: str, tiny_root: Path, out: Path, fake_results: Path) -> dict:
    """The tiny parameters of notebook `key` ("01", "02", "03"), writing into `out`."""
    if key == "01":
        return {**TINY, "data_root": str(tiny_root), "context_dim": 32, "val_fraction": 0.5, "output_dir": str(out)}
    if key == "02":
        return {**TINY, "data_root": str(tiny_root), "category": "brick", "test_negatives": 128, "val_fraction": 0.5,
                "output_dir": str(out)}
    tiny02 = {**{k: v for k, v in TINY.items() if k not in ("epochs", "seed")}, "test_negatives": 128, "val_fraction": 0.5}
    return {"results_dir": str(fake_results), "run_comparison": True, "data_root": str(tiny_root), "category": "gravel",
            "epochs": [1, 2], "seeds": [0], "notebook02_parameters": tiny02, "devices": "cpu,cpu", "output_dir": str(out)}


def code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


# ---- the committed notebooks ----------------------------------------------------------

@pytest.mark.parametrize("key", sorted(NOTEBOOKS))
def test_notebook_is_committed_clean(key):
    nb = nbformat.read(NOTEBOOKS[key], as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4 and nb.metadata["kernelspec"]["name"] == "python3"
    for cell in code_cells(nb):
        assert cell.outputs == [] and cell.execution_count is None, f"{NOTEBOOKS[key].name} has outputs"
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and params[0].cell_type == "code"
    for stmt in ast.parse(params[0].source).body:  # flat literals only: name = constant
        assert isinstance(stmt, ast.Assign) and isinstance(stmt.targets[0], ast.Name), ast.unparse(stmt)
        ast.literal_eval(stmt.value)
    for cell in code_cells(nb):
        source = "\n".join(line for line in cell.source.splitlines() if not line.startswith("%"))
        defs = [n for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        assert not defs, f"{NOTEBOOKS[key].name}: define functions in cpc_utils.py, not in the notebook"


def test_notebooks_present():
    assert set(NOTEBOOKS) == {"01", "02", "03"}


def test_notebook02_has_the_documented_parameters():
    params = pm.inspect_notebook(str(NOTEBOOKS["02"]))
    missing = set(NB02_REQUIRED) - set(params)
    assert not missing, f"notebook 02 lacks parameters {missing}"



def test_notebook02_passes_every_parameter_to_the_pipeline():
    """A parameter the notebook declares but never hands to `run_cpcad` would be silently ignored."""
    import json
    source = "\n".join("".join(c["source"]) for c in json.loads(NOTEBOOKS["02"].read_text())["cells"]
                       if c["cell_type"] == "code")
    unused = [p for p in pm.inspect_notebook(str(NOTEBOOKS["02"])) if f"{p}={p}" not in source]
    assert not unused, f"notebook 02 never passes {unused} to cu.run_cpcad"


# ---- executed with papermill ----------------------------------------------------------

@pytest.fixture(scope="module")
def executed(tiny_root, fake_results, tmp_path_factory) -> dict[str, Path]:
    """Run every notebook once through papermill; returns key -> its output_dir."""
    outs = {}
    for key, path in NOTEBOOKS.items():
        out = tmp_path_factory.mktemp(f"nb{key}")
        pm.execute_notebook(str(path), str(out / path.name), parameters=small_parameters(key, tiny_root, out / "out",
                                                                                         fake_results),
                            cwd=str(out), progress_bar=False, kernel_name="python3")
        outs[key] = out / "out"
    return outs


def test_notebook01_trains_cpc_and_probes(executed):
    """One category, three seeds: every seed trained and probed, the headline numbers are the
    seeds' means, and the chance levels are those of a 7x7 grid (1 epoch learns nothing, so
    the values themselves are checked by tests/test_learning.py)."""
    out = executed["01"]
    m = json.loads((out / "metrics.json").read_text())
    assert {"training_curves.png", "patch_grid.png", "prediction_accuracy.png", "probes.png"} <= {
        p.name for p in out.glob("*.png")}
    assert m["category"] == "brick" and m["trained_on"] == ["brick"] and m["seeds"] == [0, 1, 2]
    assert m["epochs_trained"] == [1, 1, 1] and len(m["runs"]) == 3
    assert {f"seed{s}" for s in m["seeds"]} == {p.name for p in (out / "checkpoints").iterdir()}
    for name, metric in (("probe", "knn_auroc"), ("linear", "linear_auroc")):
        for f in cu.PROBE_FEATURES:
            assert m[f"{name}_{f}"] == pytest.approx(np.mean([r["probes"][f][metric] for r in m["runs"]]))
        gains = [r["probes"]["trained"][metric] - r["probes"]["random"][metric] for r in m["runs"]]
        verdict = m["probe_trained_beats_random" if name == "probe" else "linear_trained_beats_random"]
        assert verdict == (m[f"{name}_trained"] - m[f"{name}_random"] >= m["probe_margin"] and min(gains) > 0)
    K = m["config"]["model"]["pred_steps"]
    for key, name in (("same_image_accuracy", "image"), ("batch_accuracy", "batch")):
        assert m[key] == pytest.approx(np.mean([r[name]["acc_per_step"] for r in m["runs"]], axis=0).tolist())
        assert len(m[key]) == K
    assert m["same_image_chance_accuracy"] == pytest.approx(1 / 49)
    assert m["same_image_chance_loss"] == pytest.approx(math.log(49))
    assert m["chance_loss"] == pytest.approx(math.log(m["config"]["model"]["num_negatives"] + 1))


def test_notebook01_resumes_every_seed(executed, tiny_root, fake_results, tmp_path):
    """resume=True with more epochs continues each seed's model from its own checkpoint."""
    import shutil
    first = json.loads((executed["01"] / "metrics.json").read_text())
    out = tmp_path / "out"
    shutil.copytree(executed["01"], out)
    params = {**small_parameters("01", tiny_root, out, fake_results), "epochs": 2, "resume": True}
    pm.execute_notebook(str(NOTEBOOKS["01"]), str(tmp_path / "resumed.ipynb"), parameters=params, cwd=str(tmp_path),
                        progress_bar=False, kernel_name="python3")
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs_trained"] == [2, 2, 2]
    assert m["history"][0] == first["history"][0]  # the first epoch is the earlier run's, not a new one


def test_cpc_summary_tabulates_notebook01_runs(executed, tmp_path):
    """scripts/cpc_summary.py: one row per run, the seeds' mean ± std, the verdict."""
    import shutil
    m = json.loads((executed["01"] / "metrics.json").read_text())
    (tmp_path / "brick" / "resnet18v2").mkdir(parents=True)
    shutil.copy(executed["01"] / "metrics.json", tmp_path / "brick" / "resnet18v2" / "metrics.json")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "cpc_summary.py"), str(tmp_path), "--out",
                          str(tmp_path / "summary.md")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    row = (tmp_path / "summary.md").read_text().splitlines()[2].split(" | ")
    assert row[0] == "| brick" and row[1] == "tuning" and row[3] == "3"
    knn = [r["probes"]["trained"]["knn_auroc"] for r in m["runs"]]
    assert f"{np.mean(knn):.2f} ± {np.std(knn, ddof=1):.2f}" in row
    assert row[-1].rstrip(" |") == ("yes" if m["probe_trained_beats_random"] else "**no**")
    empty = subprocess.run([sys.executable, str(ROOT / "scripts" / "cpc_summary.py"), str(tmp_path / "brick")],
                           capture_output=True, text=True)
    assert empty.returncode != 0 and "no <category>/<encoder>/metrics.json" in empty.stderr


def test_notebook02_writes_metrics_and_figures(executed, tiny_root):
    out = executed["02"]
    m = json.loads((out / "metrics.json").read_text())
    missing = set(NB02_METRICS) - set(m)
    assert not missing, f"metrics.json lacks {missing}"
    for key in UNIT_METRICS:
        assert 0 <= m[key] <= 1, key
    assert set(m["per_defect_auroc"]) == set(cu.demo_defects("brick"))
    assert all(0 <= v <= 1 for v in m["per_defect_auroc"].values())
    assert m["category"] == "brick" and m["encoder"] == "resnet18v2" and m["epochs_trained"] == 1
    assert m["device"] == "cpu" and m["chance_loss"] > 0 and m["final_train_loss"] > 0
    # the whole configuration: every notebook parameter, and the dataclasses in force
    assert set(m["config"]["parameters"]) == set(pm.inspect_notebook(str(NOTEBOOKS["02"])))
    assert m["config"]["model"]["width"] == 8 and m["config"]["scoring"]["test_negatives"] == 128
    assert m["config"]["grid"]["image_size"] == 64 and m["config"]["train"]["epochs"] == 1
    assert m["score_grid"] == m["baseline_grid"] == 13  # like for like: the baseline on the dense 13x13 maps too
    assert {"training_curves.png", "roc.png", "score_histogram.png", "heatmaps.png"} <= {p.name for p in out.glob("*.png")}
    assert (out / "checkpoints" / "last.pt").exists()
    # the model bundle: its threshold keeps the validation normals at or below the target FPR
    bundle = cu.load_bundle(out / "model.pt")
    assert bundle.threshold == m["threshold"] and bundle.threshold_rule["target_fpr"] == m["config"]["parameters"]["target_fpr"]
    assert m["val_fpr_at_threshold"] <= m["threshold_rule"]["target_fpr"] and 0 <= m["test_fpr_at_threshold"] <= 1
    assert bundle.info["data"] == m["fingerprint"]["data"]
    assert m["learning"]["status"] in ("ok", "at_chance", "diverged") and "chance" in m["learning"]["message"]
    assert m["calibration"]["status"] == "ok" and "spreads" in m["calibration"]["message"]
    assert m["fingerprint"] == cu.cpcad_fingerprint(m["config"]["parameters"], tiny_root, "brick")
    assert not list(out.parent.glob(f".{out.name}*"))  # no staging folder or lock left behind


@pytest.mark.parametrize("bad, text", [({"epochs": "5"}, "epochs='5': expected int, got str"),
                                       ({"epochs": 0}, "epochs=0: must be >= 1"),
                                       ({"val_fraction": 1.5}, "val_fraction=1.5: must be <= 0.9")])
def test_notebook02_bad_parameter_stops_before_touching_the_previous_run(bad, text, executed, tiny_root, tmp_path):
    out = executed["02"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(pm.PapermillExecutionError, match=text):
        pm.execute_notebook(str(NOTEBOOKS["02"]), str(tmp_path / "out.ipynb"), cwd=str(tmp_path),
                            parameters={**TINY, "data_root": str(tiny_root), "category": "brick",
                                        "output_dir": str(out), **bad}, progress_bar=False, kernel_name="python3")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert not list(out.parent.glob(f".{out.name}*"))


def test_notebook03_shows_the_study_table_of_a_ladder(executed):
    """The ladder read from results_dir (brick: 3 encoders x 2 rungs x 2 seeds) and the one it ran
    itself through scripts/sweep.py (gravel: 3 encoders x 2 rungs, seed 0): one table per metric
    with classes as rows and encoder x epochs as columns, the floor, a sentence per class, the
    plots against epochs and the cost of each encoder."""
    out = executed["03"]
    c = json.loads((out / "comparison.json").read_text())
    assert len(c["runs"]) == 12 + 6 and sum(r["category"] == "gravel" for r in c["runs"]) == 6
    for enc in cu.ENCODERS:
        for n in (1, 2):  # notebook 02's own runs, as rungs of a ladder
            m = json.loads((out / "runs" / "gravel" / enc / "seed0" / f"e{n}" / "metrics.json").read_text())
            assert m["epochs"] == n and m["selection"]["mode"] == "validation" and m["detector"] in cu.CANDIDATES
            assert 0 <= m["baseline_image_auroc"] <= 1 and m["chosen_epoch"] in (1, 2)
    table = (out / "table_image_auroc.md").read_text().splitlines()
    assert table[0] == ("| Class | resnet18v2 e1 | resnet18v2 e2 | resnet50v2 e1 | resnet50v2 e2 | densenet e1 | densenet e2 "
                        "| pixel floor |")
    assert table[2] == "| brick | 0.51 ± 0.01 | 0.51 ± 0.01 | 0.61 ± 0.01 | 0.61 ± 0.01 | 0.71 ± 0.01 | 0.71 ± 0.01 | 0.55 |"
    assert table[3].startswith("| gravel | ") and " - " not in table[3]  # every encoder and rung ran
    assert (out / "table_chosen_epoch.md").read_text().splitlines()[2] == "| brick | 1, 1 | 2, 2 | 1, 1 | 2, 2 | 1, 1 | 2, 2 |"
    verdicts = (out / "verdicts.md").read_text().splitlines()
    assert verdicts[0].startswith("* brick: densenet is best at 2 epochs") and "larger than the seed spread" in verdicts[0]
    assert verdicts[1].startswith("* gravel: ") and "one seed" in verdicts[1]
    cost = (out / "cost.md").read_text()
    assert all(f"| {enc} | " in cost for enc in cu.ENCODERS) and "(width 8)" in cost
    assert {"comparison.png", "image_auroc_vs_epochs.png", "pixel_auroc_vs_epochs.png"} <= {p.name for p in out.glob("*.png")}
    fixed = (out / "table_image_auroc_knn_stats_top10.md").read_text().splitlines()  # the same runs, one detector
    assert fixed[2] == "| brick | 0.45 | 0.45 | 0.45 | 0.45 | 0.45 | 0.45 | 0.50 |"


def test_notebook02_flags_a_degenerate_calibration(tiny_root, tmp_path):
    """Every train/good image the same: the calibration normals' scores have no spread, so
    calibrated scores and thresholds mean nothing. Notebook 02 warns, and metrics.json says
    so beside `learning` instead of passing for a healthy run."""
    import shutil
    root = tmp_path / "data"
    shutil.copytree(tiny_root / "brick", root / "brick")
    good = sorted((root / "brick" / "train" / "good").iterdir())
    for f in good[1:]:
        shutil.copyfile(good[0], f)
    out = tmp_path / "out"
    pm.execute_notebook(str(NOTEBOOKS["02"]), str(tmp_path / "out.ipynb"), cwd=str(tmp_path),
                        parameters=small_parameters("02", root, out, tmp_path), progress_bar=False,
                        kernel_name="python3")
    m = json.loads((out / "metrics.json").read_text())
    assert m["calibration"]["status"] == "degenerate" and "no spread" in m["calibration"]["message"]
    shown = "".join(o.get("text", "") for c in code_cells(nbformat.read(tmp_path / "out.ipynb", as_version=4))
                    for o in c.outputs)
    assert "degenerate calibration" in shown


def test_notebook02_trains_with_same_image_negatives(tiny_root, tmp_path):
    """negatives="image" reaches the model, and the chance loss the run is judged against is
    that of its candidates: every patch of one 64 px image on the 7x7 grid, not 64 batch ones."""
    out = tmp_path / "out"
    pm.execute_notebook(str(NOTEBOOKS["02"]), str(tmp_path / "out.ipynb"), cwd=str(tmp_path),
                        parameters={**small_parameters("02", tiny_root, out, tmp_path), "negatives": "image"},
                        progress_bar=False, kernel_name="python3")
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["model"]["negatives"] == "image" and m["config"]["parameters"]["negatives"] == "image"
    assert m["chance_loss"] == pytest.approx(math.log(49))


def test_notebook02_wrong_category_stops_with_cpc_utils_error(tiny_root, tmp_path):
    with pytest.raises(pm.PapermillExecutionError, match="unknown category 'no_such_category'"):
        pm.execute_notebook(str(NOTEBOOKS["02"]), str(tmp_path / "out.ipynb"), cwd=str(tmp_path),
                            parameters={**TINY, "data_root": str(tiny_root), "category": "no_such_category",
                                        "output_dir": str(tmp_path / "out")},
                            progress_bar=False, kernel_name="python3")
    assert not (tmp_path / "out" / "metrics.json").exists() and not (tmp_path / ".out.partial").exists()


# ---- executed with nbval --------------------------------------------------------------

@pytest.mark.parametrize("key", sorted(NOTEBOOKS))
def test_notebook_passes_nbval_lax(key, tiny_root, fake_results, tmp_path):
    """nbval runs every cell of a copy with the tiny parameters injected (lax: outputs not compared)."""
    copy = tmp_path / NOTEBOOKS[key].name
    parameters = small_parameters(key, tiny_root, tmp_path / "out", fake_results)
    if key == "03":  # results_dir holds runs: "auto" reads them and trains nothing (the papermill run trains)
        parameters["run_comparison"] = "auto"
    pm.execute_notebook(str(NOTEBOOKS[key]), str(copy), prepare_only=True, parameters=parameters)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                           "--nbval-current-env", str(copy)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    assert "passed" in proc.stdout and "failed" not in proc.stdout
    assert (tmp_path / "out" / ("comparison.json" if key == "03" else "metrics.json")).exists()


def test_comparison_table_layout_and_averaging():
    rows = [{"category": "brick", "encoder": "densenet", "epochs": 8, "image_auroc": 0.8},
            {"category": "brick", "encoder": "resnet18v2", "epochs": 8, "image_auroc": 0.9},
            {"category": "brick", "encoder": "resnet18v2", "epochs": 8, "image_auroc": 0.7},   # a second seed
            {"category": "gravel", "encoder": "resnet18v2", "epochs_trained": 3, "image_auroc": 0.6}]
    assert cu.comparison_table(rows).splitlines() == [
        "| Class | Epochs | resnet18v2 | densenet |", "|---|---|---|---|",
        "| brick | 8 | 0.80 ± 0.14 | 0.80 |", "| gravel | 3 | 0.60 | - |",
        "| **mean tuning** | 3 | 0.60 | - |", "| **mean tuning** | 8 | 0.80 | 0.80 |"]


@pytest.mark.parametrize("key", sorted(NOTEBOOKS))
def test_papermill_reads_every_parameter(key):
    """papermill silently drops a parameter line it cannot parse (an `=` or `>` in its comment,
    say); the sweep and scripts/train.py would then not know that parameter."""
    nb = nbformat.read(NOTEBOOKS[key], as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    names = [stmt.targets[0].id for stmt in ast.parse(cell.source).body]
    assert list(pm.inspect_notebook(str(NOTEBOOKS[key]))) == names
