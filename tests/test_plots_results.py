"""Plots, results and command-line sections: every plot returns a Figure, a results tree
becomes summary.md / summary.csv / comparison.png, `python -m cpc_utils demo-data` writes
a readable tree, and importing the module changes no global state."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import cpc_utils as cu


# ---- plots ---------------------------------------------------------------------------

def line_labels(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines()]


def test_plot_training_curves_cpc():
    history = [{"epoch": e, "train_loss": 3.0 - e, "val_loss": 3.5 - e, "loss_per_step": [1.0, 2.0],
                "acc_per_step": [0.1 * e, 0.05 * e]} for e in (1, 2, 3)]
    fig = cu.plot_training_curves(history, title="cpc")
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    loss_ax, acc_ax = fig.axes
    assert line_labels(loss_ax) == ["train", "validation"] and loss_ax.get_title() == "cpc"
    assert list(loss_ax.get_lines()[1].get_ydata()) == [2.5, 1.5, 0.5]
    assert line_labels(acc_ax) == ["k = 1", "k = 2"]
    assert np.allclose(acc_ax.get_lines()[1].get_ydata(), [0.05, 0.1, 0.15])


def test_plot_training_curves_without_validation():
    fig = cu.plot_training_curves([{"epoch": 1, "train_loss": 2.0}, {"epoch": 2, "train_loss": 1.0}])
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    assert line_labels(fig.axes[0]) == ["train"]


def test_plot_roc():
    y = np.array([0, 0, 1, 1])
    fig = cu.plot_roc({"perfect": (y, np.array([0.1, 0.2, 0.8, 0.9])), "inverted": (y, np.array([4, 3, 2, 1]))})
    assert isinstance(fig, Figure)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["perfect (1.000)", "inverted (0.000)"]
    assert len(fig.axes[0].get_lines()) == 3  # two curves and the chance diagonal


def test_plot_score_histogram():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(10), np.ones(5)]
    fig = cu.plot_score_histogram(labels, rng.random(15) + labels)
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.patches) == 2 * 20
    assert sum(p.get_height() for p in ax.patches) == 15  # every image counted once


def test_plot_heatmaps(fake_widget):
    test = fake_widget["test"]
    pixel_maps = torch.rand(len(test), 1, 32, 32)
    fig = cu.plot_heatmaps(test, pixel_maps, [0, 3])
    assert isinstance(fig, Figure) and len(fig.axes) == 6
    assert fig.axes[0].get_title() == "crack #0" and fig.axes[3].get_title() == "good #3"
    assert len(fig.axes[2].get_images()) == 2  # the image and the map over it
    fig = cu.plot_heatmaps(test, pixel_maps, [1], titles=["worst"])
    assert fig.axes[0].get_title() == "worst"


def result_row(category: str, encoder: str, epochs: int, auroc: float, **extra) -> dict:
    return {"category": category, "encoder": encoder, "epochs_trained": epochs, "image_auroc": auroc,
            "pixel_auroc": auroc - 0.1, "aupro": 0.5, "train_seconds": 12.0, **extra}


ROWS = [result_row("brick", "resnet18v2", 2, 0.8), result_row("brick", "resnet18v2", 5, 0.9),
        result_row("brick", "densenet", 5, 0.7), result_row("gravel", "resnet18v2", 5, 0.6)]


def test_plot_comparison():
    fig = cu.plot_comparison(ROWS)
    assert isinstance(fig, Figure) and [ax.get_title() for ax in fig.axes] == ["brick", "gravel"]
    brick = fig.axes[0]
    assert line_labels(brick) == ["densenet", "resnet18v2"]
    assert list(brick.get_lines()[1].get_xdata()) == [2, 5] and list(brick.get_lines()[1].get_ydata()) == [0.8, 0.9]


# ---- results -------------------------------------------------------------------------

@pytest.fixture
def results_tree(tmp_path) -> Path:
    """results/<run>/<category>/<encoder>[-<epochs>]/metrics.json for ROWS."""
    run = tmp_path / "run"
    for r in ROWS:
        cu.save_json(r, run / r["category"] / f"{r['encoder']}-{r['epochs_trained']}" / "metrics.json")
    return run


def test_load_results(results_tree):
    rows = cu.load_results(results_tree)
    assert sorted(rows, key=json.dumps) == sorted(ROWS, key=json.dumps)
    assert cu.load_results(results_tree / "nowhere") == []


def test_load_results_invalid_json_names_the_file(results_tree):
    bad = results_tree / "gravel" / "broken" / "metrics.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"category": "gravel", ')
    with pytest.raises(ValueError) as e:
        cu.load_results(results_tree)
    assert str(bad) in str(e.value)


def test_summary_table():
    table = cu.summary_table(ROWS + [result_row("tissue", "resnet18v2", 5, 0.5), result_row("cable", "densenet", 5, 0.4)])
    lines = table.strip().split("\n")
    assert lines[0] == "| " + " | ".join(cu.SUMMARY_COLUMNS) + " |"
    # header, rule, one line per run, one mean line per (half, encoder): tuning x 2, confirmation, MVTec ("")
    assert len(lines) == 2 + len(ROWS) + 2 + 4
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [c[:4] for c in cells[:6]] == [["brick", "tuning", "densenet", "5"], ["brick", "tuning", "resnet18v2", "2"],
                                          ["brick", "tuning", "resnet18v2", "5"], ["gravel", "tuning", "resnet18v2", "5"],
                                          ["cable", "", "densenet", "5"], ["tissue", "confirmation", "resnet18v2", "5"]]
    col = cu.SUMMARY_COLUMNS.index("image_auroc")
    assert cells[1][col] == "0.800"
    means = {(c[1], c[2]): c for c in cells if c[0] == "**mean**"}
    assert set(means) == {("tuning", "resnet18v2"), ("tuning", "densenet"), ("confirmation", "resnet18v2"), ("", "densenet")}
    assert means["tuning", "resnet18v2"][col] == f"{np.mean([0.8, 0.9, 0.6]):.3f}"
    assert means["tuning", "densenet"][col] == "0.700" and means["confirmation", "resnet18v2"][col] == "0.500"
    assert means["tuning", "resnet18v2"][cu.SUMMARY_COLUMNS.index("baseline_image_auroc")] == ""  # absent: blank


def test_write_summary(results_tree):
    rows = cu.write_summary(results_tree)
    assert len(rows) == len(ROWS)
    assert (results_tree / "summary.md").read_text() == cu.summary_table(rows)
    with open(results_tree / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(cu.SUMMARY_COLUMNS)
    assert sorted((r["category"], r["encoder"], r["epochs_trained"], float(r["image_auroc"])) for r in table) == \
        sorted((r["category"], r["encoder"], str(r["epochs_trained"]), r["image_auroc"]) for r in ROWS)
    png = (results_tree / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert not list(results_tree.glob(".*.tmp"))
    assert not plt.get_fignums()  # the figure was closed
    assert len(cu.write_summary(results_tree)) == len(ROWS)  # its own outputs are not results


def test_write_summary_without_results(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        cu.write_summary(tmp_path)
    assert str(tmp_path) in str(e.value)


# ---- command line --------------------------------------------------------------------

def test_cli_demo_data(tmp_path, monkeypatch, capsys):
    """`python -m cpc_utils demo-data OUT`: arguments reach make_demo_dataset, the tree is readable."""
    calls, make = [], cu.make_demo_dataset

    def small(out, categories=None, seed=0, **kw):  # the real writer, with fewer and smaller images
        calls.append((str(out), categories, seed))
        return make(out, categories, n_train=2, n_test_good=1, n_per_defect=1, image_size=64, seed=seed)

    monkeypatch.setattr(cu, "make_demo_dataset", small)
    out = tmp_path / "demo"
    cu.main(["demo-data", str(out), "--categories", "brick", "tissue", "--seed", "3"])
    assert calls == [(str(out), ["brick", "tissue"], 3)]
    assert cu.list_categories(out) == ["brick", "tissue"]
    assert str(out) in capsys.readouterr().out
    data = cu.load_category(out, "tissue", image_size=32, num_threads=1)
    assert len(data["train"]) == 2 and data["test"].labels.sum() == len(cu.demo_defects("tissue"))


@pytest.mark.parametrize("argv", [[], ["demo-data"], ["train"]])  # unknown categories: tests/test_cli.py
def test_cli_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cu.main(argv)
    assert e.value.code == 2


# ---- importing changes nothing -------------------------------------------------------

IMPORT_CHECK = r"""
import json, random, sys
import matplotlib, numpy as np, torch
def rc_params():  # reading rcParams["backend"] would resolve the backend and import pyplot
    rc = matplotlib.rcParams
    return {k: repr(rc._get(k) if k == "backend" else rc[k]) for k in rc}
def state():
    return {"torch_rng": torch.get_rng_state().tolist(), "numpy_rng": np.random.get_state()[1].tolist(),
            "python_rng": random.getstate()[1], "rcParams": rc_params(),
            "threads": torch.get_num_threads(), "dtype": str(torch.get_default_dtype()),
            "grad": torch.is_grad_enabled(), "cudnn_benchmark": torch.backends.cudnn.benchmark}
before = state()
import cpc_utils
after = state()
changed = sorted(k for k in before if before[k] != after[k])
sys.stdout.write(json.dumps({"changed": changed, "pyplot": "matplotlib.pyplot" in sys.modules}))
"""


def test_import_changes_nothing():
    out = subprocess.run([sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True, timeout=120,
                         cwd=Path(cu.__file__).parent)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)  # nothing but our own line on stdout: the import prints nothing
    assert result == {"changed": [], "pyplot": False}


def test_summary_lists_failed_missing_and_other_pairs(results_tree):
    rows = cu.load_results(results_tree)
    first, *rest = sorted({f"{r['category']}/{r['encoder']}" for r in rows})
    status = {first: "finished", "brick/bogus": "failed", "nut/densenet": "missing"}
    cu.write_summary(results_tree, status, {"brick/bogus": {"error": "ParameterError: encoder='bogus'\n..."}})
    text = (results_tree / "summary.md").read_text()
    assert "1 finished, 1 failed, 1 missing" in text
    assert "- brick/bogus: failed: ParameterError: encoder='bogus'" in text and "- nut/densenet: missing" in text
    assert all(pair in text.split("Also in this folder")[1] for pair in rest)
