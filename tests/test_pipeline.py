"""The one pipeline, `cu.run_cpcad`: notebook 02's parameters are its parameters, and a run's
fingerprint means what it says: editing documentation, plots, reports or the CLI never
invalidates a finished run; a change to scoring only rescores the saved weights; a change to
training trains again."""
from __future__ import annotations

import ast
import dataclasses
import json
import shutil
from pathlib import Path

import nbformat
import pytest
import torch

import cpc_utils as cu
import cpc_ad.pipeline
import cpc_ad.runs

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cpc_ad"
TINY = dict(image_size=64, patch_size=16, stride=8, width=8, epochs=2, batch_size=4, test_negatives=64,
            val_fraction=0.5, num_heatmaps=1, device="cpu", seed=0)


def test_notebook02_parameters_are_the_pipelines():
    """The notebook's parameters cell says exactly `cu.RunParameters`' names and defaults."""
    nb = nbformat.read(ROOT / "notebooks" / "02_cpc_anomaly_detection.ipynb", as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    values = {s.targets[0].id: ast.literal_eval(s.value) for s in ast.parse(cell.source).body}
    assert values == {f.name: f.default for f in dataclasses.fields(cu.RunParameters)}
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "cu.run_cpcad(" in code and "train_model" not in code and "prepare_scoring" not in code  # one pipeline


def test_scoring_parameters_are_what_a_rescore_may_change():
    assert set(cu.RESCORE_CHANGES) == {"code.score", *(f"parameters.{k}" for k in (*cu.SCORING_PARAMETERS, "target_fpr"))}
    assert set(cu.SCORING_PARAMETERS) == {f.name for f in dataclasses.fields(cu.ScoringConfig)} - {"knn_bank"}


# ---- the code fingerprint ---------------------------------------------------------------

@pytest.fixture
def package(tmp_path) -> Path:
    copy = tmp_path / "cpc_ad"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def test_documentation_plots_reports_and_the_cli_do_not_change_the_code_fingerprint(package):
    before = cu.code_fingerprint(package)
    assert before == cu.code_fingerprint()
    edit(package / "models.py", '"""CPC (van den Oord', '"""Rewritten docstring.\n\nCPC (van den Oord')  # module docstring
    edit(package / "models.py", "class CPCAD(nn.Module):\n", "class CPCAD(nn.Module):  # a comment\n")
    edit(package / "training.py", "def train_model(", "# a comment above train_model\n\n\ndef train_model(")
    for module in ("plots", "report", "cli", "runs", "files", "demo"):  # not part of any result
        (package / f"{module}.py").write_text((package / f"{module}.py").read_text() + "\n\ndef added():\n    return 1\n")
    text = (package / "scoring.py").read_text()  # a docstring rewrapped
    start = text.index('"""', text.index("def score_patches("))
    (package / "scoring.py").write_text(text[:start] + '"""One line now."""' + text[text.index('"""', start + 3) + 3:])
    assert cu.code_fingerprint(package) == before


@pytest.mark.parametrize("module, old, new, changed", [
    ("training.py", "def train_model(", "EXTRA = 1\n\n\ndef train_model(", "train"),
    ("models.py", "class CPCAD(nn.Module):", "SCALE = 2\n\n\nclass CPCAD(nn.Module):", "train"),
    ("pipeline.py", "    seed_everything(params.seed)", "    seed_everything(params.seed + 1)", "train"),
    ("scoring.py", 'REDUCES = ("mean", "max", "top10")', 'REDUCES = ("mean", "max", "top10", "top5")', "score"),
    ("metrics.py", "def evaluate_maps(", "EXTRA = 1\n\n\ndef evaluate_maps(", "score"),
    ("pipeline.py", "    fixed = _headline(on_test[FIXED[0]]", "    fixed = _headline(on_test[FIXED[1]]", "score"),
], ids=["training", "model", "pipeline-training", "scoring", "metrics", "pipeline-scoring"])
def test_code_that_computes_results_changes_its_part_of_the_fingerprint(package, module, old, new, changed):
    before = cu.code_fingerprint(package)
    edit(package / module, old, new)
    after = cu.code_fingerprint(package)
    assert after[changed] != before[changed]
    assert all(after[p] == before[p] for p in after if p != changed)


# ---- the three cases, run -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return cu.make_demo_dataset(tmp_path_factory.mktemp("tiny"), ["brick"], n_train=8, n_test_good=2,
                                n_per_defect=1, image_size=64)


@pytest.fixture(scope="module")
def finished(tiny_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "brick"
    cu.run_cpcad(data_root=str(tiny_root), category="brick", output_dir=str(out), progress=False, **TINY)
    return out


def copy_run(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "brick"
    shutil.copytree(finished, out)
    return out


def no_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("trained again")
    monkeypatch.setattr(cpc_ad.pipeline, "train_model", fail)


TIMING = {"train_seconds", "train_wall_seconds", "score_seconds"}


def test_a_scoring_parameter_change_rescores_the_saved_weights(finished, tiny_root, tmp_path, monkeypatch, capsys):
    """Another detector: no training; the record equals a fresh run's with that detector (trained
    from scratch elsewhere) in every field but where and when it ran."""
    fresh = tmp_path / "fresh"
    cu.run_cpcad(data_root=str(tiny_root), category="brick", output_dir=str(fresh), detector="cpcad", reduce="mean",
                 progress=False, **TINY)
    out = copy_run(finished, tmp_path)
    weights_before = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    capsys.readouterr()
    no_training(monkeypatch)
    result = cu.run_cpcad(data_root=str(tiny_root), category="brick", output_dir=str(out), detector="cpcad",
                          reduce="mean", progress=False, **TINY)
    assert "rescoring the finished run" in capsys.readouterr().out and result.rescored_from == out
    a, b = json.loads((out / "metrics.json").read_text()), json.loads((fresh / "metrics.json").read_text())
    for key in sorted((set(a) | set(b)) - TIMING - {"config", "fingerprint", "history"}):
        assert a[key] == b[key], key
    assert [dict(h, seconds=0) for h in a["history"]] == [dict(h, seconds=0) for h in b["history"]]
    assert a["fingerprint"] == cu.cpcad_fingerprint({**b["config"]["parameters"]}, tiny_root, "brick")
    assert (a["detector"], a["image_reduce"]) == ("cpcad", "mean")
    after = torch.load(out / "model.pt", weights_only=True)
    assert after["scoring"]["detector"] == "cpcad" and after["references"] == {}  # only what the detector reads
    assert all(torch.equal(weights_before[k], after["state_dict"][k]) for k in weights_before)
    assert (out / "checkpoints" / "last.pt").exists()  # a longer run can still continue it


def test_a_scoring_code_change_rescores_and_a_training_code_change_retrains(finished, tiny_root, tmp_path,
                                                                            monkeypatch, capsys):
    out = copy_run(finished, tmp_path)
    before = json.loads((out / "metrics.json").read_text())
    code = cu.code_fingerprint()
    monkeypatch.setattr(cpc_ad.runs, "_CODE", {**code, "score": "0" * 12})  # the scoring code was edited
    with monkeypatch.context() as m:
        no_training(m)
        cu.run_cpcad(data_root=str(tiny_root), category="brick", output_dir=str(out), progress=False, **TINY)
    after = json.loads((out / "metrics.json").read_text())
    assert after["fingerprint"]["code"]["score"] == "0" * 12 and after["history"] == before["history"]
    same = lambda r: {k: v for k, v in r.items() if k not in TIMING | {"fingerprint", "config"}}  # noqa: E731
    assert same(after) == same(before)  # the same code scored: the same numbers (config: another output_dir)
    capsys.readouterr()
    monkeypatch.setattr(cpc_ad.runs, "_CODE", {**code, "train": "1" * 12})  # the training code was edited
    trained = []
    real = cpc_ad.pipeline.train_model
    monkeypatch.setattr(cpc_ad.pipeline, "train_model", lambda *a, **k: trained.append(1) or real(*a, **k))
    result = cu.run_cpcad(data_root=str(tiny_root), category="brick", output_dir=str(out), progress=False, **TINY)
    assert trained == [1] and result.rescored_from is None and "rescoring" not in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["fingerprint"]["code"]["train"] == "1" * 12


def test_no_heatmaps_asked_for_draws_none(finished, tiny_root, tmp_path, monkeypatch):
    """num_heatmaps=0 (the parameter allows it) leaves the heatmap figure out; it crashed in
    matplotlib with zero rows before."""
    out = copy_run(finished, tmp_path)
    assert (out / "heatmaps.png").exists()
    no_training(monkeypatch)  # with a scoring parameter changed, a rescore
    result = cu.run_cpcad(data_root=str(tiny_root), category="brick", output_dir=str(out), progress=False,
                          **{**TINY, "num_heatmaps": 0, "target_fpr": 0.05})
    assert "heatmaps" not in result.figures and {"roc", "score_histogram"} <= set(result.figures)
    assert not (out / "heatmaps.png").exists() and (out / "roc.png").exists()


def test_a_training_parameter_change_retrains(finished, tiny_root, tmp_path, monkeypatch):
    out = copy_run(finished, tmp_path)
    assert cu.is_rescorable(out, cu.cpcad_fingerprint({**json.loads((out / "metrics.json").read_text())["config"]
                                                     ["parameters"], "lr": 1e-3}, tiny_root, "brick")) is None
    no_training(monkeypatch)
    with pytest.raises(AssertionError, match="trained again"):
        cu.run_cpcad(data_root=str(tiny_root), category="brick", output_dir=str(out), lr=1e-3, progress=False, **TINY)


def test_a_run_that_fails_in_training_leaves_its_reason_and_no_lock(tiny_root, tmp_path, monkeypatch):
    """Issue 28.10: a diverging run (train_model raises FloatingPointError) leaves its staging
    folder with status "failed" and the error, and no lock: another process may start at once."""
    def diverge(*args, **kwargs):
        raise FloatingPointError("the loss diverged with lr=1: non-finite loss (nan)")
    monkeypatch.setattr(cpc_ad.pipeline, "train_model", diverge)
    out = tmp_path / "brick"
    with pytest.raises(FloatingPointError):
        cu.run_cpcad(data_root=str(tiny_root), category="brick", output_dir=str(out), progress=False, **TINY)
    run = json.loads((tmp_path / ".brick.partial" / "run.json").read_text())
    assert run["status"] == "failed" and run["error"].startswith("FloatingPointError: the loss diverged")
    assert not (tmp_path / ".brick.lock").exists() and not out.exists()


def test_a_category_without_ground_truth_is_evaluated_on_image_labels(tiny_root, tmp_path, capsys):
    """Issue 28.14: no ground_truth/ folder at all: image AUROC, F1 and thresholds; every test
    pixel metric is None (not available), said in one line in the output, metrics.json and the
    summary; the validation set (synthetic defects with their masks) keeps its pixel metrics."""
    root = tmp_path / "data"
    shutil.copytree(tiny_root / "brick", root / "brick", ignore=shutil.ignore_patterns("ground_truth"))
    out = tmp_path / "runs" / "brick" / "resnet18v2"
    cu.run_cpcad(data_root=str(root), category="brick", output_dir=str(out), progress=False, **TINY)
    assert f"ground truth: {cu.IMAGE_LABELS_ONLY}" in capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert m["ground_truth"] == cu.IMAGE_LABELS_ONLY and 0 <= m["image_auroc"] <= 1 and m["threshold"] is not None
    for prefix in ("", "cpcad_", "baseline_"):
        assert m[f"{prefix}pixel_auroc"] is None and m[f"{prefix}aupro"] is None
    assert m["test_pixel_recall_at_threshold"] is None and m["val_pixel_auroc"] is not None
    bundle = cu.load_bundle(out / "model.pt")  # issue 28.6: the bundle knows its training images' colour mode
    assert bundle.info["colour"] == cu.colour_mode(cu.load_category(root, "brick", 64)["train"].images)
    cu.write_summary(tmp_path / "runs")
    summary = (tmp_path / "runs" / "summary.md").read_text()
    assert f"**Ground truth**: brick: {cu.IMAGE_LABELS_ONLY}." in summary and "| n/a |" in summary
    (root / "brick" / "ground_truth" / "crack").mkdir(parents=True)  # a partial ground_truth/ stays an error
    with pytest.raises(FileNotFoundError, match="has no mask: expected .*ground_truth"):
        cu.load_category(root, "brick", 64)


def test_pooled_pretraining_trains_on_every_train_split_and_starts_a_run(tmp_path, monkeypatch):
    """Issue 30, lever 2: `pretrain_pooled` trains one model on the classes' train splits pooled,
    as `run_cpcad` splits them (never a held-out validation normal), and `run_cpcad(init_from=)`
    starts from its weights, the file's digest in the run's fingerprint."""
    root = cu.make_demo_dataset(tmp_path / "data", ["brick", "gravel"], n_train=8, n_test_good=2, n_per_defect=1,
                                image_size=64)
    params = cu.RunParameters(data_root=str(root), **{**TINY, "epochs": 1})
    trained_on, real = [], cpc_ad.pipeline.train_model
    monkeypatch.setattr(cpc_ad.pipeline, "train_model",
                        lambda m, train, *a, **k: trained_on.append(set(train.paths)) or real(m, train, *a, **k))
    history = cu.pretrain_pooled(params, ["brick", "gravel"], tmp_path / "pooled.pt", progress=False)
    assert len(history) == 1 and (tmp_path / "pooled.pt").is_file()
    splits = [cu.load_run_data(cu.plan_run(dataclasses.replace(params, category=c))) for c in ("brick", "gravel")]
    assert trained_on == [set(splits[0].train.paths) | set(splits[1].train.paths)]
    assert not trained_on[0] & {p for d in splits for p in d.normals.paths + d.calib.paths}

    saved = torch.load(tmp_path / "pooled.pt", weights_only=True)["state_dict"]
    out = tmp_path / "run"
    r = cu.run_cpcad(untrained=True, init_from=tmp_path / "pooled.pt", data_root=str(root), category="brick",
                     output_dir=str(out), progress=False, **TINY)
    assert all(torch.equal(v.cpu(), saved[k]) for k, v in r.model.state_dict().items())
    init = json.loads((out / "metrics.json").read_text())["fingerprint"]["init"]
    assert len(init) == 16 and init == cu.load_init(cu.CPCAD(r.plan.model, r.plan.grid), tmp_path / "pooled.pt")
    with pytest.raises(cu.RunBlocked, match="init_from=.*pooled.pt: not weights of this model"):
        cu.run_cpcad(init_from=tmp_path / "pooled.pt", data_root=str(root), category="brick",
                     output_dir=str(tmp_path / "wider"), progress=False, **{**TINY, "width": 16})
