"""The MVTec AD metrics (image AUROC, F1-max, pixel AUROC, AUPRO, AUROC per defect type) and
decision thresholds chosen on normal validation images only."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

from .data import ImageSet
from .checks import check_param
from .patches import PatchGrid, patches_to_pixels
from .scoring import image_scores


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 over all thresholds."""
    from sklearn.metrics import precision_recall_curve
    p, r, _ = precision_recall_curve(labels, scores)
    return float(np.max(2 * p * r / np.clip(p + r, 1e-12, None)))


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoidal integral: np.trapezoid from NumPy 2, np.trapz before it (numpy>=1.24 is allowed)."""
    trapezoid = getattr(np, "trapezoid", None) or np.trapz
    return float(trapezoid(y, x))


def aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3, num_thresholds: int = 1000) -> float:
    """Area under the per-region-overlap curve up to `max_fpr`, divided by `max_fpr` (MVTec AD).

    PRO at a threshold is the mean, over every connected defect region of every image, of
    the fraction of that region above the threshold; FPR is the fraction of normal pixels
    above it. Thresholds are placed at the normal-pixel quantiles for FPR 0..max_fpr.

    Args: masks (N, H, W) bool, maps (N, H, W) float.
    """
    from skimage.measure import label
    masks, maps = np.asarray(masks).astype(bool), np.asarray(maps, dtype=np.float64)
    normal = np.sort(maps[~masks])
    regions = []
    for m, s in zip(masks, maps):
        lab = label(m, connectivity=2)
        regions += [np.sort(s[lab == r]) for r in range(1, lab.max() + 1)]
    if not regions or not len(normal):
        raise ValueError("AUPRO needs at least one defect region and one normal pixel")
    thresholds = np.quantile(normal, 1 - np.linspace(0, max_fpr, num_thresholds))
    # one more just below the next normal score down, so the curve always reaches past
    # max_fpr to interpolate to (with tied scores, e.g. a binary map, the FPR jumps over it)
    below = normal[np.searchsorted(normal, thresholds[-1], side="right") - 1]
    thresholds = np.concatenate([[np.inf], thresholds, [np.nextafter(below, -np.inf)]])
    fpr = 1 - np.searchsorted(normal, thresholds, side="right") / len(normal)
    pro = np.mean([1 - np.searchsorted(r, thresholds, side="right") / len(r) for r in regions], axis=0)
    keep = fpr <= max_fpr
    f, p = fpr[keep], pro[keep]
    if f[-1] < max_fpr:  # close the curve exactly at max_fpr by linear interpolation
        nxt = np.argmax(fpr > max_fpr)
        f = np.append(f, max_fpr)
        p = np.append(p, np.interp(max_fpr, [fpr[nxt - 1], fpr[nxt]], [pro[nxt - 1], pro[nxt]]))
    return _trapezoid(p, f) / max_fpr


def compute_metrics(labels: torch.Tensor | np.ndarray, scores: torch.Tensor | np.ndarray,
                    masks: torch.Tensor | np.ndarray | None = None,
                    pixel_maps: torch.Tensor | np.ndarray | None = None) -> dict[str, float]:
    """Image AUROC and F1-max; with masks and maps also pixel AUROC and AUPRO.

    Args: labels (N,), scores (N,), masks (N, 1, H, W) bool, pixel_maps (N, 1, H, W).
    """
    from sklearn.metrics import roc_auc_score
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise ValueError("anomaly scores contain NaN or infinity")
    if len(np.unique(labels)) < 2:
        raise ValueError("the test set needs both normal and anomalous images to compute AUROC")
    out = {"image_auroc": float(roc_auc_score(labels, scores)), "image_f1_max": f1_max(labels, scores)}
    if masks is not None and pixel_maps is not None:
        m = np.asarray(masks).reshape(len(labels), *np.asarray(masks).shape[-2:]).astype(bool)
        s = np.asarray(pixel_maps, dtype=np.float32).reshape(m.shape)
        out["pixel_auroc"] = float(roc_auc_score(m.ravel(), s.ravel()))
        out["aupro"] = aupro(m, s)
    return out


def evaluate_maps(patch_maps: torch.Tensor, test: ImageSet, grid: PatchGrid,
                  reduces: Iterable[str] = ("mean", "max")) -> dict:
    """All metrics of one method from its patch maps; the first of `reduces` is the headline.

    Returns {"metrics": {image_auroc, image_f1_max, pixel_auroc, aupro, image_auroc_<reduce>...},
             "scores": {reduce: (N,)}, "pixel_maps": (N, 1, H, W)}; pixel_auroc and aupro are
             None for images labelled per image only (`ImageSet.pixel_labels` False).
    """
    reduces = list(reduces)
    pixel_maps = patches_to_pixels(patch_maps, grid)
    scores = {r: image_scores(patch_maps, r) for r in reduces}
    if test.pixel_labels:
        metrics = compute_metrics(test.labels, scores[reduces[0]], test.masks, pixel_maps)
    else:  # no ground truth to measure pixels against: not available, never a number
        metrics = {**compute_metrics(test.labels, scores[reduces[0]]), "pixel_auroc": None, "aupro": None}
    for r in reduces:
        m = compute_metrics(test.labels, scores[r])
        metrics[f"image_auroc_{r}"], metrics[f"image_f1_max_{r}"] = m["image_auroc"], m["image_f1_max"]
    return {"metrics": metrics, "scores": scores, "pixel_maps": pixel_maps}


def per_defect_auroc(labels_defects: Sequence[str], scores: torch.Tensor) -> dict[str, float]:
    """Image AUROC of each defect type against the good test images."""
    from sklearn.metrics import roc_auc_score
    defects = np.asarray(labels_defects)
    s = np.asarray(scores)
    good = defects == "good"
    return {d: float(roc_auc_score(np.r_[np.zeros(good.sum()), np.ones((defects == d).sum())],
                                   np.r_[s[good], s[defects == d]]))
            for d in sorted(set(defects) - {"good"})}


def normal_threshold(scores: torch.Tensor | np.ndarray, target_fpr: float = 0.01, what: str = "scores") -> dict:
    """A decision threshold from normal data alone: at most `target_fpr` of `scores` lie above it.

    `scores` are those of held-out normal images (validation normals: neither trained on nor
    used to calibrate) or their pixels; the verdict is "anomalous" when a score is > the
    threshold. With n scores it is the (m+1)-th highest, m = floor(target_fpr * n) (the
    conservative "higher" quantile), so the FPR on these normals is m / n <= target_fpr.
    On *new* normal images the expected FPR is (m + 1) / (n + 1) (a new normal image is equally
    likely to rank anywhere among the n + 1): with fewer than 1 / target_fpr normals (the demo
    holds out about 8) the threshold is the highest normal score and the expected FPR is
    1 / (n + 1), not target_fpr. The returned rule says so ("expected_fpr"); no margin is
    added, as any margin would be a guess: hold out more normals to reach a low FPR.

    For pixels (a pixel map's values) the same rule holds over all normal pixels; they are
    not independent draws (neighbours share patches), so read their expected_fpr as rough.

    Returns {"rule", "target_fpr", "value", "n_normals" (how many normal scores: images or
             pixels), "fpr_on_normals", "expected_fpr", "median"} ("median": the normals'
             median, a reference for colour scales).
    """
    check_param("target_fpr", target_fpr, "float", low=0, high=0.5, open_low=True)
    s = np.sort(np.asarray(torch.as_tensor(scores).double().flatten()))[::-1]  # highest first; float32 scores stay exact
    if not len(s) or not np.isfinite(s).all():
        raise ValueError(f"a threshold needs finite normal {what}, got {len(s)} values"
                         + ("" if np.isfinite(s).all() else " with NaN or infinity"))
    m = int(math.floor(target_fpr * len(s) + 1e-9))
    m = min(m, len(s) - 1)
    value = float(s[m])
    return {"rule": f"the (m+1)-th highest of the validation normals' {what}, m = floor(target_fpr * n): "
                    "anomalous when above", "target_fpr": float(target_fpr), "value": value, "n_normals": len(s),
            "fpr_on_normals": float((s > value).mean()), "expected_fpr": (m + 1) / (len(s) + 1),
            "median": float(np.median(s))}


def threshold_metrics(labels: torch.Tensor | np.ndarray, scores: torch.Tensor | np.ndarray,
                      threshold: float) -> dict[str, float]:
    """Precision, recall and false-positive rate of the verdict `score > threshold`.

    Args: labels (N,) or masks (N, 1, H, W), 1 / True = anomalous; scores of the same shape
    (image scores or pixel maps). A rate with an empty denominator is None.
    """
    y = np.asarray(torch.as_tensor(labels)).astype(bool).ravel()
    pred = np.asarray(torch.as_tensor(scores).double()).ravel() > threshold
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    rate = lambda a, b: a / b if b else None  # noqa: E731
    return {"precision": rate(tp, tp + fp), "recall": rate(tp, int(y.sum())), "fpr": rate(fp, int((~y).sum())),
            "true_positives": tp, "false_positives": fp}


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for a single run)."""
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)
