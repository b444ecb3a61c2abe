"""Tables of the CPC-AD study (scripts/study.py) from its finished runs.

Every number is a mean over seeds of the mean over a half's categories, +- the standard
deviation over seeds. "val" is the synthetic-anomaly validation set (what decisions use);
"test" is the categories' test split (reported only).
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

METRICS = ("image_auroc_mean", "image_auroc_max", "image_auroc_top10", "pixel_auroc", "aupro")
HEADERS = ("image (mean)", "image (max)", "image (top10)", "pixel", "AUPRO")


def load_runs(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").rglob("seed*.json"))]


def score_grid(run: dict) -> int:
    """G of the grid the run's maps (the detectors' and the baseline's) are on."""
    g = run["config"]["grid"]
    return run.get("baseline_grid") or (g["image_size"] - g["patch_size"]) // g["stride"] + 1


def flat_rows(runs: list[dict]) -> list[dict]:
    """One row per run x split x detector (the baseline is a detector named "pixel baseline")."""
    rows = []
    for r in runs:
        for split in ("val", "test"):
            detectors = {**r[split], "pixel baseline": r[f"baseline_{split}"]}
            for det, m in detectors.items():
                rows.append({"setting": r["setting"], "category": r["category"], "half": r["half"],
                             "seed": r["seed"], "split": split, "detector": det, "grid": score_grid(r),
                             **{k: m.get(k) for k in METRICS},
                             "final_val_loss": r["history"][-1].get("val_loss") if r["history"] else None,
                             "chance_loss": r["chance_loss"],
                             "epochs_trained": len(r["history"]), "train_seconds": r["train_seconds"]})
    return rows


def seed_stats(rows: list[dict], metric: str) -> tuple[float, float, int]:
    """Mean and std over seeds of the per-seed mean over categories; n seeds."""
    by_seed: dict[int, list[float]] = {}
    for r in rows:
        if r.get(metric) is not None:
            by_seed.setdefault(r["seed"], []).append(r[metric])
    per_seed = [np.mean(v) for v in by_seed.values()]
    if not per_seed:
        return float("nan"), float("nan"), 0
    return float(np.mean(per_seed)), float(np.std(per_seed)), len(per_seed)


def fmt(mean: float, std: float) -> str:
    return "-" if np.isnan(mean) else f"{mean:.2f} ± {std:.2f}"


def half_table(rows: list[dict], half: str, split: str) -> str:
    sel = [r for r in rows if r["half"] == half and r["split"] == split]
    lines = ["| setting | detector | seeds | " + " | ".join(HEADERS) + " |", "|---|---|---|" + "---|" * len(HEADERS)]
    for setting in dict.fromkeys(r["setting"] for r in sel):
        for det in dict.fromkeys(r["detector"] for r in sel if r["setting"] == setting):
            cell = [r for r in sel if r["setting"] == setting and r["detector"] == det]
            stats = [seed_stats(cell, m) for m in METRICS]
            cats = len({r["category"] for r in cell})
            lines.append(f"| {setting} | {det} | {stats[0][2]} x {cats} cat. | "
                         + " | ".join(fmt(m, s) for m, s, _ in stats) + " |")
    return "\n".join(lines)


def category_table(rows: list[dict], split: str, detectors: dict[str, str]) -> str:
    """Per category: image AUROC (reduction in the name) and pixel AUROC of a few detectors."""
    sel = [r for r in rows if r["split"] == split]
    cats = list(dict.fromkeys((r["half"], r["category"]) for r in sorted(sel, key=lambda r: (r["half"] != "tuning", r["category"]))))
    names = list(detectors)
    lines = ["| half | category | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for half, cat in cats:
        cells = []
        for name, (setting, det, reduce) in detectors.items():
            cell = [r for r in sel if r["category"] == cat and r["setting"] == setting and r["detector"] == det]
            im, ims, _ = seed_stats(cell, f"image_auroc_{reduce}")
            px, pxs, _ = seed_stats(cell, "pixel_auroc")
            cells.append("-" if np.isnan(im) else f"{im:.2f} / {px:.2f}")
        lines.append(f"| {half} | {cat} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def epoch_table(runs: list[dict], half: str = "tuning") -> str:
    """Validation detection by epoch (tuning half): how long to train."""
    lines = ["| setting | detector | epoch | image (mean) | image (max) | image (top10) | pixel |", "|---|---|---|---|---|---|---|"]
    for setting in dict.fromkeys(r["setting"] for r in runs):
        sel = [r for r in runs if r["setting"] == setting and r["half"] == half]
        epochs = sorted({h["epoch"] for r in sel for h in r["history"] if "val_detection" in h})
        for det in ("cpcad", "cpcad_knn", "knn"):
            for e in epochs:
                rows = [{"seed": r["seed"], **h["val_detection"][det]} for r in sel for h in r["history"]
                        if h["epoch"] == e and "val_detection" in h and det in h["val_detection"]]
                stats = [seed_stats(rows, m) for m in ("image_auroc_mean", "image_auroc_max", "image_auroc_top10", "pixel_auroc")]
                lines.append(f"| {setting} | {det} | {e} | " + " | ".join(fmt(m, s) for m, s, _ in stats) + " |")
    return "\n".join(lines)


def headline_table(rows: list[dict], entries: dict[str, tuple[str, str, str]]) -> str:
    """The README's table: each entry (setting, detector, reduction) on both halves, val and test."""
    cols = [("tuning", "val"), ("tuning", "test"), ("confirmation", "val"), ("confirmation", "test")]
    lines = ["| detector | setting | grid | " + " | ".join(f"{h} {s}: image / pixel / AUPRO" for h, s in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for name, (setting, det, reduce) in entries.items():
        cells = []
        for half, split in cols:
            cell = [r for r in rows if (r["setting"], r["detector"], r["half"], r["split"]) == (setting, det, half, split)]
            stats = [seed_stats(cell, m) for m in (f"image_auroc_{reduce}", "pixel_auroc", "aupro")]
            n = stats[0][2]
            cells.append("-" if not n else " / ".join(fmt(m, sd) for m, sd, _ in stats) + ("" if n >= 3 else f" ({n} seed{'s' * (n > 1)})"))
        grids = sorted({r["grid"] for r in rows if (r["setting"], r["detector"]) == (setting, det)})
        lines.append(f"| {name} | {setting} | {' / '.join(f'{g}x{g}' for g in grids)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def defect_table(runs: list[dict], half: str, entries: dict[str, tuple[str, str, str]]) -> str:
    """Image AUROC per demo defect type on test, beside the synthetic kind of the same edit on
    validation (`cu.DEMO_EDITS`): where the validation set predicts the test split, and where
    it does not. Mean over the half's categories and seeds of the runs that recorded it."""
    import cpc_utils as cu
    cols = []
    for name, (setting, det, reduce) in entries.items():
        sel = [r for r in runs if r["setting"] == setting and r["half"] == half and "per_defect" in r]
        if sel:
            cols.append((name, sel, det, reduce))
    if not cols:
        return "(no run of this half recorded per-defect AUROC)"
    defects = sorted({d for _, sel, det, red in cols for r in sel for d in r["per_defect"]["test"][det][red]})

    def cell(sel, det, red, split, key):
        v = [r["per_defect"][split][det][red][key] for r in sel if key in r["per_defect"][split][det][red]]
        return f"{np.mean(v):.2f}" if v else "-"
    lines = ["| test defect (validation kind) | " + " | ".join(f"{n}: val / test" for n, *_ in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for d in defects:
        kind = cu.DEMO_EDITS.get(d)
        cells = [f"{cell(sel, det, red, 'val', kind) if kind else '-'} / {cell(sel, det, red, 'test', d)}"
                 for _, sel, det, red in cols]
        lines.append(f"| {d} ({kind or 'none'}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out: Path, chosen: tuple[str, str, str] | None = None) -> str:
    """Write tables.md and runs.csv under `out`; return the markdown."""
    import cpc_utils as cu
    runs = load_runs(out)
    if not runs:
        return f"no finished runs under {out / 'runs'}"
    rows = flat_rows(runs)
    buf = io.StringIO()
    w = csv.DictWriter(buf, list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    cu.save_atomic(buf.getvalue().encode(), out / "runs.csv", lambda o, f: f.write(o))
    setting = chosen[0] if chosen else "fast"
    per_cat = {**({f"default ({chosen[1]}, {chosen[2]})": chosen} if chosen else {}),
               "pure CPC-AD (cpcad, mean)": (setting, "cpcad", "mean"),
               "paper preset (cpcad, mean)": ("paper", "cpcad", "mean"),
               f"pixel baseline ({chosen[2] if chosen else 'max'})": (setting, "pixel baseline", chosen[2] if chosen else "max"),
               "pixel baseline, paper grid (mean)": ("paper", "pixel baseline", "mean")}
    md = ["# CPC-AD study: tables", "",
          "Generated by `python scripts/study.py --report` from `runs/`. Mean over seeds of the",
          "mean over the half's categories, ± the standard deviation over seeds. **val** = the",
          "synthetic-anomaly validation set (decisions are made on the tuning half's val only);",
          "**test** = the test split (reported, never used to choose). Image AUROC per reduction,",
          "pixel AUROC and AUPRO (both from the same pixel map, whatever the reduction).", "",
          f"Runs: {len(runs)}; categories: tuning {', '.join(cu.DEMO_TUNING)}; confirmation "
          f"{', '.join(cu.DEMO_CONFIRMATION)}.", ""]
    for title, half, split in (("Tuning half, validation (decisions are made here)", "tuning", "val"),
                               ("Confirmation half, test (the targets are measured here)", "confirmation", "test"),
                               ("Tuning half, test (reported only)", "tuning", "test"),
                               ("Confirmation half, validation (reported only)", "confirmation", "val")):
        md += [f"## {title}", "", half_table(rows, half, split), ""]
    entries = {**({f"**default** ({chosen[1]}, {chosen[2]})": chosen} if chosen else {}),
               **({f"same network untrained ({chosen[1]}, {chosen[2]})": ("untrained",) + chosen[1:]} if chosen else {}),
               "pure CPC-AD (cpcad, mean)": (setting, "cpcad", "mean"),
               "paper preset (cpcad, mean)": ("paper", "cpcad", "mean"),
               **{f"pixel baseline ({r})": (setting, "pixel baseline", r) for r in ("top10", "max", "mean")},
               "pixel baseline, the paper preset's grid (mean)": ("paper", "pixel baseline", "mean")}
    md += ["## Headline: the default, pure CPC-AD, the paper preset and the baseline", "",
           "Like for like: each detector is compared with the raw-pixel baseline on the grid its own maps are",
           "on (`grid`), with the same reduction: the default and pure CPC-AD with the baseline on the dense",
           "score grid, the paper preset with the baseline on its training grid.", "",
           headline_table(rows, entries), ""]
    md += ["## Per category, test (image / pixel AUROC, mean over seeds)", "", category_table(rows, "test", per_cat), "",
           "## Per category, validation", "", category_table(rows, "val", per_cat), "",
           "## Validation detection by epoch, tuning half", "", epoch_table(runs), ""]
    if chosen:
        det, reduce = chosen[1], chosen[2]
        per_defect = {f"default retrained ({det}, {reduce})": ("retrain", det, reduce),
                      f"untrained ({det})": ("untrained", det, reduce),
                      f"pixel baseline ({reduce})": ("untrained", "pixel baseline", reduce),  # no model in it
                      "pure CPC-AD (cpcad, mean)": ("retrain", "cpcad", "mean")}
        md += ["## Per defect type: validation against test", "",
               "Image AUROC of each defect type against the good images: on validation the synthetic kind made by",
               "the same edit as the test defect (`cu.DEMO_EDITS`; objects' *extra* and *missing* have none). Only",
               "runs that recorded it: the `retrain` (tuning half only) and `untrained` settings; the baseline, which",
               "has no model, from the `untrained` runs (the same splits and seeds).", ""]
        for half in ("tuning", "confirmation"):
            md += [f"### {half.capitalize()} half", "", defect_table(runs, half, per_defect), ""]
    text = "\n".join(md)
    cu.save_atomic(text.encode(), out / "tables.md", lambda o, f: f.write(o))
    return text
