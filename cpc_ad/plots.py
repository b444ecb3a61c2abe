"""Figures: each function returns a matplotlib Figure, so notebooks show it and scripts save it."""
from __future__ import annotations

import os
import textwrap
from typing import Iterable, Sequence

import numpy as np
import torch

from .files import save_ours
from .data import ImageSet
from .encoders import ENCODERS
from .metrics import _mean_std
from .probes import PROBE_FEATURES, PROBE_METRICS
from .scoring import FIXED
from .schema import _budget, _category_order, _encoder_order, _floor, _group, _half, _seed


# Each returns a matplotlib Figure, so notebooks show it and scripts save it.

def _figure(*args, **kw):
    import matplotlib.pyplot as plt
    return plt.subplots(*args, **kw)


HEATMAP_CMAP = "inferno"       # perceptual: brightness grows with the score
GROUND_TRUTH_COLOUR = "cyan"   # the defect outline, visible on inferno and on most photographs
NORMAL_COLOUR, ANOMALOUS_COLOUR = "C0", "C3"
STRIP_MAX_IMAGES = 200         # above this a strip plot of every image is a blur


def plot_training_curves(history: list[dict], title: str = "") -> "matplotlib.figure.Figure":
    """Is the model learning? Train and validation loss per epoch (and CPC's per-step accuracy).
    With defect-aware training (a "defect_bce" in every epoch) the train curve is its InfoNCE part,
    comparable with the validation loss and chance, and the defect head's BCE is drawn beside."""
    has_acc = "acc_per_step" in history[0]
    fig, axes = _figure(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5, 3.5), squeeze=False)
    epochs = [h["epoch"] for h in history]
    ax = axes[0, 0]
    bce = [h.get("defect_bce") for h in history]
    defect_aware = all(b is not None for b in bce)  # its training loss is InfoNCE + the defect head's BCE
    ax.plot(epochs, [h["train_loss"] - (b if defect_aware else 0) for h, b in zip(history, bce)], "o-",
            label="train")
    if "val_loss" in history[0]:
        ax.plot(epochs, [h["val_loss"] for h in history], "s-", label="validation")
    if defect_aware:
        ax.plot(epochs, bce, "^:", color="tab:green", label="train: defect head BCE")
    ax.set(xlabel="epoch", ylabel="InfoNCE loss" + (" (and BCE)" if defect_aware else ""), title=title or "training")
    ax.legend()
    if has_acc:
        acc = np.array([h["acc_per_step"] for h in history])
        for k in range(acc.shape[1]):
            axes[0, 1].plot(epochs, acc[:, k], "o-", label=f"k = {k + 1}")
        axes[0, 1].set(xlabel="epoch", ylabel="training accuracy (positive ranked first)", ylim=(0, 1))
        axes[0, 1].legend()
    fig.tight_layout()
    return fig


def plot_prediction_accuracy(runs: list[dict], title: str = "") -> "matplotlib.figure.Figure":
    """Does CPC predict *where*, or only *which image*? Accuracy per step k with negatives from
    the batch and from the same image only (and, where the runs have it, the same-image accuracy
    at random initialisation), mean and std over seeds, each with its chance."""
    fig, ax = _figure(figsize=(5, 3.5))
    for name, label, colour in (("batch", "negatives from the batch", "tab:blue"),
                                ("image", "negatives from the same image only", "tab:red"),
                                ("image_random_init", "same image, random init", "tab:gray")):
        if name not in runs[0]:
            continue
        acc = np.array([r[name]["acc_per_step"] for r in runs])          # (seeds, K)
        k = np.arange(1, acc.shape[1] + 1)
        ax.errorbar(k, acc.mean(0), yerr=acc.std(0, ddof=1) if len(acc) > 1 else None, fmt="o-", color=colour,
                    capsize=3, label=label)
        ax.axhline(runs[0][name]["chance_accuracy"], color=colour, ls=":", lw=1)
    ax.set(xlabel="step k (rows below the skipped ones)", ylabel="accuracy (dotted: chance)", ylim=(0, 1),
           xticks=k, title=title or "CPC prediction accuracy, held-out images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_probes(runs: list[dict], title: str = "") -> "matplotlib.figure.Figure":
    """Did training help? The patch probes' AUROC for the trained encoder, the same encoder at
    random initialisation and raw pixels, mean and std over seeds; 0.5 is chance."""
    fig, ax = _figure(figsize=(8.5, 3.5))
    names = [f for f in PROBE_FEATURES if f in runs[0]]
    x, w = np.arange(len(PROBE_METRICS)), 0.8 / len(names)
    colours = {"trained": "tab:blue", "random": "tab:gray", "trained_z": "lightskyblue", "random_z": "lightgray",
               "pixel": "tab:orange"}
    for i, f in enumerate(names):
        values = np.array([[r[f][m] for m in PROBE_METRICS] for r in runs])   # (seeds, metrics)
        ax.bar(x + (i - (len(names) - 1) / 2) * w, values.mean(0), w,
               yerr=values.std(0, ddof=1) if len(values) > 1 else None, capsize=3, color=colours.get(f),
               label=PROBE_FEATURES[f])
    ax.axhline(0.5, color="black", ls=":", lw=1)
    ax.set(xticks=x, xticklabels=[v.replace(", ", "\n") for v in PROBE_METRICS.values()], ylim=(0, 1), ylabel="AUROC",
           title=title or f"frozen features, {len(runs)} seed(s)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1, 0.5))  # beside the bars, never over them
    fig.tight_layout()
    return fig


def plot_roc(curves: dict[str, tuple], title: str = "ROC") -> "matplotlib.figure.Figure":
    """How do the detectors trade false alarms for misses? ROC curves {name: (labels, scores)}
    on one axis, AUROC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve
    fig, ax = _figure(figsize=(4.5, 4.5))
    for name, (y, s) in curves.items():
        fpr, tpr, _ = roc_curve(np.asarray(y).ravel(), np.asarray(s).ravel())
        ax.plot(fpr, tpr, label=f"{name} ({roc_auc_score(np.asarray(y).ravel(), np.asarray(s).ravel()):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def _defect_order(defect_types: Sequence[str]) -> list[str]:
    """"good" first, then the defect types alphabetically."""
    return sorted(set(defect_types), key=lambda d: (d != "good", d))


def plot_score_histogram(labels, scores, title: str = "image scores", threshold: float | None = None,
                         defect_types: Sequence[str] | None = None) -> "matplotlib.figure.Figure":
    """Do the image scores separate normal from anomalous test images?

    Histograms of both classes over the same bin edges (so bar heights compare), the decision
    `threshold` as a vertical line when given, and with `defect_types` (one per image) and at
    most STRIP_MAX_IMAGES images a second panel: every image's score by defect type ("good"
    first, jittered), which shows the defect types that overlap the normal images.
    """
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if defect_types is not None and len(defect_types) != len(scores):
        raise ValueError(f"{len(defect_types)} defect types for {len(scores)} scores")
    strip = defect_types is not None and len(scores) <= STRIP_MAX_IMAGES
    n_types = len(set(defect_types)) if strip else 0
    fig, axes = _figure(2 if strip else 1, 1, figsize=(6, 3.2 + (1 + 0.3 * n_types if strip else 0)),
                        squeeze=False, sharex=True, layout="constrained",
                        height_ratios=[3.2, 1 + 0.3 * n_types] if strip else None)
    ax = axes[0, 0]
    bins = np.histogram_bin_edges(scores, 20)  # one set of edges for both classes
    for label, name, colour in ((0, "normal", NORMAL_COLOUR), (1, "anomalous", ANOMALOUS_COLOUR)):
        ax.hist(scores[labels == label], bins, alpha=0.6, color=colour, label=f"{name} ({(labels == label).sum()})")
    ax.set(ylabel="test images", title=title)
    if strip:
        _score_strip(axes[1, 0], scores, list(defect_types))
    axes[-1, 0].set_xlabel("image anomaly score (higher: more anomalous)")
    if threshold is not None:
        for a in axes[:, 0]:
            a.axvline(threshold, color="k", ls="--", lw=1.2, label=f"threshold {threshold:.3g}")
    ax.legend(fontsize=8)
    return fig


def _score_strip(ax, scores: np.ndarray, defect_types: list[str]) -> None:
    """One row of jittered points per defect type, "good" on top."""
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(scores))  # own generator: global RNGs untouched
    order = _defect_order(defect_types)
    types = np.asarray(defect_types)
    for y, d in enumerate(order):
        ax.scatter(scores[types == d], y + jitter[types == d], s=14, alpha=0.8,
                   color=NORMAL_COLOUR if d == "good" else ANOMALOUS_COLOUR)
    ax.set_yticks(range(len(order)), [f"{d} ({(types == d).sum()})" for d in order])
    ax.set_ylim(len(order) - 0.5, -0.5)
    ax.set(ylabel="defect type (images)")


def plot_heatmaps(test: ImageSet, pixel_maps: torch.Tensor, index: Sequence[int],
                  titles: Sequence[str] | None = None, scores=None) -> "matplotlib.figure.Figure":
    """Where does the detector see the anomaly, and is that where the defect is?

    One row per image in `index`: the image and its anomaly map, with the ground-truth
    defect outlined on the map. One colour scale (min..max of all `pixel_maps`) and one colour
    bar for every row, so colours compare across rows. `titles`, one per row (default
    "<defect type> #<index>"); with `scores` (N,) each title gets the image score.
    """
    maps = torch.as_tensor(pixel_maps).float()[:, 0].numpy()  # (N, H, W)
    vmin, vmax = float(maps.min()), float(maps.max())
    fig, axes = _figure(len(index), 2, figsize=(6.4, 0.8 + 2.9 * len(index)), squeeze=False, layout="constrained")
    for row, i in enumerate(index):
        img, mask = test.images[i].permute(1, 2, 0).numpy(), test.masks[i, 0].numpy()
        title = titles[row] if titles else f"{test.defect_types[i]} #{i}"
        title += f", score {float(scores[i]):.3g}" if scores is not None else ""
        axes[row, 0].imshow(img)
        axes[row, 0].set_title(title, fontsize=9)
        h, w = mask.shape  # a map of another size is stretched over the image
        im = axes[row, 1].imshow(maps[i], cmap=HEATMAP_CMAP, vmin=vmin, vmax=vmax,
                                 extent=(-0.5, w - 0.5, h - 0.5, -0.5))
        axes[row, 1].set_title("anomaly map", fontsize=9)
        if mask.any():  # on the map only: on the image an outline would hide a thin defect
            axes[row, 1].contour(mask, levels=[0.5], colors=GROUND_TRUTH_COLOUR, linewidths=1.5)
        for ax in axes[row]:
            ax.set_axis_off()
    fig.colorbar(im, ax=axes[:, 1].tolist(), label="pixel anomaly score (one scale for all rows)", shrink=0.9)
    fig.suptitle(f"Where does the detector see the anomaly? Ground truth outlined in {GROUND_TRUTH_COLOUR}",
                 fontsize=10)
    return fig


def _encoder_colours(encoders: Iterable[str]) -> dict[str, str]:
    """A fixed colour per encoder, registry order first, so every figure agrees."""
    names = list(ENCODERS) + sorted(set(encoders) - set(ENCODERS))
    return {e: f"C{i % 10}" for i, e in enumerate(names)}


def _metric_label(rows: list[dict], metric: str) -> str:
    """The y label in words: "image AUROC (top10 of the patch map)", "pixel AUROC", ..."""
    words = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO (to 30% FPR)",
             "image_f1_max": "image F1-max"}.get(metric, metric)
    reduces = sorted({r["image_reduce"] for r in rows if r.get("image_reduce")})
    if metric.startswith("image_") and reduces:
        words += f" ({' / '.join(reduces)} of the patch map)"
    return words


CHOSEN = ("chosen per class", "on validation")  # the group of runs that chose their detector on validation


def method_of(row: dict) -> tuple[str | None, str | None]:
    """How a run's headline was scored: CHOSEN when its class chose the detector and reduction on
    its own validation set (`selection`; the protocol is the method, the `detector` column says
    what each class chose), else its (detector, image reduction)."""
    if (row.get("selection") or {}).get("mode") == "validation":
        return CHOSEN
    return row.get("detector"), row.get("image_reduce")


def fixed_view(row: dict) -> dict:
    """A run as scored by the one detector every class shares (FIXED, the record's `fixed_*`), its
    raw-pixel floor with the same reduction: encoders compared like for like on every class."""
    detector, reduce = FIXED
    return {**row, "detector": detector, "image_reduce": reduce, "selection": {"mode": "fixed"},
            **{m: row.get(f"fixed_{m}") for m in ("image_auroc", "image_f1_max", "pixel_auroc", "aupro")},
            "baseline_image_auroc": row.get(f"baseline_image_auroc_{reduce}")}


def method_suffix(method: tuple, n_groups: int) -> str:
    """The file-name suffix of a method's tables and charts: none for CHOSEN (the headline) or a
    tree's only method, else "_<detector>_<reduce>"."""
    return "" if n_groups == 1 or method == CHOSEN else f"_{method[0]}_{method[1]}"


def method_label(method: tuple) -> str:
    """A method in words, for headings."""
    if method == CHOSEN:
        return "each class's own detector and image score, chosen on its validation set"
    return f"detector `{method[0]}`, image score: {method[1]} of the patch map"


def check_one_detector(rows: list[dict]) -> tuple[str | None, str | None]:
    """The one method (`method_of`: a (detector, image reduction), or CHOSEN) that every row was
    scored with; an error when rows mix them, since a table or chart that pools two detectors in
    one column compares methods, not encoders (filter the rows by `detector` and `image_reduce`,
    or take `detector_groups`)."""
    kinds = sorted({method_of(r) for r in rows}, key=str)
    if len(kinds) > 1:
        found = "; ".join(f"{d or 'unnamed'} ({m or 'unnamed'}): {sum(method_of(r) == (d, m) for r in rows)} rows"
                          for d, m in kinds)
        raise ValueError(f"the rows mix detectors or image reductions ({found}); compare one at a time: "
                         "filter the rows by their 'detector' and 'image_reduce'")
    return kinds[0] if kinds else (None, None)


def detector_groups(rows: list[dict], fixed: bool = True) -> dict[tuple, list[dict]]:
    """{method (`method_of`): its rows}, the groups a table or chart may compare within. With
    `fixed`, the runs that chose per class also form the group of the detector every class shares
    (FIXED, `fixed_view`), so encoders compare both ways."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(method_of(r), []).append(r)
    if fixed:
        for r in out.get(CHOSEN, []):
            if r.get("fixed_image_auroc") is not None:  # schema 4 on: recorded beside the choice
                out.setdefault(FIXED, []).append(fixed_view(r))
    return dict(sorted(out.items(), key=lambda kv: (kv[0] != CHOSEN, str(kv[0]))))


def _half_separators(ax, halves: list[str], label: bool) -> None:
    """Dotted lines between the demo halves along x; with `label`, each half named above the axes."""
    starts = [i for i, h in enumerate(halves) if i == 0 or h != halves[i - 1]] + [len(halves)]
    if starts == [0, len(halves)] and not halves[0]:
        return  # MVTec AD categories only: no halves
    for a, b in zip(starts, starts[1:]):
        if a:
            ax.axvline(a - 0.5, color="gray", ls=":", lw=1)
        if label:
            ax.text((a + b - 1) / 2, 1.02, f"{halves[a]} half" if halves[a] else "other categories",
                    transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=9, color="dimgray")


def plot_comparison(rows: list[dict], metrics: str | Sequence[str] = ("image_auroc", "pixel_auroc")
                    ) -> "matplotlib.figure.Figure":
    """Which encoder detects anomalies best in each category, and does it beat the raw-pixel baseline?

    Grouped bars (rows from `load_results`): one group per category (tuning half, then
    confirmation half, then other categories), one bar per encoder (registry order), one panel
    per metric; a black line over each group marks the raw-pixel baseline (`baseline_<metric>`),
    a dashed line chance (0.5). Runs sharing a cell (seeds) are averaged, with a ± std error
    bar. Where a (category, encoder) has several epoch budgets only the longest is drawn
    (`plot_epochs` draws them all).
    """
    import matplotlib.ticker as mticker
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    if not rows:
        raise ValueError("no results to plot")
    check_one_detector(rows)
    longest: dict[tuple, float] = {}
    for r in rows:
        key = (r["category"], r["encoder"])
        longest[key] = max(longest.get(key, -1), _budget(r) or 0)
    shown = [r for r in rows if (_budget(r) or 0) == longest[r["category"], r["encoder"]]]
    categories = _category_order(shown)
    halves = [_half(next(r for r in shown if r["category"] == c)) for c in categories]
    encoders = _encoder_order(shown)
    colour = _encoder_colours(encoders)
    width = 0.8 / len(encoders)
    fig, axes = _figure(len(metrics), 1, figsize=(max(6.5, 1.5 + 0.3 * len(categories) * (len(encoders) + 1)),
                                                  1.2 + 3 * len(metrics)),
                        squeeze=False, sharex=True, sharey=True, layout="constrained")
    low = 0.4  # the y axis starts here, or lower to show every bar
    has_base = False
    for ax, metric in zip(axes[:, 0], metrics):
        cells = _group(shown, metric, lambda r: (r["category"], r["encoder"]))
        for j, enc in enumerate(encoders):
            at = [i for i, c in enumerate(categories) if (c, enc) in cells]
            mean, std = np.array([_mean_std(cells[categories[i], enc]) for i in at]).reshape(-1, 2).T
            x = np.array(at) + (j - (len(encoders) - 1) / 2) * width
            ax.bar(x, mean, width, color=colour[enc], label=enc)
            if std.any():
                ax.errorbar(x[std > 0], mean[std > 0], std[std > 0], fmt="none", ecolor="k", elinewidth=1, capsize=2)
            low = min([low, *(mean - std - 0.05)])
        base = _group(shown, f"baseline_{metric}", lambda r: r["category"])
        if base:
            at = np.array([i for i, c in enumerate(categories) if c in base])
            y = [np.mean(base[categories[i]]) for i in at]
            ax.hlines(y, at - 0.45, at + 0.45, colors="k", lw=2.5, label="raw-pixel baseline")
            low, has_base = min(low, min(y) - 0.05), True
        ax.axhline(0.5, color="gray", ls="--", lw=1, label="chance (0.5)")
        ax.set_ylabel(_metric_label(shown, metric))
        ax.yaxis.set_major_locator(mticker.MultipleLocator(0.1))
        _half_separators(ax, halves, label=ax is axes[0, 0])
    axes[0, 0].set_ylim(max(0.0, np.floor(low * 20) / 20), 1.01)  # 1.01: a line at 1.0 stays visible
    axes[-1, 0].set_xticks(range(len(categories)), categories, rotation=30 if len(categories) > 8 else 0)
    axes[-1, 0].set_xlabel("category")
    _figure_legend(fig, axes, encoders)
    question = "Which encoder detects anomalies best" + (", and does it beat the raw-pixel baseline" if has_base else "")
    chars = int(fig.get_figwidth() * 12)  # what fits across the figure at font size 11
    fig.suptitle("\n".join(textwrap.fill(line, chars) for line in
                           (f"{question}?", f"test AUROC by category and encoder{_run_description(shown)}")), fontsize=11)
    return fig


def _figure_legend(fig, axes, encoders: list[str]) -> None:
    """One legend below all panels: the encoders in registry order, then the reference lines."""
    handles = {}
    for ax in axes.ravel():
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    order = [e for e in encoders if e in handles] + [k for k in handles if k not in encoders]
    fig.legend([handles[k] for k in order], order, loc="outside lower center", ncols=min(len(order), 5), fontsize=9)


def _run_description(rows: list[dict]) -> str:
    """": detector cpcad_knn_ms, 40 epochs, mean ± std of 3 seeds" from what the rows share."""
    parts = []
    detectors = sorted({r["detector"] for r in rows if r.get("detector")})
    if detectors:
        parts.append("detector " + " / ".join(detectors))
    budgets = sorted({_budget(r) for r in rows if _budget(r) is not None})
    if budgets:
        parts.append(f"{' / '.join(map(str, budgets))} epochs")
    cells: dict[tuple, int] = {}
    for r in rows:
        key = (r["category"], r["encoder"], _budget(r))
        cells[key] = cells.get(key, 0) + 1
    runs = max(cells.values())
    if runs > 1:
        parts.append(f"mean ± std of up to {runs} runs")
    return ": " + ", ".join(parts) if parts else ""


def has_epoch_series(rows: list[dict]) -> bool:
    """Whether some (category, encoder) was run with several epoch budgets (`plot_epochs` applies)."""
    budgets: dict[tuple, set] = {}
    for r in rows:
        budgets.setdefault((r["category"], r["encoder"]), set()).add(_budget(r))
    return any(len(b) > 1 for b in budgets.values())


def plot_epochs(rows: list[dict], metrics: str | Sequence[str] = ("image_auroc", "pixel_auroc"),
                max_columns: int = 4) -> "matplotlib.figure.Figure":
    """Does training longer help? `metrics` against the epoch budget, one line per encoder.

    One panel per category that has several budgets and per metric (a metric's panels in rows
    of up to `max_columns`, so 15 MVTec AD classes stay readable); runs sharing a point (seeds)
    are averaged, with a ± std error bar; the raw-pixel floor, which does not train, is a
    horizontal black line.
    """
    import matplotlib.ticker as mticker
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    check_one_detector(rows)
    series = [c for c in _category_order(rows) if has_epoch_series([r for r in rows if r["category"] == c])]
    if not series:
        raise ValueError("every (category, encoder) has one epoch budget: nothing to draw against epochs")
    colour = _encoder_colours(r["encoder"] for r in rows)
    panels = {c: [r for r in rows if r["category"] == c] for c in series}
    means = _category_means(rows, series, metrics) if len(series) > 1 else []
    if means:  # the headline first: each encoder's mean over the categories
        panels = {f"mean of {len(series)} categories": means, **panels}
    ncols = min(len(panels), max_columns)
    per_metric = -(-len(panels) // ncols)  # rows of panels per metric
    fig, axes = _figure(len(metrics) * per_metric, ncols, figsize=(max(5.5, 1 + 3.2 * ncols),
                                                                   1.2 + 2.8 * len(metrics) * per_metric),
                        squeeze=False, sharey="row", layout="constrained")
    for m, metric in enumerate(metrics):
        for i, (cat, sel) in enumerate(panels.items()):
            ax = axes[m * per_metric + i // ncols, i % ncols]
            encoders = _encoder_order(sel)
            budgets = [b for b in (_budget(r) for r in sel) if b is not None]
            dodge = 0.012 * (max(budgets) - min(budgets)) if budgets else 0  # error bars side by side, not on top
            for j, enc in enumerate(encoders):
                points = _group([r for r in sel if r["encoder"] == enc], metric, _budget)
                x = sorted(points)
                mean, std = np.array([_mean_std(points[b]) for b in x]).reshape(-1, 2).T
                ax.errorbar(np.array(x, dtype=float) + (j - (len(encoders) - 1) / 2) * dodge, mean,
                            std if std.any() else None, fmt="o-", color=colour[enc], capsize=2, label=enc)
            base = _floor(sel, metric)
            if base:
                ax.axhline(np.mean(base), color="k", lw=1.5, label="raw-pixel baseline")
            ax.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))
            ax.set_title(f"{cat} ({_half(sel[0])} half)" if _half(sel[0]) else cat, fontsize=10)
            if i + ncols >= len(panels):  # the last panel of its column
                ax.set_xlabel("training epochs (asked for)")
            if i % ncols == 0:
                ax.set_ylabel(_metric_label(sel, metric))
        for i in range(len(panels), per_metric * ncols):  # empty places of the last row
            axes[m * per_metric + i // ncols, i % ncols].set_visible(False)
    _figure_legend(fig, axes, _encoder_order(rows))
    fig.suptitle("Does training longer help? Test AUROC against the training epochs", fontsize=11)
    return fig


def _category_means(rows: list[dict], categories: list[str], metrics: Sequence[str]) -> list[dict]:
    """Rows of a pseudo-category: per (encoder, epochs, seed) present in every one of
    `categories`, the mean of each metric and its baseline over them."""
    keys = [(r["encoder"], _budget(r), _seed(r)) for r in rows]
    out = []
    for key in sorted(set(keys), key=str):
        sel = [r for r, k in zip(rows, keys) if k == key and r["category"] in categories]
        if {r["category"] for r in sel} != set(categories):
            continue
        row = {"category": "mean", "half": "", "encoder": key[0], "epochs": key[1], "seed": key[2],
               "detector": sel[0].get("detector"), "image_reduce": sel[0].get("image_reduce"),
               "selection": sel[0].get("selection")}
        for m in (*metrics, *(f"baseline_{m}" for m in metrics)):
            values = [r[m] for r in sel if r.get(m) is not None]
            row[m] = float(np.mean(values)) if len(values) == len(sel) else None
        out.append(row)
    return out


def save_figure(fig, path: str | os.PathLike, tight: bool = True, close: bool = False) -> None:
    """Write `fig` as PNG (100 dpi; `tight`: cropped to what is drawn) into a folder shared with
    the user (a results folder, notebook 03's output): atomically, and never over a file the
    project did not write there (`save_ours`). `close`: close it after (not for a notebook,
    which shows it when the cell ends)."""
    import matplotlib.pyplot as plt
    save_ours(fig, path, lambda f, out: f.savefig(out, format="png", dpi=100, bbox_inches="tight" if tight else None))
    if close:
        plt.close(fig)
