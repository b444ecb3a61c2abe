"""Plots, results and command-line sections: every plot returns a Figure, a results tree
becomes summary.md / summary.csv / comparison.png (and epochs.png), `python -m cpc_utils demo-data` writes
a readable tree, and importing the module changes no global state."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.figure import Figure

import cpc_utils as cu
import cpc_ad.demo
from conftest import metrics_record


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


def test_plot_training_curves_of_defect_aware_training_separate_infonce_and_the_heads_bce():
    """With `defect_head` the training loss is InfoNCE + BCE: the train curve drawn is its InfoNCE
    part, comparable with the validation loss and chance, and the BCE is its own line."""
    history = [{"epoch": e, "train_loss": 3.0 - e + 0.5 / e, "defect_bce": 0.5 / e, "val_loss": 3.2 - e}
               for e in (1, 2)]
    ax = cu.plot_training_curves(history).axes[0]
    assert line_labels(ax) == ["train", "validation", "train: defect head BCE"]
    assert np.allclose(ax.get_lines()[0].get_ydata(), [2.0, 1.0]) and np.allclose(ax.get_lines()[2].get_ydata(), [0.5, 0.25])


def test_plot_comparison_wraps_a_long_title_inside_the_figure():
    rows = [{"category": c, "encoder": "resnet18v2", "image_auroc": 0.8, "pixel_auroc": 0.9, "epochs": 40,
             "detector": d, "image_reduce": "top10", "selection": {"mode": "validation"}}
            for c, d in (("brick", "knn_stats_head"), ("gravel", "knn_stats"), ("nut", "pixel_pos"))]
    fig = cu.plot_comparison(rows)
    limit = int(fig.get_figwidth() * 12)
    assert all(len(line) <= limit for line in fig._suptitle.get_text().splitlines())
    assert "pixel_pos" in fig._suptitle.get_text()


def test_plot_roc():
    y = np.array([0, 0, 1, 1])
    fig = cu.plot_roc({"perfect": (y, np.array([0.1, 0.2, 0.8, 0.9])), "inverted": (y, np.array([4, 3, 2, 1]))})
    assert isinstance(fig, Figure)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["perfect (1.000)", "inverted (0.000)"]
    assert len(fig.axes[0].get_lines()) == 3  # two curves and the chance diagonal


def hist_edges(container) -> list[float]:
    return [p.get_x() for p in container] + [container[-1].get_x() + container[-1].get_width()]


def test_plot_score_histogram_shares_bin_edges():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(10), np.ones(5)]
    fig = cu.plot_score_histogram(labels, rng.random(15) * 0.5 + 3 * labels)  # classes far apart
    assert isinstance(fig, Figure) and len(fig.axes) == 1  # no defect types: no strip panel
    ax = fig.axes[0]
    normal, anomalous = ax.containers
    assert len(normal) == len(anomalous) == 20
    assert np.allclose(hist_edges(normal), hist_edges(anomalous))  # the same edges, not each class's own
    assert sum(p.get_height() for p in ax.patches) == 15  # every image counted once
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["normal (10)", "anomalous (5)"]
    assert ax.get_xlabel() and ax.get_ylabel() == "test images"
    assert not [line for line in ax.get_lines() if line.get_xdata()[0] == line.get_xdata()[-1]]  # no threshold


def test_plot_score_histogram_threshold_and_defect_types():
    labels = np.r_[np.zeros(4), np.ones(5)]
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.9, 0.6, 0.7, 0.8])
    defects = ["good"] * 4 + ["scratch", "crack", "scratch", "crack", "scratch"]
    fig = cu.plot_score_histogram(labels, scores, "brick", threshold=0.45, defect_types=defects)
    hist, strip = fig.axes
    for ax in (hist, strip):  # the threshold in both panels
        assert [list(line.get_xdata()) for line in ax.get_lines()] == [[0.45, 0.45]]
    assert "threshold 0.45" in [t.get_text() for t in hist.get_legend().get_texts()]
    assert [t.get_text() for t in strip.get_yticklabels()] == ["good (4)", "crack (2)", "scratch (3)"]
    points = np.concatenate([c.get_offsets() for c in strip.collections])
    assert len(points) == 9 and sorted(points[:, 0]) == sorted(scores)
    rows = {0: [0.1, 0.2, 0.3, 0.4], 1: [0.7, 0.9], 2: [0.5, 0.6, 0.8]}  # good on top, then A-Z
    for y, xs in rows.items():
        near = points[np.abs(points[:, 1] - y) < 0.3]
        assert sorted(near[:, 0]) == xs and not np.all(near[:, 1] == y)  # jittered around the row
    assert strip.get_xlabel() and strip.get_ylabel() and hist.get_shared_x_axes().joined(hist, strip)


def test_plot_score_histogram_leaves_out_the_strip_for_a_large_test_set():
    n = cu.STRIP_MAX_IMAGES + 1
    labels = np.arange(n) % 2
    defects = ["good" if y == 0 else "x" for y in labels]
    fig = cu.plot_score_histogram(labels, labels + np.linspace(0, 1, n), defect_types=defects)
    assert len(fig.axes) == 1
    with pytest.raises(ValueError, match="2 defect types for 3 scores"):
        cu.plot_score_histogram([0, 1, 1], [0.1, 0.2, 0.3], defect_types=["good", "x"])


def test_plot_heatmaps(fake_widget):
    test = fake_widget["test"]
    crack, good = test.defect_types.index("crack"), test.defect_types.index("good")
    pixel_maps = torch.rand(len(test), 1, 32, 32)
    pixel_maps[good] += 5  # the shared scale must reach this image's values in every row
    fig = cu.plot_heatmaps(test, pixel_maps, [crack, good])
    assert isinstance(fig, Figure)
    *panels, colorbar = fig.axes
    assert len(panels) == 4 and "one scale" in colorbar.get_ylabel()  # one colour bar for all rows
    assert [ax.get_title() for ax in panels[::2]] == [f"crack #{crack}", f"good #{good}"]
    maps = [panels[1].get_images()[0], panels[3].get_images()[0]]
    assert all(im.get_cmap().name == "inferno" for im in maps)
    lo, hi = float(pixel_maps.min()), float(pixel_maps.max())
    assert all(np.allclose(im.get_clim(), (lo, hi)) for im in maps) and colorbar.get_ylim() == pytest.approx((lo, hi))
    outline = panels[1].collections  # the ground truth drawn on the map as a contour
    assert len(outline) == 1 and np.allclose(outline[0].get_edgecolor()[0], (0, 1, 1, 1))
    box = outline[0].get_paths()[0].vertices  # (x = column, y = row)
    assert 3 < box[:, 1].min() and box[:, 1].max() < 10 and 7 < box[:, 0].min() and box[:, 0].max() < 14  # the square
    assert not panels[3].collections and not panels[0].collections  # no defect: no outline; the image stays clean
    fig = cu.plot_heatmaps(test, pixel_maps, [crack], titles=["worst"], scores=torch.arange(len(test)) / 4)
    assert fig.axes[0].get_title() == f"worst, score {crack / 4:.3g}"


def result_row(category: str, encoder: str, epochs: int, auroc: float, **extra) -> dict:
    return {"category": category, "encoder": encoder, "epochs_trained": epochs, "image_auroc": auroc,
            "pixel_auroc": auroc - 0.1, "aupro": 0.5, "train_seconds": 12.0, **extra}


ROWS = [result_row("brick", "resnet18v2", 2, 0.8), result_row("brick", "resnet18v2", 5, 0.9),
        result_row("brick", "densenet", 5, 0.7), result_row("gravel", "resnet18v2", 5, 0.6)]

BASE = {"baseline_image_auroc": 0.75, "baseline_pixel_auroc": 0.85, "image_reduce": "top10", "detector": "cpcad_knn_ms"}
COMPARED = [result_row("brick", "densenet", 5, 0.7, **BASE),
            result_row("brick", "resnet18v2", 5, 0.8, **BASE, seed=0),
            result_row("brick", "resnet18v2", 5, 0.9, **BASE, seed=1),     # a second seed: an error bar
            result_row("brick", "resnet18v2", 2, 0.3, **BASE),              # a shorter budget: not a bar
            result_row("tissue", "resnet18v2", 5, 0.55, **{**BASE, "baseline_image_auroc": 0.5}),
            result_row("gravel", "densenet", 5, 0.6, **BASE)]


def bars(ax) -> dict[str, list[tuple[float, float]]]:
    """{encoder: [(bar centre, height), ...]} of a bar panel."""
    return {c.get_label(): [(p.get_x() + p.get_width() / 2, p.get_height()) for p in c]
            for c in ax.containers if isinstance(c, BarContainer)}


def test_plot_comparison_grouped_bars():
    fig = cu.plot_comparison(COMPARED)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    image, pixel = fig.axes
    assert [t.get_text() for t in pixel.get_xticklabels()] == ["brick", "gravel", "tissue"]  # tuning, then confirmation
    got = bars(image)
    assert list(got) == ["resnet18v2", "densenet"]  # registry order, CLI names
    assert [h for _, h in got["resnet18v2"]] == pytest.approx([0.85, 0.55])  # brick: the two seeds at 5 epochs
    assert [h for _, h in got["densenet"]] == pytest.approx([0.7, 0.6])
    assert [round(x) for x, _ in got["resnet18v2"]] == [0, 2] and [round(x) for x, _ in got["densenet"]] == [0, 1]
    assert got["resnet18v2"][0][0] < got["densenet"][0][0]  # side by side within the group
    assert [h for _, h in bars(pixel)["resnet18v2"]] == pytest.approx([0.75, 0.45])
    errors = [c for c in image.containers if isinstance(c, ErrorbarContainer)]
    assert len(errors) == 1  # only the cell with two runs
    (segment,) = errors[0].lines[2][0].get_segments()
    assert segment[:, 1] == pytest.approx([0.85 - np.std([0.8, 0.9], ddof=1), 0.85 + np.std([0.8, 0.9], ddof=1)])
    (baseline,) = [c for c in image.collections if c.get_label() == "raw-pixel baseline"]
    assert [s[0, 1] for s in baseline.get_segments()] == pytest.approx([0.75, 0.75, 0.5])  # one per category
    brick = baseline.get_segments()[0][:, 0]
    assert brick[0] < got["resnet18v2"][0][0] < got["densenet"][0][0] < brick[1]  # over the whole brick group
    chance = [line for line in image.get_lines() if list(line.get_ydata()) == [0.5, 0.5]]
    assert len(chance) == 1 and chance[0].get_linestyle() == "--"
    low, high = image.get_ylim()
    assert low <= 0.4 and high == pytest.approx(1.01) and pixel.get_ylim() == (low, high)  # one shared range
    assert image.get_ylabel() == "image AUROC (top10 of the patch map)" and pixel.get_ylabel() == "pixel AUROC"
    texts = [t.get_text() for t in image.texts]
    assert texts == ["tuning half", "confirmation half"]  # the demo halves, named once
    assert [line.get_xdata()[0] for line in image.get_lines() if line.get_linestyle() == ":"] == [1.5]
    assert len(fig.legends) == 1 and image.get_legend() is None and pixel.get_legend() is None
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["resnet18v2", "densenet", "raw-pixel baseline", "chance (0.5)"]
    assert "raw-pixel baseline" in fig._suptitle.get_text() and "cpcad_knn_ms" in fig._suptitle.get_text()


def test_plot_comparison_of_mvtec_rows_without_baseline():
    rows = [result_row("carpet", "resnet50v2", 3, 0.2), result_row("zipper", "resnet50v2", 3, 0.95)]
    fig = cu.plot_comparison(rows, "image_auroc")
    (ax,) = fig.axes
    assert [h for _, h in bars(ax)["resnet50v2"]] == pytest.approx([0.2, 0.95])
    assert ax.get_ylim()[0] <= 0.15  # low enough for the lowest bar
    assert not ax.texts and not ax.collections  # no halves, no baseline
    assert "baseline" not in fig._suptitle.get_text()
    assert ax.get_ylabel() == "image AUROC"
    with pytest.raises(ValueError):
        cu.plot_comparison([])


def test_plot_epochs_only_for_several_budgets():
    assert cu.has_epoch_series(ROWS) and not cu.has_epoch_series(ROWS[1:])
    with pytest.raises(ValueError, match="one epoch budget"):
        cu.plot_epochs(ROWS[1:])
    fig = cu.plot_epochs(ROWS + [result_row("brick", "resnet18v2", 5, 0.7), {**ROWS[0], "baseline_image_auroc": 0.75}])
    assert isinstance(fig, Figure) and len(fig.axes) == 2  # brick only (gravel has one budget) x two metrics
    image, pixel = fig.axes
    assert image.get_title() == "brick (tuning half)" and pixel.get_xlabel()
    lines = {c.get_label(): c.lines[0] for c in image.containers}  # errorbar(): the label is the container's
    assert list(lines) == ["resnet18v2", "densenet"]
    assert np.allclose(lines["resnet18v2"].get_xdata(), [2, 5], atol=0.05)  # dodged: the error bars side by side
    assert lines["resnet18v2"].get_xdata()[-1] < lines["densenet"].get_xdata()[-1]
    assert list(lines["resnet18v2"].get_ydata()) == pytest.approx([0.8, 0.8])  # (0.9 + 0.7) / 2 at 5 epochs
    assert image.containers[0].has_yerr and not image.containers[1].has_yerr  # two runs at 5 epochs: ± std
    (baseline,) = [line for line in image.get_lines() if line.get_label() == "raw-pixel baseline"]
    assert list(baseline.get_ydata()) == [0.75, 0.75]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["resnet18v2", "densenet", "raw-pixel baseline"]
    assert len(fig.legends) == 1
    assert len(cu.plot_epochs(ROWS, "image_auroc").axes) == 1


def ladder_row(category: str, encoder: str, epochs: int, seed: int, auroc: float, base: float = 0.7, **extra) -> dict:
    """A rung of an epoch ladder as notebook 02 records it (seed in config.parameters)."""
    return {"category": category, "encoder": encoder, "epochs": epochs, "epochs_trained": epochs,
            "image_auroc": auroc, "pixel_auroc": auroc + 0.05, "baseline_image_auroc": base,
            "baseline_pixel_auroc": base + 0.1, "detector": "knn_stats", "image_reduce": "top10",
            "score_grid": 29, "baseline_grid": 29, "config": {"parameters": {"seed": seed}}, **extra}


# brick: densenet leads resnet18v2 by 0.10 at 60 epochs, seed spread 0.01: a real lead; gravel: a lead
# of 0.01 inside a spread of 0.07; screw: one seed
LADDER = [ladder_row("brick", "resnet18v2", 20, 0, 0.70), ladder_row("brick", "resnet18v2", 60, 0, 0.80),
          ladder_row("brick", "resnet18v2", 20, 1, 0.72), ladder_row("brick", "resnet18v2", 60, 1, 0.81),
          ladder_row("brick", "densenet", 20, 0, 0.75), ladder_row("brick", "densenet", 60, 0, 0.90),
          ladder_row("brick", "densenet", 20, 1, 0.77), ladder_row("brick", "densenet", 60, 1, 0.91),
          ladder_row("gravel", "resnet18v2", 60, 0, 0.60, base=0.5), ladder_row("gravel", "resnet18v2", 60, 1, 0.70, base=0.6),
          ladder_row("gravel", "densenet", 60, 0, 0.66, base=0.5), ladder_row("gravel", "densenet", 60, 1, 0.66, base=0.6),
          ladder_row("screw", "resnet18v2", 60, 0, 0.90), ladder_row("screw", "densenet", 60, 0, 0.85)]


def test_ladder_table_has_classes_as_rows_and_encoder_x_epochs_as_columns():
    lines = cu.ladder_table(LADDER).splitlines()
    assert lines[0] == "| Class | resnet18v2 e20 | resnet18v2 e60 | densenet e20 | densenet e60 | pixel floor |"
    assert lines[2] == "| brick | 0.71 ± 0.01 | 0.81 ± 0.01 | 0.76 ± 0.01 | 0.91 ± 0.01 | 0.70 |"  # floor: one per seed
    assert lines[3] == "| gravel | - | 0.65 ± 0.07 | - | 0.66 | 0.55 ± 0.07 |"  # no 20-epoch rung; equal seeds: no ±
    assert lines[4] == "| screw | - | 0.90 | - | 0.85 | 0.70 |"
    assert lines[5].startswith("| **mean tuning** | 0.71 | 0.79 | 0.76 | 0.81 | 0.65 |")
    pixel = cu.ladder_table(LADDER, "pixel_auroc").splitlines()
    assert pixel[2].endswith("| 0.80 |")  # the floor of the same metric
    chosen = [dict(r, chosen_epoch=r["epochs"] - r["config"]["parameters"]["seed"]) for r in LADDER]
    assert cu.ladder_table(chosen, "chosen_epoch", 0, each=True).splitlines()[2] == \
        "| brick | 20, 19 | 60, 59 | 20, 19 | 60, 59 |"  # every seed's epoch, in seed order; no floor


def test_ladder_table_never_pools_two_detectors_or_grids():
    with pytest.raises(ValueError, match="mix detectors"):
        cu.ladder_table(LADDER + [dict(LADDER[0], detector="cpcad")])
    with pytest.raises(ValueError, match="several grids"):
        cu.ladder_table(LADDER + [dict(LADDER[0], score_grid=15, baseline_grid=15)])


def test_encoder_verdicts_name_the_best_and_weigh_the_lead_against_the_seed_spread():
    brick, gravel, screw = cu.encoder_verdicts(LADDER)
    assert brick.startswith("brick: densenet is best at 60 epochs: image AUROC (top10 of the patch map) 0.905 "
                            "against resnet18v2's 0.805; its lead of 0.100 is larger than the seed spread")
    assert brick.endswith("; against the raw-pixel floor (0.700) the best is +0.205.")
    assert "densenet is best" in gravel and "lead of 0.010 is within the seed spread (std up to 0.071 over 2 seeds)" in gravel
    assert "resnet18v2 is best" in screw and "one seed, so whether its lead of 0.050 is larger" in screw
    # compared at the longest budget every encoder has, never at a better-scoring shorter one
    short = [r for r in LADDER if r["category"] == "brick"] + [ladder_row("brick", "resnet18v2", 100, 0, 0.5)]
    assert cu.encoder_verdicts(short)[0].startswith("brick: densenet is best at 60 epochs")
    assert cu.encoder_verdicts([LADDER[0]]) == ["brick: only resnet18v2 was run."]
    assert cu.encoder_verdicts([LADDER[0], LADDER[5]]) == [
        "brick: the encoders share no training length, so none is compared."]  # 20 vs 60 epochs


def test_cost_table_counts_each_chain_once_by_its_longest_rung():
    history = lambda n, s: [{"epoch": e, "seconds": s} for e in range(1, n + 1)]  # noqa: E731
    rows = [dict(ladder_row("brick", "resnet18v2", 20, 0, 0.7), history=history(20, 1.0), num_parameters=100,
                 embedding_dim=64, score_seconds=5.0, device="cpu", config={"model": {"width": 16}}),
            dict(ladder_row("brick", "resnet18v2", 60, 0, 0.8), history=history(20, 1.0) + history(40, 3.0),
                 num_parameters=100, embedding_dim=64, score_seconds=7.0, device="cpu", config={"model": {"width": 16}})]
    lines = cu.cost_table(rows).splitlines()
    assert lines[0].startswith("| Encoder | Encoder parameters | at width 64 | CPC-AD parameters | D | s / epoch |")
    width16 = cu.count_parameters(cu.build_encoder("resnet18v2", width=16))
    width64 = cu.count_parameters(cu.build_encoder("resnet18v2", width=64))
    # (20 x 1 s + 40 x 3 s) / 60 epochs, from the 60-epoch rung only; scoring: both rungs
    assert lines[2] == f"| resnet18v2 | {width16:,} (width 16) | {width64:,} | 100 | 64 | 2.3 | 6.0 ± 1.4 | 2 | cpu |"


def test_plot_epochs_leads_with_the_mean_and_wraps_many_categories():
    fig = cu.plot_epochs(LADDER + [dict(r, category=c) for c in ("tissue", "grass", "nut", "cable")
                                   for r in LADDER if r["category"] == "brick"], "image_auroc", max_columns=3)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown][:2] == ["mean of 5 categories", "brick (tuning half)"]
    assert len(shown) == 6 and len(fig.axes) == 6  # 1 mean + 5 categories with several budgets, 3 per row
    (mean_r18,) = [c.lines[0] for c in shown[0].containers if c.get_label() == "resnet18v2"]
    assert np.allclose(mean_r18.get_ydata(), [0.71, 0.805])


def test_chosen_epoch_is_the_best_validation_epoch():
    history = [{"epoch": 1, "val_loss": 3.0}, {"epoch": 2, "val_loss": 2.0}, {"epoch": 3, "val_loss": 2.0},
               {"epoch": 4, "val_loss": 2.5}]
    assert cu.chosen_epoch(history) == 2  # the first of equals: best.pt is replaced only by a lower loss
    assert cu.chosen_epoch([{"epoch": 1, "train_loss": 1.0}, {"epoch": 2, "train_loss": 0.5}]) == 2  # no validation


def test_summary_records_hold_the_summary_columns_with_derived_ones():
    (record,) = cu.summary_records([dict(LADDER[1], history=[{"epoch": 1, "val_loss": 1.0}, {"epoch": 2, "val_loss": 2.0}])])
    assert list(record) == list(cu.SUMMARY_COLUMNS)
    assert (record["seed"], record["epochs"], record["chosen_epoch"], record["half"]) == (0, 60, 1, "tuning")


# ---- results -------------------------------------------------------------------------

@pytest.fixture
def results_tree(tmp_path) -> Path:
    """results/<run>/<category>/<encoder>[-<epochs>]/metrics.json for ROWS."""
    run = tmp_path / "run"
    for r in ROWS:
        cu.save_json(metrics_record(**r), run / r["category"] / f"{r['encoder']}-{r['epochs_trained']}" / "metrics.json")
    return run


RECORDS = [metrics_record(**r) for r in ROWS]


def test_load_results(results_tree):
    rows = cu.load_results(results_tree)
    assert sorted(rows, key=json.dumps) == sorted(RECORDS, key=json.dumps)
    assert cu.load_results(results_tree / "nowhere") == []


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("baseline_pixel_auroc"), "missing baseline_pixel_auroc"),
    (lambda r: r.update(baseline_pixel_auroc_v2=r.pop("baseline_pixel_auroc")), "unknown baseline_pixel_auroc_v2"),
    (lambda r: r.update(schema_version=cu.SCHEMA_VERSION + 1), "schema_version"),
], ids=["missing", "renamed", "newer"])
def test_load_results_refuses_a_record_of_another_schema(results_tree, change, message):
    """A field missing or renamed fails with the file's name, not as a blank table cell."""
    path = results_tree / "brick" / "resnet18v2-2" / "metrics.json"
    record = json.loads(path.read_text())
    change(record)
    cu.save_json(record, path)
    with pytest.raises(ValueError, match=message) as e:
        cu.load_results(results_tree)
    assert str(path) in str(e.value)


def test_metrics_record_round_trips_and_every_summary_column_is_a_field():
    record = cu.read_record(metrics_record())
    assert cu.read_record(record.to_dict()) == record and set(record.to_dict()) == set(cu.record_keys())
    assert set(cu.SUMMARY_COLUMNS) <= set(cu.record_keys()) | set(cu.DERIVED_COLUMNS)
    assert set(cu.COLUMN_LEGEND) == set(cu.SUMMARY_COLUMNS)
    legacy = {k: v for k, v in record.to_dict().items() if k not in ("schema_version", "chosen_epoch")}
    assert cu.read_record(legacy).chosen_epoch == 1  # version 1: no version, chosen_epoch from the history


def test_load_results_invalid_json_names_the_file(results_tree):
    bad = results_tree / "gravel" / "broken" / "metrics.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"category": "gravel", ')
    with pytest.raises(ValueError) as e:
        cu.load_results(results_tree)
    assert str(bad) in str(e.value)
    # a caller that reports the file itself (the sweep: as a failed pair) leaves it out, and only it
    assert sorted(cu.load_results(results_tree, skip=[bad]), key=json.dumps) == sorted(RECORDS, key=json.dumps)


@pytest.mark.parametrize("content, expected", [
    (b'[{"category": "gravel"}]', "holds a JSON array, expected an object"),
    (b'"gravel"', "holds a JSON string, expected an object"),
    (b'{"category": "gravel", ', "is not valid JSON"),                 # truncated
    (b"\x80\x81 not text", "is not valid JSON"),                       # not UTF-8
], ids=["array", "string", "truncated", "not_utf8"])
def test_load_results_refuses_a_metrics_file_that_is_not_one_object(results_tree, content, expected):
    bad = results_tree / "gravel" / "broken" / "metrics.json"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(content)
    with pytest.raises(ValueError, match="metrics.json") as e:
        cu.load_results(results_tree)
    assert str(e.value).startswith(f"{bad} ") and expected in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:  # the summary command: one line naming the file, no traceback
        cu.main(["summary", str(results_tree)])
    assert str(e.value).startswith(f"python -m cpc_utils summary: {bad} ") and expected in str(e.value)


def test_summary_table():
    table = cu.summary_table(ROWS + [result_row("tissue", "resnet18v2", 5, 0.5, seed=3),
                                     result_row("cable", "densenet", 5, 0.4)])
    lines = table.strip().split("\n")
    assert lines[0] == "| " + " | ".join(cu.SUMMARY_COLUMNS) + " |"
    assert lines[0].startswith("| category | half | encoder |")  # scripts/sweep.py's tests look for these cells
    # header, rule, one line per run, one mean line per (half, encoder): tuning x 2, confirmation, MVTec ("")
    assert len(lines) == 2 + len(ROWS) + 2 + 4
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    trained = cu.SUMMARY_COLUMNS.index("epochs_trained")
    assert [c[:4] + [c[trained]] for c in cells[:6]] == [  # tuning half, confirmation half, then other categories
        ["brick", "tuning", "densenet", "", "5"], ["brick", "tuning", "resnet18v2", "", "2"],
        ["brick", "tuning", "resnet18v2", "", "5"], ["gravel", "tuning", "resnet18v2", "", "5"],
        ["tissue", "confirmation", "resnet18v2", "3", "5"], ["cable", "", "densenet", "", "5"]]
    col = cu.SUMMARY_COLUMNS.index("image_auroc")
    assert cells[1][col] == "0.80" and cells[1][cu.SUMMARY_COLUMNS.index("train_seconds")] == "12"  # no false digits
    means = {(c[1], c[2]): c for c in cells if c[0] == "**mean**"}
    assert list(means) == [("tuning", "densenet"), ("tuning", "resnet18v2"), ("confirmation", "resnet18v2"),
                           ("", "densenet")]
    assert means["tuning", "resnet18v2"][col] == f"{np.mean([0.8, 0.9, 0.6]):.2f}"
    assert means["tuning", "densenet"][col] == "0.70" and means["confirmation", "resnet18v2"][col] == "0.50"
    assert means["tuning", "resnet18v2"][cu.SUMMARY_COLUMNS.index("baseline_image_auroc")] == ""  # absent: blank


def test_summary_table_flags_a_degenerate_calibration():
    """A run whose calibration had no spread says so in the table, beside whether it learned."""
    rows = [result_row("brick", "resnet18v2", 5, 1.0, learning={"status": "ok"},
                       calibration={"status": "degenerate", "message": "no spread"}),
            result_row("gravel", "resnet18v2", 5, 0.7, learning={"status": "ok"}, calibration={"status": "ok"})]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in cu.summary_table(rows).strip().split("\n")[2:4]]
    col = cu.SUMMARY_COLUMNS.index("calibration")
    assert [(c[0], c[col]) for c in cells] == [("brick", "degenerate"), ("gravel", "ok")]


def test_every_summary_column_is_explained():
    assert list(cu.COLUMN_LEGEND) == list(cu.SUMMARY_COLUMNS) and all(cu.COLUMN_LEGEND.values())


def test_comparison_table_image_and_pixel_with_baseline_and_half_means():
    cable = result_row("cable", "resnet18v2", 5, 0.65, detector=BASE["detector"], image_reduce=BASE["image_reduce"])
    table = cu.comparison_table(COMPARED + [cable], ("image_auroc", "pixel_auroc"))
    assert table.splitlines() == [
        "| Class | Epochs | resnet18v2 | densenet | baseline |", "|---|---|---|---|---|",
        "| brick | 2 | 0.30 / 0.20 | - | 0.75 / 0.85 |",
        "| brick | 5 | 0.85 ± 0.07 / 0.75 ± 0.07 | 0.70 / 0.60 | 0.75 / 0.85 |",  # two seeds; equal baselines: no ±
        "| gravel | 5 | - | 0.60 / 0.50 | 0.75 / 0.85 |",
        "| **mean tuning** | 2 | 0.30 / 0.20 | - | 0.75 / 0.85 |",
        "| **mean tuning** | 5 | 0.85 / 0.75 | 0.65 / 0.55 | 0.75 / 0.85 |",
        "| tissue | 5 | 0.55 / 0.45 | - | 0.50 / 0.85 |",
        "| **mean confirmation** | 5 | 0.55 / 0.45 | - | 0.50 / 0.85 |",
        "| cable | 5 | 0.65 / 0.55 | - | - |",
        "| **mean** | 5 | 0.65 / 0.55 | - | - |"]
    assert cu.comparison_table(ROWS).splitlines()[0] == "| Class | Epochs | resnet18v2 | densenet |"  # no baseline


def config(row: dict, **parameters) -> dict:
    """`row` with a config as notebook 02 writes it: parameters, None where the default applies."""
    params = {"category": row["category"], "encoder": row["encoder"], "output_dir": "/out", "data_root": "/data",
              "epochs": row["epochs_trained"], "seed": row.get("seed", 0), "lr": None, **parameters}
    return {**row, "config": {"parameters": params, "train": {"lr": 0.0002}, "model": {"encoder": row["encoder"]}}}


def test_parameters_text():
    rows = [config(r) for r in COMPARED]
    text = cu.parameters_text(rows)
    shared, differ = text.strip().split("\n\n")
    assert "`lr=0.0002`" in shared  # None: the default it resolved to
    assert "`epochs=" not in shared and not any(k in text for k in ("category", "encoder", "output_dir", "data_root"))
    assert differ == "**Parameters that differ between runs**: `epochs` (2, 5); `seed` (0, 1)."
    assert "1 of 7 runs record no parameters" in cu.parameters_text(rows + [ROWS[0]])
    assert "record no parameters" in cu.parameters_text(ROWS)


@pytest.fixture
def summary_tree(tmp_path) -> Path:
    """COMPARED, with configs and one score of many digits, as results/<run>/s<seed>e<epochs>/<category>/<encoder>/."""
    run = tmp_path / "run"
    for r in COMPARED:
        r = config({**r, "image_auroc": 0.8123456789} if r["category"] == "gravel" else r, width=16)
        folder = run / f"s{r.get('seed', 0)}e{r['epochs_trained']}" / r["category"] / r["encoder"]
        cu.save_json(metrics_record(**r), folder / "metrics.json")
    return run


def test_write_summary(summary_tree):
    rows = cu.write_summary(summary_tree)
    assert len(rows) == len(COMPARED)
    text = (summary_tree / "summary.md").read_text()
    assert text.startswith("# Results of `run`\n\n6 runs of notebook 02: 3 categories (2 tuning, 1 confirmation: "
                           "brick, gravel, tissue) x 2 encoders (resnet18v2, densenet). Summary written ")
    assert "`width=16`" in text and "`seed` (0, 1)" in text
    parts = [text.index(t) for t in ("**Parameters**", "| Class | Epochs | resnet18v2 | densenet | baseline |",
                                     "| category | half | encoder |", "- `category`:", "- `train_seconds`:")]
    assert parts == sorted(parts)  # parameters, class x encoder table, every run, the legend of its columns
    assert cu.comparison_table(rows, ("image_auroc", "pixel_auroc")) in text and cu.summary_table(rows) in text
    assert all(f"- `{c}`: {cu.COLUMN_LEGEND[c]}" in text for c in cu.SUMMARY_COLUMNS)
    assert "| gravel | tuning | densenet | 0 | 5 | 5 |" in text and "0.81 |" in text and "0.812" not in text
    with open(summary_tree / "summary.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(cu.SUMMARY_COLUMNS)
    assert [r["image_auroc"] for r in table if r["category"] == "gravel"] == ["0.8123456789"]  # every digit
    assert sorted(r["seed"] for r in table) == ["0", "0", "0", "0", "0", "1"]
    for name in ("comparison.png", "epochs.png"):  # brick/resnet18v2 has two budgets: epochs.png too
        png = (summary_tree / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert not list(summary_tree.glob(".*.tmp"))
    assert not plt.get_fignums()  # the figures were closed
    shutil.rmtree(summary_tree / "s0e2")
    assert len(cu.write_summary(summary_tree)) == len(COMPARED) - 1  # its own outputs are not results
    assert not (summary_tree / "epochs.png").exists()  # one budget each now: the old epochs.png is gone


def test_tables_and_charts_never_pool_two_detectors(summary_tree):
    """Rows scored by another detector or reduction are refused in one table or chart, and a
    results tree holding both gets one table and one chart per detector."""
    pure = [{**r, "detector": "cpcad", "image_reduce": "mean"} for r in COMPARED[:2]]
    for draw in (cu.comparison_table, cu.plot_comparison):
        with pytest.raises(ValueError, match=r"mix detectors.*cpcad \(mean\): 2 rows; cpcad_knn_ms \(top10\): 6 rows"):
            draw(COMPARED + pure)
    with pytest.raises(ValueError, match="mix detectors"):
        cu.plot_epochs(COMPARED + pure)
    for r in pure:
        cu.save_json(metrics_record(**config(r, width=16)), summary_tree / "pure" / r["category"] / f"{r['encoder']}{r.get('seed', 0)}" /
                     "metrics.json")
    rows = cu.write_summary(summary_tree)
    text = (summary_tree / "summary.md").read_text()
    assert len(rows) == len(COMPARED) + 2
    groups = cu.detector_groups(rows)
    assert [len(g) for g in groups.values()] == [2, len(COMPARED)]
    for group in groups.values():
        assert cu.comparison_table(group, ("image_auroc", "pixel_auroc")) in text
    assert "### cpcad (mean)" in text and "### cpcad_knn_ms (top10)" in text
    assert {"comparison_cpcad_mean.png", "comparison_cpcad_knn_ms_top10.png"} <= {p.name for p in summary_tree.glob("*.png")}
    plt.close("all")


def test_runs_that_chose_per_class_compare_as_one_method_and_under_the_fixed_detector(tmp_path):
    """Each class chose its own detector on validation: those runs are one method (the protocol),
    never split by what each class chose, and the same runs under the one detector every class
    shares (`fixed_*`) are a second table, with the floor at that detector's reduction."""
    chosen = {"mode": "validation", "why": "highest", "candidates": []}
    rows = [metrics_record(category=c, encoder=e, detector=d, image_reduce=r, selection=chosen, image_auroc=0.9,
                           fixed_image_auroc=0.7, fixed_pixel_auroc=0.8, baseline_image_auroc=0.6,
                           baseline_image_auroc_top10=0.5)
            for c, d, r in (("brick", "pixel", "max"), ("screw", "knn_stats", "top10")) for e in ("resnet18v2", "densenet")]
    groups = cu.detector_groups(rows)
    assert list(groups) == [cu.CHOSEN, cu.FIXED] and [len(g) for g in groups.values()] == [4, 4]
    assert cu.check_one_detector(groups[cu.CHOSEN]) == cu.CHOSEN
    fixed = groups[cu.FIXED]
    assert {(r["detector"], r["image_reduce"], r["image_auroc"], r["pixel_auroc"], r["baseline_image_auroc"])
            for r in fixed} == {("knn_stats", "top10", 0.7, 0.8, 0.5)}
    for i, r in enumerate(rows):
        cu.save_json(r, tmp_path / "run" / r["category"] / f"{r['encoder']}{i}" / "metrics.json")
    cu.write_summary(tmp_path / "run")
    text = (tmp_path / "run" / "summary.md").read_text()
    assert "### chosen per class (on validation)" in text and "### knn_stats (top10)" in text
    assert "one detector for every class, knn_stats" in text and "| pixel | max | validation |" in text
    assert {"comparison.png", "comparison_knn_stats_top10.png"} <= {p.name for p in (tmp_path / "run").glob("*.png")}
    plt.close("all")


@pytest.mark.parametrize("name", ["summary.md", "summary.csv", "comparison.png", "epochs.png",
                                  "comparison_cpcad_mean.png"])
def test_write_summary_never_replaces_or_deletes_a_users_file(summary_tree, name):
    """Issue 28.3: a summary.md (or chart) of the user's in the results folder: refused before
    anything is written, kept; the summary's own files are replaced on the next call."""
    (summary_tree / name).write_bytes(b"mine")
    before = sorted(p.name for p in summary_tree.iterdir())
    with pytest.raises(FileExistsError, match=f"{summary_tree / name} is a file that cpc_utils did not write"):
        cu.write_summary(summary_tree)
    assert sorted(p.name for p in summary_tree.iterdir()) == before and (summary_tree / name).read_bytes() == b"mine"
    (summary_tree / name).unlink()
    cu.write_summary(summary_tree)
    cu.write_summary(summary_tree)  # its own files: replaced
    assert cu.written_here(summary_tree) >= {"summary.md", "summary.csv", "comparison.png"}


def test_save_figure_and_text_refuse_a_users_file_and_a_link(tmp_path):
    """What notebook 03 writes into its output folder: never over a file it did not write there,
    nor through a link; its own files are replaced."""
    fig = plt.figure()
    (tmp_path / "comparison.png").write_bytes(b"my chart")
    (tmp_path / "cost.md").symlink_to(tmp_path / "elsewhere.md")
    with pytest.raises(FileExistsError, match="comparison.png is a file that cpc_utils did not write"):
        cu.save_figure(fig, tmp_path / "comparison.png")
    with pytest.raises(FileExistsError, match="cost.md is a link that cpc_utils did not write"):
        cu.save_text_ours("table", tmp_path / "cost.md")
    assert (tmp_path / "comparison.png").read_bytes() == b"my chart" and not (tmp_path / "elsewhere.md").exists()
    for _ in range(2):
        cu.save_figure(fig, tmp_path / "epochs.png")
        cu.save_json_ours({"a": 1}, tmp_path / "comparison.json")
    assert cu.written_here(tmp_path) == {"epochs.png", "comparison.json"}
    cu.remove_ours(tmp_path / "comparison.png")
    cu.remove_ours(tmp_path / "epochs.png")
    assert (tmp_path / "comparison.png").exists() and not (tmp_path / "epochs.png").exists()


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

    monkeypatch.setattr(cpc_ad.demo, "make_demo_dataset", small)
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


# ---- the published encoder study beside the reproduced one (issue 31) -------------------

def test_the_published_study_is_the_issues_table():
    published = cu.load_published()
    assert len(published) == 27 and {p["class"] for p in published} == {"bottle", "cable", "capsule", "carpet", "grid"}
    cell = {(p["class"], p["epochs"], p["encoder"]): p["image_auroc"] for p in published}
    assert cell["bottle", 70, "densenet"] == 0.876 and cell["grid", 30, "resnet50v2"] == 0.275
    assert {e for c, e, _ in cell if c == "cable"} == {30, 55, 70} and {e for c, e, _ in cell if c == "grid"} == {30}


def test_a_bad_published_table_names_its_file_and_line(tmp_path):
    bad = tmp_path / "published.csv"
    bad.write_text("class,epochs,encoder,image_auroc\nbottle,30,vgg16,0.5\n")
    with pytest.raises(ValueError, match=r"published.csv, line 2: encoder 'vgg16'"):
        cu.load_published(bad)
    bad.write_text("class,epochs,encoder,image_auroc\nbottle,thirty,densenet,0.5\n")
    with pytest.raises(ValueError, match=r"published.csv, line 2: .*whole epochs"):
        cu.load_published(bad)


def test_published_beside_reproduced_from_a_fake_mvtec_results_tree(tmp_path):
    """Runs on MVTec-named classes are matched to the published cells by class, encoder and epochs;
    each cell shows published / mean ± std / difference, and each class says whether the ranking holds."""
    got = {"resnet18v2": 0.60, "resnet50v2": 0.70, "densenet": 0.80}  # bottle 30: the published order
    for enc, auroc in got.items():
        for seed in (0, 1):
            for category, value in (("bottle", auroc + 0.02 * seed), ("grid", 1 - auroc)):  # grid: reversed
                cu.save_json(metrics_record(category=category, encoder=enc, epochs=30, epochs_trained=30, seed=seed,
                                            cpcad_image_auroc_mean=value, image_auroc=0.9, detector="knn_stats",
                                            image_reduce="top10"),
                             tmp_path / category / enc / f"seed{seed}" / "metrics.json")
    cu.save_json(metrics_record(category="screw", encoder="densenet", epochs=30, detector="knn_stats",
                                image_reduce="top10"), tmp_path / "screw" / "densenet" / "metrics.json")  # not published
    table, verdicts = cu.published_comparison(cu.load_results(tmp_path))
    lines = table.splitlines()
    assert len(lines) == 6 and lines[2].startswith("| bottle | 30 | pure CPC-AD (mean), the study's score | "
                                                   "0.558 / 0.610 ± 0.014 / +0.052 |")
    assert "0.790 / 0.810 ± 0.014 / +0.020" in lines[2]
    assert lines[3] == "| bottle | 30 | detector `knn_stats`, image score: top10 of the patch map | " + " | ".join(
        ["- / 0.900 ± 0.000 / -"] * 3) + " |"  # the same models' headline detector beside
    assert lines[4].startswith("| grid | 30 | pure CPC-AD (mean), the study's score | 0.307 / 0.400 ± 0.000 / +0.093 |")
    assert verdicts == ["bottle, 30 epochs: published densenet > resnet50v2 > resnet18v2; reproduced densenet > "
                        "resnet50v2 > resnet18v2: the published ranking holds.",
                        "grid, 30 epochs: published densenet > resnet18v2 > resnet50v2; reproduced resnet18v2 > "
                        "resnet50v2 > densenet: the published ranking does NOT hold."]


def test_on_other_data_the_comparison_says_why_there_is_nothing_to_compare():
    rows = [metrics_record(category="brick", encoder="densenet", epochs=40, cpcad_image_auroc_mean=0.6)]
    table, verdicts = cu.published_comparison([cu.read_record(r).to_dict() for r in rows])
    assert table == "" and verdicts[0].startswith("Nothing to compare with: the published study has MVTec AD's "
                                                  "bottle, cable, capsule, carpet, grid at 30/55/70 epochs")
    assert "brick (40 epochs)" in verdicts[0]


def test_without_the_published_table_beside_the_package_the_comparison_says_so(monkeypatch, tmp_path):
    import cpc_ad.report
    monkeypatch.setattr(cpc_ad.report, "PUBLISHED_STUDY", tmp_path / "published_study.csv")  # an installed wheel
    table, verdicts = cu.published_comparison([])
    assert table == "" and "published_study.csv) is not beside this installation" in verdicts[0]
