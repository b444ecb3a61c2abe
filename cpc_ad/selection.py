"""Each class chooses its own detector and reduction on its own validation set, never on test/.

A choice fixed once on the demo did not transfer to classes nobody tuned on: the learned
detector beat raw pixels on some textures and lost to them by 0.2 image AUROC on others, and the
best reduction differed too (results/study/README.md). So `run_cpcad` scores every candidate
(`ScoringConfig.detectors` x `ScoringConfig.reduces`) on the class's validation set (held-out
normals with synthetic anomalies) and keeps one, by a criterion and a tie rule fixed in advance:

  * criterion: the mean of validation image AUROC (with the candidate's reduction) and
    validation AUPRO (of its pixel map): finding the image and finding the defect in it;
  * spread: the bootstrap standard error of the best candidate's criterion over the validation
    images (resampled within normals and anomalies);
  * tie rule: among the candidates within one spread of the best, the one with the fewest
    parts (score kinds, `DETECTOR_PARTS`) wins, then the higher criterion: a difference the
    validation set cannot resolve is not a reason to add a part (the one-standard-error rule).
"""
from __future__ import annotations

import numpy as np
import torch

from .metrics import aupro
from .scoring import DETECTOR_PARTS

CRITERION = "mean of validation image AUROC and validation AUPRO"
TIE_RULE = "within one bootstrap standard error of the best criterion, the fewest parts, then the highest criterion"
BOOTSTRAP = 30   # resamples of the validation images for the spread


def criterion(val_metrics: dict, reduce: str) -> float:
    """The criterion of one candidate from its validation metrics (`evaluate_maps`'s)."""
    return (val_metrics[f"image_auroc_{reduce}"] + val_metrics["aupro"]) / 2


def candidate_table(val: dict, test: dict, reduces: tuple[str, ...]) -> list[dict]:
    """One row per (detector, reduce): its parts, criterion and the validation and test numbers.

    Args: val, test: {detector: metrics dict} on the validation and test split (the test numbers
    are only reported: nothing below reads them).
    """
    rows = []
    for d, v in val.items():
        for r in reduces:
            t = test.get(d, {})
            rows.append({"detector": d, "reduce": r, "parts": len(DETECTOR_PARTS[d]),
                         "criterion": criterion(v, r), "val_image_auroc": v[f"image_auroc_{r}"],
                         "val_pixel_auroc": v["pixel_auroc"], "val_aupro": v["aupro"],
                         "test_image_auroc": t.get(f"image_auroc_{r}"), "test_pixel_auroc": t.get("pixel_auroc"),
                         "test_aupro": t.get("aupro")})
    return rows


def bootstrap_spread(labels: torch.Tensor, scores: torch.Tensor, masks: torch.Tensor, pixel_maps: torch.Tensor,
                     n: int = BOOTSTRAP, seed: int = 0) -> float:
    """Standard error of the criterion of one candidate over `n` resamples of the validation
    images, drawn with replacement within the normals and within the anomalies.

    Args: labels (N,), scores (N,) image scores, masks (N, 1, H, W) bool, pixel_maps (N, 1, H, W).
    """
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    normal, anomalous = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    m, p, s = np.asarray(masks)[:, 0], np.asarray(pixel_maps, dtype=np.float32)[:, 0], np.asarray(scores)
    values = []
    for _ in range(n):
        i = np.concatenate([rng.choice(normal, len(normal)), rng.choice(anomalous, len(anomalous))])
        values.append((roc_auc_score(y[i], s[i]) + aupro(m[i], p[i], num_thresholds=200)) / 2)
    return float(np.std(values, ddof=1))


def choose(rows: list[dict], spread: float) -> tuple[dict, str]:
    """The chosen row of `candidate_table` and why, by the tie rule (module docstring)."""
    best = max(rows, key=lambda r: r["criterion"])
    close = [r for r in rows if r["criterion"] >= best["criterion"] - spread]
    chosen = min(close, key=lambda r: (r["parts"], -r["criterion"]))
    name = lambda r: f"{r['detector']} ({r['reduce']})"  # noqa: E731
    why = (f"highest validation criterion ({CRITERION}) of {len(rows)} candidates: {chosen['criterion']:.3f}"
           if chosen is best else
           f"{name(chosen)} ({chosen['criterion']:.3f}, {chosen['parts']} part(s)) is within one bootstrap standard "
           f"error ({spread:.3f}) of the best, {name(best)} ({best['criterion']:.3f}, {best['parts']} parts), "
           "and has fewer parts")
    if len(close) > 1 and chosen is best:
        why += f"; {len(close) - 1} other(s) within one standard error ({spread:.3f}) have no fewer parts"
    return chosen, why


def selection_table(selection: dict) -> str:
    """metrics.json's `selection` as a markdown table: every candidate's validation and test
    numbers, best criterion first, the chosen one marked, then why (and, when raw pixels won,
    that the learned features did not help on this class)."""
    name = f"{selection['detector']} ({selection['reduce']})"
    lines = [f"**chosen: {name}** ({selection['mode']}): {selection['why']}", "",
             "| candidate | parts | criterion | val image AUROC | val AUPRO | test image AUROC | test pixel AUROC "
             "| test AUPRO |", "|---|---|---|---|---|---|---|---|"]
    f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731 (n/a: no pixel ground truth on test)
    for r in sorted(selection.get("candidates", []), key=lambda r: -r["criterion"]):
        cand = f"{r['detector']} ({r['reduce']})"
        mark = f"**{cand}** ←" if cand == name else cand
        lines.append(f"| {mark} | {r['parts']} | {r['criterion']:.3f} | {r['val_image_auroc']:.3f} | "
                     f"{r['val_aupro']:.3f} | {f(r['test_image_auroc'])} | {f(r['test_pixel_auroc'])} | "
                     f"{f(r['test_aupro'])} |")
    if selection["mode"] == "validation" and selection["detector"].startswith("pixel"):
        lines += ["", "Raw pixels won on this class's validation set: here the learned features did not help."]
    return "\n".join(lines)
