"""Scoring a trained CPC-AD model: raw patch scores (the InfoNCE loss against a bank of normal
negatives, kNN typicality), their calibration on held-out normals, the named detectors, image
scores, and the raw-pixel baseline every result is measured against."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checks import check_param, make_config
from .patches import PatchGrid, extract_patches, to_float
from .devices import autocast, resolve_device
from .models import CPCAD, REFERENCE_KINDS, encode_grid
from .training import _batches


@dataclass
class ScoringConfig:
    """How a trained CPC-AD model is scored: which detector makes the anomaly map, how the map
    becomes an image score, the references it compares with and the grid it is measured on.

    Scoring policy, not the model: changing it rescores saved weights and never retrains
    (`runs.SCORING_PARAMETERS`). The defaults were chosen on validation data only; the
    evidence is in results/study/README.md ("Why the defaults are what they are").
    """
    detector: str = "knn_stats"   # how patch scores become the anomaly map: a key of DETECTORS
    reduce: str = "top10"         # how the map becomes the image score: a name in REDUCES
    test_negatives: int = 1024    # train/good patches of the training grid: CPC-AD's negatives when scoring
    knn_bank: int = 16384         # train/good patches of the score grid the kNN typicality compares with
    dense_scoring: bool = True    # maps on the training grid at half its stride (`score_grid`)

    def __post_init__(self):
        check_param("detector", self.detector, "str", choices=DETECTORS)
        check_param("reduce", self.reduce, "str", choices=REDUCES)
        check_param("test_negatives", self.test_negatives, "int", low=1)
        check_param("knn_bank", self.knn_bank, "int", low=1)
        check_param("dense_scoring", self.dense_scoring, "bool")

    @property
    def references(self) -> str | None:
        """The kNN references the detector reads (one of REFERENCE_KINDS), None for the loss alone."""
        return detector_references(self.detector)

    def score_grid(self, grid: PatchGrid) -> PatchGrid:
        """The grid the anomaly maps are on: with `dense_scoring` the training grid at half its
        stride (an even stride: the training grid's patches are every other one of it, so one
        encoding pass serves both), otherwise the training grid itself."""
        if not self.dense_scoring or grid.stride % 2:
            return grid
        return dataclasses.replace(grid, stride=grid.stride // 2)


def scoring_config(preset: str = "fast", **overrides) -> ScoringConfig:
    """ScoringConfig from a named preset, then `overrides` (None keeps the preset's value).
    "fast": the defaults; "paper": pure CPC-AD loss as the map, the mean as the image score,
    on the training grid, as de Haan & Loewe published it."""
    if preset not in ("fast", "paper"):
        raise ValueError(f"unknown preset {preset!r}; choose fast or paper")
    base = dict(detector="cpcad", reduce="mean", dense_scoring=False) if preset == "paper" else {}
    return make_config(ScoringConfig, **{**base, **{k: v for k, v in overrides.items() if v is not None}})


@torch.no_grad()
def score_patches(model: CPCAD, images: torch.Tensor, bank: torch.Tensor,
                  references: dict[str, torch.Tensor] | None = None, batch_size: int = 16,
                  device: str | torch.device = "auto", progress: bool = False,
                  precision: str = "auto", grid: PatchGrid | None = None) -> dict[str, torch.Tensor]:
    """Raw per-patch scores of uint8 images (N, C, H, W), deterministic, each (N, n_sub, G, G)
    on the score `grid` (default the training grid; `ScoringConfig.score_grid`, the grid
    `prepare_scoring` returns, is what `patches_to_pixels` and `evaluate_maps` must be given).

    "loss": CPC-AD's InfoNCE loss against the fixed `bank` of train/good negatives (the paper's
    score: how *unpredictable* a patch is from its neighbours), computed on the training grid
    and, on a dense score grid, interpolated bilinearly onto it (exact at the training grid's
    patches, every other one). With `references` (from
    `prepare_scoring`) also the typicality scores, how *unusual* the patch is, each the
    distance to the nearest train/good patch, averaged over the encoders: "knn", cosine
    distance of the embedding z; "knn_ms", the same for the multi-scale descriptor; "knn_stats",
    Euclidean distance of the stage-statistics descriptor, every dimension standardised by the
    references' mean and spread (`PatchEncoder.multiscale` describes both). A flat fill or a
    smooth blob is easy to predict from its neighbour, so its loss stays low; it is still far
    from every normal patch, which the kNN scores see. One encoding pass gives them all.
    `precision` is the run's (`TrainConfig.precision`), so scoring computes as training did.
    """
    device = resolve_device(device)
    model.eval().to(device)
    bank = bank.to(device)
    refs = {k: [_prepare_references(k, r.float()) for r in v.to(device)] for k, v in (references or {}).items()}
    images = images.to(device)  # one host->device copy (a no-op on CPU), not one per batch
    grid = grid or model.grid
    G, dense = grid.grid, grid != model.grid
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("loss", *refs)}
    for idx in tqdm(_batches(len(images), batch_size, None), desc="score", disable=not progress):
        x = to_float(images[idx.to(device)])
        with autocast(device, precision):
            if refs:  # descriptors on the score grid; the training grid's z are every other patch of it
                grids = [encode_grid(enc, x, grid, multiscale=True) for enc in model.encoders]
                zs = [g[0][..., ::2, ::2] if dense else g[0] for g in grids]
            else:
                zs = [encode_grid(enc, x, model.grid) for enc in model.encoders]
            loss = model.patch_losses(zs, bank).float()  # (B', G_train, G_train), stays on the device
        if dense:  # align_corners: the training grid's values land exactly on every other patch
            loss = F.interpolate(loss[:, None], size=(G, G), mode="bilinear", align_corners=True)[:, 0]
        out["loss"].append(loss)
        for kind, ref in refs.items():
            i = REFERENCE_KINDS.index(kind)
            dist = [_nearest_distance(kind, g[i].float().permute(0, 2, 3, 1), r)  # (B', G, G)
                    for g, r in zip(grids, ref)]
            out[kind].append(torch.stack(dist).mean(0))
    return {k: torch.cat(v).cpu().view(len(images), -1, G, G) for k, v in out.items()}


def _prepare_references(kind: str, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """References (M, D) of one encoder as `_nearest_distance` compares them: unit vectors for
    the cosine kinds; standardised, with the mean and spread that standardise the queries, for
    "knn_stats". A spread is at least 1e-3 of the median one: a dimension that (nearly) never
    varies on normal patches, e.g. a dead channel, still counts when it does vary, without
    its float rounding dividing into the largest distances."""
    if kind == "knn_stats":
        mu, sd = ref.mean(0), ref.std(0)
        sd = sd.clamp_min(max(1e-3 * float(sd.median()), 1e-12))
        return (ref - mu) / sd, mu, sd
    return F.normalize(ref, dim=-1), None, None


def _nearest_distance(kind: str, f: torch.Tensor, ref: tuple, chunk: int = 4096) -> torch.Tensor:
    """Distance of each descriptor f (..., D) to its nearest reference (from `_prepare_references`):
    1 - the best cosine similarity, or the smallest standardised Euclidean distance for
    "knn_stats"; a chunk of rows at a time so memory stays at chunk x M however large the batch."""
    r, mu, sd = ref
    flat = f.reshape(-1, f.shape[-1])
    if kind == "knn_stats":
        best = torch.cat([torch.cdist((part - mu) / sd, r).min(-1).values for part in flat.split(chunk)])
        return best.view(f.shape[:-1])
    best = torch.cat([(F.normalize(part, dim=-1) @ r.T).max(-1).values for part in flat.split(chunk)])
    return (1 - best).view(f.shape[:-1])


@torch.no_grad()
def prepare_scoring(model: CPCAD, train_images: torch.Tensor, calibration_images: torch.Tensor | None,
                    config: ScoringConfig | None = None, batch_size: int = 16, device: str | torch.device = "auto",
                    seed: int = 0, precision: str = "auto", kinds: Sequence[str] | None = None,
                    knn_size: int | None = None) -> dict:
    """What scoring needs from normal data, computed once after training.

    bank: `config.test_negatives` encoded train/good patches, the InfoNCE negatives;
    references: `knn_size` (default `config.knn_bank`) other train/good patches of the score
    grid, as each of `kinds`: embeddings z ("knn"), multi-scale descriptors ("knn_ms"), stage
    statistics ("knn_stats"). By default only the kind the detector reads is built (none for
    the loss alone). calibration: a ScoreCalibration fitted on `calibration_images`, normal
    images held out of training (train images would look too normal: the model has fitted
    them, and their own patches sit among the references). grid: the score grid.
    Everything is encoded at the run's `precision`, as `score_patches` must then be called.
    """
    config = config or ScoringConfig()
    grid = config.score_grid(model.grid)
    kinds = tuple(kinds) if kinds is not None else tuple(k for k in (config.references,) if k)
    bank = model.build_bank(train_images, config.test_negatives, seed=seed, precision=precision)
    references = model.build_references(train_images, knn_size or config.knn_bank, seed=seed + 1, kinds=kinds,
                                        grid=grid, precision=precision) if kinds else {}
    calibration = None
    if calibration_images is not None and len(calibration_images):
        raw = score_patches(model, calibration_images, bank, references, batch_size, device, precision=precision,
                            grid=grid)
        calibration = ScoreCalibration.fit(raw)
    return {"bank": bank, "references": references, "calibration": calibration, "config": config, "grid": grid}


def score_images(model: CPCAD, images: torch.Tensor, bank: torch.Tensor, batch_size: int = 16,
                 device: str | torch.device = "auto", progress: bool = False, precision: str = "auto",
                 grid: PatchGrid | None = None) -> torch.Tensor:
    """CPC-AD patch loss maps of uint8 images (N, C, H, W) -> (N, n_sub, G, G) on the score
    `grid` (default the training grid), deterministic.

    Sub-images are scored one grid at a time, against the same bank of train/good negatives.
    """
    return score_patches(model, images, bank, None, batch_size, device, progress, precision, grid)["loss"]


REDUCES = ("mean", "max", "top10")


def image_scores(patch_maps: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """(N, n_sub, G, G) -> (N,): the mean patch score (CPC-AD paper), the max, or "top10", the
    mean of the highest 10% of patches (at least one): a defect covers a few patches, which the
    mean dilutes over the whole image and the max reads from one noisy patch."""
    flat = patch_maps.flatten(1)
    if reduce == "mean":
        return flat.mean(1)
    if reduce == "max":
        return flat.max(1).values
    if reduce == "top10":
        return flat.topk(max(1, flat.shape[1] // 10), dim=1).values.mean(1)
    raise ValueError(f"unknown reduce {reduce!r}; choose from {REDUCES}")


SPREAD_FLOOR = 1e-6  # a calibration spread at or below this is none: the calibration is degenerate


@dataclass
class ScoreCalibration:
    """Per-position standardisation of raw patch scores, fitted on normal images only.

    Border positions and naturally hard positions have higher losses on every image; taking
    each grid position's mean out, and dividing by the spread of all positions together (a
    per-position spread from a handful of images is too noisy), puts every position and every
    score kind on one scale, so they can be compared and added. mean: {kind: (n_sub, G, G)};
    std: {kind: float}, floored at SPREAD_FLOOR.
    """
    mean: dict[str, torch.Tensor]
    std: dict[str, float]

    @classmethod
    def fit(cls, raw: dict[str, torch.Tensor]) -> "ScoreCalibration":
        """Fit on raw maps {kind: (N, n_sub, G, G)} of normal images (N >= 2)."""
        mean, std = {}, {}
        for kind, maps in raw.items():
            if len(maps) < 2:
                raise ValueError(f"calibration needs at least 2 normal images, got {len(maps)}")
            mean[kind] = maps.float().mean(0)
            std[kind] = max(float((maps.float() - mean[kind]).std()), SPREAD_FLOOR)
        return cls(mean, std)

    @property
    def degenerate(self) -> list[str]:
        """Score kinds whose calibration normals had no spread (at the floor): all alike, e.g.
        identical training images. Dividing by the floor blows any difference up a million-fold,
        so their calibrated scores, and thresholds read from them, mean nothing."""
        return [k for k, s in self.std.items() if s <= SPREAD_FLOOR]

    def check(self) -> dict:
        """{"status": "ok" | "degenerate", "message": str}: for metrics.json, beside `learning_check`."""
        if self.degenerate:
            return {"status": "degenerate", "message": (
                f"degenerate calibration: the calibration normals' {', '.join(self.degenerate)} scores have no "
                f"spread (at most {SPREAD_FLOOR:g}; are the training images all alike?), so calibrated scores "
                "and thresholds are meaningless, however good the metrics look")}
        return {"status": "ok", "message": "calibration spreads: " + ", ".join(f"{k} {v:.3g}" for k, v in self.std.items())}

    def __call__(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (v.float() - self.mean[k]) / self.std[k] for k, v in raw.items() if k in self.mean}

    def to_dict(self) -> dict:
        """Plain tensors and floats (what `torch.load(weights_only=True)` reads back)."""
        return {"mean": {k: v.cpu() for k, v in self.mean.items()}, "std": dict(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "ScoreCalibration":
        return cls({k: v.float() for k, v in d["mean"].items()}, {k: float(v) for k, v in d["std"].items()})


DETECTORS: dict[str, Callable[[dict, dict], torch.Tensor]] = {
    # name: (raw maps, calibrated maps) -> patch anomaly maps, (N, n_sub, G, G)
    "cpcad": lambda raw, cal: raw["loss"],                         # pure CPC-AD: the paper's score
    "cpcad_cal": lambda raw, cal: cal["loss"],                     # standardised per grid position
    "cpcad_2sided": lambda raw, cal: cal["loss"].abs(),            # too predictable is unusual too
    "knn": lambda raw, cal: cal["knn"],                            # typicality alone (not CPC-AD)
    "cpcad_knn": lambda raw, cal: cal["loss"] + cal["knn"],        # unpredictable or untypical
    "knn_ms": lambda raw, cal: cal["knn_ms"],                      # multi-scale typicality alone
    "cpcad_knn_ms": lambda raw, cal: cal["loss"] + cal["knn_ms"],  # unpredictable or untypical at any scale
    "knn_stats": lambda raw, cal: cal["knn_stats"],                # typicality of stage statistics alone
    "cpcad_knn_stats": lambda raw, cal: cal["loss"] + cal["knn_stats"],  # ... also in texture energy
}


def detector_references(detector: str) -> str | None:
    """The kNN references a detector reads (one of REFERENCE_KINDS), None for the loss alone."""
    return next((k for k in sorted(REFERENCE_KINDS, key=len, reverse=True) if detector.endswith(k)), None)


def detector_maps(raw: dict[str, torch.Tensor], calibration: ScoreCalibration | None,
                  detector: str) -> torch.Tensor:
    """Patch anomaly maps of one named detector from raw `score_patches` output."""
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; choose from {', '.join(DETECTORS)}")
    if detector != "cpcad" and calibration is None:
        raise ValueError(f"detector {detector!r} needs a ScoreCalibration fitted on normal images")
    kind = detector_references(detector)
    if kind and kind not in raw:
        raise ValueError(f"detector {detector!r} needs {kind} scores: pass references to score_patches")
    return DETECTORS[detector](raw, calibration(raw) if calibration is not None else {})


@torch.no_grad()
def pixel_baseline(train_images: torch.Tensor, test_images: torch.Tensor, grid: PatchGrid,
                   resolution: int = 8, device: str | torch.device = "auto", chunk: int = 2048) -> torch.Tensor:
    """Non-learned reference: raw-pixel patch nearest-neighbour distance to train patches.

    Each patch is average-pooled to `resolution` x `resolution` pixels and compared (L2) with
    every train/good patch at any position. Returns (N, n_sub, G, G) distance maps; use the
    max as the image score and `patches_to_pixels` for the pixel map.
    """
    device = resolve_device(device)

    def features(images):
        out = []
        for idx in _batches(len(images), 32, None):
            p = extract_patches(to_float(images[idx].to(device)), grid)              # (B', G, G, C, P, P)
            Bp, G = p.shape[:2]
            p = F.adaptive_avg_pool2d(p.reshape(Bp * G * G, *p.shape[3:]), resolution)
            out.append(p.flatten(1))                                                 # (B'*G*G, C*r*r)
        return torch.cat(out)

    bank = features(train_images)
    query = features(test_images)
    dist = torch.cat([torch.cdist(q, bank).min(1).values for q in query.split(chunk)])
    G = grid.grid
    return dist.cpu().view(len(test_images), -1, G, G)
