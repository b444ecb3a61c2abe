"""The metrics record: what every run writes to metrics.json (`MetricsRecord`, with a version),
the summary columns and their legend, and helpers that order result rows."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .demo import DEMO_CONFIRMATION, DEMO_TUNING
from .encoders import ENCODERS
from .scoring import REDUCES

SCHEMA_VERSION = 4  # 4: selection, fixed; 3: ground_truth; 2: the record has a schema (this dataclass); 1: the same keys, without a version
METRIC_KEYS = ("image_auroc", "image_f1_max", "pixel_auroc", "aupro",
               *(f"{m}_{r}" for r in REDUCES for m in ("image_auroc", "image_f1_max")))
PIXEL_MASKS = "pixel masks"  # a record's ground_truth: what its test metrics were measured against
IMAGE_LABELS_ONLY = ("image labels only: no ground_truth/ folder, so test pixel AUROC, AUPRO and the test rates at "
                     "the pixel threshold are not available (n/a); image AUROC, F1 and thresholds are as usual")
PIXEL_METRIC_KEYS = ("pixel_auroc", "aupro")  # None in every test family of an IMAGE_LABELS_ONLY record
METRIC_FAMILIES = {"test": "", "cpcad": "cpcad_", "baseline": "baseline_", "val": "val_",
                   "val_baseline": "val_baseline_", "fixed": "fixed_"}  # field -> its keys' prefix in metrics.json
BEFORE_SELECTION = {"mode": "fixed", "why": "recorded before detectors were chosen per class (schema 3 or older)"}


@dataclass
class MetricsRecord:
    """One CPC-AD run's record, written as metrics.json by `run_cpcad` (notebook 02) and read
    back by `read_record`, for every table and figure. In the file the metric families are flat
    (`image_auroc`, `cpcad_image_auroc`, `baseline_image_auroc`, `val_image_auroc`, ...,
    each with every key of METRIC_KEYS), as they always were; every other field is one key.

    test: the chosen detector on the test split (`detector`, `image_reduce`: the headline),
    chosen per class on validation or fixed by the parameters (`selection`: how, why, and every
    candidate's validation and test numbers); cpcad: pure CPC-AD (the paper's loss map, mean
    reduction first); baseline: the raw-pixel nearest neighbour on the same `score_grid`
    (`baseline_grid`) and reduction; fixed: one detector for every class (pipeline.FIXED), so
    encoders compare like for like; val and val_baseline: the chosen detector and the baseline on
    the validation set (synthetic anomalies). The thresholds were chosen on validation normals
    only; the test numbers at them are reported, never chosen on.
    """
    category: str
    encoder: str
    preset: str
    detector: str
    image_reduce: str
    score_grid: int                   # G of the detector's maps
    baseline_grid: int                # G of the baseline's maps: equal, like for like
    epochs: int                       # asked for
    epochs_trained: int
    chosen_epoch: int                 # the epoch whose weights were scored (best validation loss)
    test: dict[str, float]
    per_defect_auroc: dict[str, float]
    cpcad: dict[str, float]
    baseline: dict[str, float]
    baseline_per_defect_auroc: dict[str, float]
    val: dict[str, float]
    val_per_kind_auroc: dict[str, float]
    val_baseline: dict[str, float]
    threshold: float
    threshold_rule: dict
    val_fpr_at_threshold: float
    val_recall_at_threshold: float
    test_precision_at_threshold: float | None
    test_recall_at_threshold: float
    test_fpr_at_threshold: float
    pixel_threshold: float
    pixel_threshold_rule: dict
    test_pixel_precision_at_threshold: float | None
    test_pixel_recall_at_threshold: float
    test_pixel_fpr_at_threshold: float
    final_train_loss: float
    final_val_loss: float | None
    best_val_loss: float | None
    chance_loss: float
    train_seconds: float
    train_wall_seconds: float
    score_seconds: float
    num_parameters: int
    embedding_dim: int
    device: str
    data_root: str
    learning: dict                    # `learning_check`: did the loss fall below chance
    calibration: dict                 # `ScoreCalibration.check`
    fingerprint: dict                 # `run_fingerprint`: what determined this result
    history: list[dict]
    config: dict                      # {"parameters", "model", "scoring", "train", "grid"}
    selection: dict = dataclasses.field(default_factory=lambda: dict(BEFORE_SELECTION))  # `pipeline._select`
    fixed: dict[str, float] = dataclasses.field(default_factory=dict)  # pipeline.FIXED on the test split
    ground_truth: str = "pixel masks"  # PIXEL_MASKS, or IMAGE_LABELS_ONLY: test pixel metrics None (not available)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        """The flat metrics.json layout (METRIC_FAMILIES spread out with their prefixes)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in METRIC_FAMILIES:  # every key of the family, None where not measured
                out.update({METRIC_FAMILIES[f.name] + k: value.get(k) for k in METRIC_KEYS})
                out.update({METRIC_FAMILIES[f.name] + k: v for k, v in value.items()})
            else:
                out[f.name] = value
        return out


def record_keys() -> tuple[str, ...]:
    """Every key a metrics.json of this schema holds."""
    return tuple(k for f in dataclasses.fields(MetricsRecord)
                 for k in ([METRIC_FAMILIES[f.name] + m for m in METRIC_KEYS] if f.name in METRIC_FAMILIES
                           else [f.name]))


def read_record(d: dict, source: str = "metrics.json") -> MetricsRecord:
    """A metrics.json's dict as a MetricsRecord. Raises ValueError naming `source` for a record
    of a newer schema, or one with a field missing or unknown (a renamed key fails here, not as a
    blank table cell). Version 1 (no version written) has the same keys; its chosen_epoch,
    when absent, is the history's best validation epoch. Versions 1 and 2 were evaluated on
    pixel masks (their ground_truth)."""
    version = d.get("schema_version", 1)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ValueError(f"{source}: schema_version {version!r}, this code reads up to {SCHEMA_VERSION}; "
                         "update the code or run it again")
    d = dict(d, schema_version=SCHEMA_VERSION)
    if version < 3:
        d.setdefault("ground_truth", PIXEL_MASKS)
    if version < 4:  # one detector for every class; the fixed one was not recorded apart
        d.setdefault("selection", dict(BEFORE_SELECTION))
        for m in METRIC_KEYS:
            d.setdefault(METRIC_FAMILIES["fixed"] + m, None)
    if "chosen_epoch" not in d and version == 1 and d.get("history"):
        best = min((h for h in d["history"] if h.get("val_loss") is not None), key=lambda h: h["val_loss"],
                   default=d["history"][-1])
        d["chosen_epoch"] = best["epoch"]
    fields = {}
    used = set()
    for f in dataclasses.fields(MetricsRecord):
        if f.name in METRIC_FAMILIES:
            keys = [METRIC_FAMILIES[f.name] + m for m in METRIC_KEYS]
            fields[f.name] = {m: d[k] for m, k in zip(METRIC_KEYS, keys) if k in d}
            used.update(keys)
        elif f.name in d:
            fields[f.name] = d[f.name]
            used.add(f.name)
    missing = [k for k in record_keys() if k not in d]
    unknown = sorted(set(d) - used)
    if missing or unknown:
        raise ValueError(f"{source} is not a metrics record of schema {SCHEMA_VERSION}: "
                         + "; ".join(filter(None, [f"missing {', '.join(missing)}" * bool(missing),
                                                   f"unknown {', '.join(unknown)}" * bool(unknown)]))
                         + " (written by another version of this code? run it again)")
    return MetricsRecord(**fields)


def _budget(row: dict):
    """The epochs a run was asked for (`epochs`), else the epochs it trained."""
    return row.get("epochs", row.get("epochs_trained"))


def _group(rows: list[dict], metric: str, key: Callable[[dict], object]) -> dict:
    """{key(row): [row[metric], ...]} over the rows that have `metric`."""
    out: dict = {}
    for r in rows:
        if r.get(metric) is not None:
            out.setdefault(key(r), []).append(r[metric])
    return out


# ---- the summary: columns, legend, row order ------------------------------------------
# One metrics.json per run at results/<run>/<category>/<encoder>/; one function turns a
# results tree into summary.md, summary.csv and the figures.

SUMMARY_COLUMNS = ("category", "half", "encoder", "seed", "epochs", "epochs_trained", "chosen_epoch", "learned",
                   "calibration", "detector", "image_reduce", "chosen",
                   "image_auroc", "pixel_auroc", "aupro", "baseline_image_auroc", "baseline_pixel_auroc",
                   "cpcad_image_auroc", "cpcad_pixel_auroc", "fixed_image_auroc", "fixed_pixel_auroc",
                   "val_image_auroc", "val_pixel_auroc",
                   "image_f1_max", "train_seconds")
DERIVED_COLUMNS = ("half", "seed", "learned", "calibration", "chosen")  # from a record's fields (report._summary_row)
TEXT_COLUMNS = ("category", "half", "encoder", "seed", "epochs", "epochs_trained", "chosen_epoch", "learned",
                "calibration", "detector", "image_reduce", "chosen")
COLUMN_LEGEND = {
    "category": "the MVTec AD class (or demo category) trained on and tested",
    "half": "demo half: `tuning` (the study made its choices looking at these categories, so their test "
            "numbers are not independent of them) or `confirmation` (untouched); empty for MVTec AD",
    "encoder": "the patch encoder (`cu.ENCODERS`), as the command line spells it",
    "seed": "the run's seed (train/held-out split, initialisation, negatives)",
    "epochs": "epochs asked for (an epoch ladder's rung: scripts/sweep.py --epochs 20 40 60)",
    "epochs_trained": "epochs actually trained (early stopping can end a run before its `epochs`)",
    "chosen_epoch": "the epoch whose weights were scored: that of the best validation loss (`chosen_epoch`)",
    "learned": "`learning_check`: ok, or `at_chance` (the loss stayed at chance: nothing learned) or "
               "`diverged`; such runs still have metrics, flagged rather than hidden (empty: not recorded)",
    "calibration": "`ScoreCalibration.check`: ok, or `degenerate` (the calibration normals' scores had no spread, "
                   "e.g. identical training images: the detector's scores and thresholds are meaningless)",
    "detector": "the anomaly map scored (`cu.DETECTORS`): e.g. `cpcad` the CPC-AD loss alone, `knn_stats` the "
                "standardised distance of the patch's stage statistics, from the CPC-trained encoder, to the nearest "
                "normal patch's, `pixel` the raw-pixel nearest neighbour, `pixel_pos` the same among train patches "
                "at the same place, `knn_stats_pixel` the two standardised and added",
    "image_reduce": "how a patch map becomes an image score: `mean` (the paper's), `max`, or `top10` "
                    "(the mean of the highest 10% of patches)",
    "chosen": "how `detector` and `image_reduce` were set: `validation` (chosen per class on its own validation "
              "set, from `cu.CANDIDATES` x every reduction; metrics.json's `selection` says why) or `fixed` "
              "(by the parameters)",
    "image_auroc": "test image AUROC of the detector, image score = `image_reduce` of its patch map",
    "pixel_auroc": "test pixel AUROC of the detector's pixel map against the ground-truth masks",
    "aupro": "area under the per-region-overlap curve up to 30% false positive rate, divided by 0.3 (MVTec AD)",
    "baseline_image_auroc": "the same as image_auroc for the raw-pixel baseline (each patch's distance to the "
                            "nearest train patch in downsampled pixels; nothing learned), same reduction",
    "baseline_pixel_auroc": "pixel AUROC of the raw-pixel baseline: a learned detector should beat it",
    "cpcad_image_auroc": "pure CPC-AD, the paper's detector: the loss map with the `mean` reduction",
    "cpcad_pixel_auroc": "pixel AUROC of pure CPC-AD",
    "fixed_image_auroc": "test image AUROC of one detector for every class (`knn_stats`, top10, the study's "
                         "earlier default), so encoders and classes compare like for like",
    "fixed_pixel_auroc": "pixel AUROC of that fixed detector",
    "val_image_auroc": "image AUROC on the validation set: held-out train/good images with synthetic anomalies "
                       "pasted in (never test images); choices are made on these numbers",
    "val_pixel_auroc": "pixel AUROC on the validation set",
    "image_f1_max": "test F1 at the best threshold of the image score (chosen on the test set: optimistic)",
    "train_seconds": "seconds of training, all epochs (also those before a resume)",
}


def _check_columns() -> None:
    """The summary's columns are the record's fields or derived from them, each with a legend:
    a field renamed in MetricsRecord fails here, at import, not as a blank column."""
    unknown = set(SUMMARY_COLUMNS) - set(record_keys()) - set(DERIVED_COLUMNS)
    if unknown or set(COLUMN_LEGEND) != set(SUMMARY_COLUMNS):
        raise RuntimeError(f"SUMMARY_COLUMNS {sorted(unknown)} are not MetricsRecord fields, or COLUMN_LEGEND "
                           f"differs from SUMMARY_COLUMNS by {sorted(set(COLUMN_LEGEND) ^ set(SUMMARY_COLUMNS))}")


_check_columns()
SUMMARY_HIDDEN_PARAMETERS = ("category", "encoder", "output_dir", "data_root")  # per row, or where, not how
HALVES = ("tuning", "confirmation", "")


def demo_half(category: str) -> str:
    """"tuning" or "confirmation" for a demo category (see DEMO_TUNING), "" for any other."""
    return "tuning" if category in DEMO_TUNING else "confirmation" if category in DEMO_CONFIRMATION else ""


def _half(row: dict) -> str:
    return row.get("half") or demo_half(row["category"])


def half_rank(half: str) -> int:
    return HALVES.index(half) if half in HALVES else len(HALVES)


def _category_order(rows: list[dict]) -> list[str]:
    """Categories of `rows`: the tuning half, the confirmation half, then any other, each A-Z."""
    halves = {r["category"]: _half(r) for r in rows}
    return sorted(halves, key=lambda c: (half_rank(halves[c]), c))


def _encoder_order(rows: list[dict]) -> list[str]:
    """Encoders of `rows`: registry order (`ENCODERS`), then any other A-Z."""
    present = {r["encoder"] for r in rows}
    return [e for e in ENCODERS if e in present] + sorted(present - set(ENCODERS))


def _seed(row: dict):
    """A run's seed: top-level (the study's rows) or its notebook parameter."""
    return row.get("seed", ((row.get("config") or {}).get("parameters") or {}).get("seed"))


def _floor(rows: list[dict], metric: str) -> list[float]:
    """The raw-pixel floor of `metric` per seed (`baseline_<metric>`, averaged over the seed's
    runs, which share it: it trains nothing and is computed on the same split and grid)."""
    per_seed = _group(rows, f"baseline_{metric}", _seed)
    return [float(np.mean(v)) for v in per_seed.values()]
