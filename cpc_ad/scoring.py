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
from .head import DefectHead, fit_head
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
    detector: str = "auto"        # the anomaly map: a key of DETECTORS, or "auto": chosen per class on validation
    reduce: str = "auto"          # the image score: a name in REDUCES, or "auto": chosen with the detector
    candidates: tuple[str, ...] = ()  # what "auto" chooses from (keys of DETECTORS); () is CANDIDATES
    test_negatives: int = 1024    # train/good patches of the training grid: CPC-AD's negatives when scoring
    knn_bank: int = 16384         # train/good patches of the score grid the kNN typicality compares with
    dense_scoring: bool = True    # maps on the training grid at half its stride (`score_grid`)

    def __post_init__(self):
        check_param("detector", self.detector, "str", choices=(AUTO, *DETECTORS))
        check_param("reduce", self.reduce, "str", choices=(AUTO, *REDUCES))
        if isinstance(self.candidates, str) or not all(isinstance(d, str) for d in self.candidates):
            raise ValueError(f"candidates must be a list of detector names, got {self.candidates!r}")
        unknown = [d for d in self.candidates if d not in DETECTORS]
        if unknown:
            raise ValueError(f"unknown candidates {unknown}; choose from {', '.join(DETECTORS)}")
        self.candidates = tuple(self.candidates)
        check_param("test_negatives", self.test_negatives, "int", low=1)
        check_param("knn_bank", self.knn_bank, "int", low=1)
        check_param("dense_scoring", self.dense_scoring, "bool")

    @property
    def choosing(self) -> bool:
        """Whether the detector or the reduction is chosen per class on validation (`selection.py`)."""
        return AUTO in (self.detector, self.reduce)

    @property
    def detectors(self) -> tuple[str, ...]:
        """The detectors this config scores: the forced one, or the candidates "auto" chooses from."""
        return (self.detector,) if self.detector != AUTO else (self.candidates or CANDIDATES)

    @property
    def reduces(self) -> tuple[str, ...]:
        return (self.reduce,) if self.reduce != AUTO else REDUCES

    @property
    def kinds(self) -> tuple[str, ...]:
        """The score kinds beyond the loss its detectors read: kNN references (REFERENCE_KINDS)
        and raw-pixel references (PIXEL_KINDS), in that order."""
        return score_kinds(self.detectors)

    def score_grid(self, grid: PatchGrid) -> PatchGrid:
        """The grid the anomaly maps are on: with `dense_scoring` the training grid at half its
        stride (an even stride: the training grid's patches are every other one of it, so one
        encoding pass serves both), otherwise the training grid itself."""
        if not self.dense_scoring or grid.stride % 2:
            return grid
        return dataclasses.replace(grid, stride=grid.stride // 2)


def scoring_config(preset: str = "fast", **overrides) -> ScoringConfig:
    """ScoringConfig from a named preset, then `overrides` (None keeps the preset's value).
    "fast": the defaults (detector and reduction chosen per class on its validation set);
    "paper": pure CPC-AD loss as the map, the mean as the image score, on the training grid,
    as de Haan & Loewe published it."""
    if preset not in ("fast", "paper"):
        raise ValueError(f"unknown preset {preset!r}; choose fast or paper")
    base = dict(detector="cpcad", reduce="mean", dense_scoring=False) if preset == "paper" else {}
    return make_config(ScoringConfig, **{**base, **{k: v for k, v in overrides.items() if v is not None}})


@torch.no_grad()
def score_patches(model: CPCAD, images: torch.Tensor, bank: torch.Tensor,
                  references: dict[str, torch.Tensor] | None = None, batch_size: int = 16,
                  device: str | torch.device = "auto", progress: bool = False,
                  precision: str = "auto", grid: PatchGrid | None = None,
                  head: DefectHead | None = None) -> dict[str, torch.Tensor]:
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
    from every normal patch, which the kNN scores see. With `head` (`fit_head`), also "head":
    its defect logit of each patch, from the same descriptors. One encoding pass gives them all.
    `precision` is the run's (`TrainConfig.precision`), so scoring computes as training did.
    """
    device = resolve_device(device)
    model.eval().to(device)
    bank = bank.to(device)
    refs = {k: [_prepare_references(k, r.float()) for r in v.to(device)] for k, v in (references or {}).items()}
    images = images.to(device)  # one host->device copy (a no-op on CPU), not one per batch
    grid = grid or model.grid
    G, dense = grid.grid, grid != model.grid
    head = head.to(device) if head is not None else None
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("loss", *refs, *(HEAD_KINDS if head is not None else ()))}
    for idx in tqdm(_batches(len(images), batch_size, None), desc="score", disable=not progress):
        x = to_float(images[idx.to(device)])
        with autocast(device, precision):
            if refs or head is not None:  # descriptors on the score grid; the training grid's z are every other patch of it
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
        if head is not None:  # every encoder's stage statistics, as `head_features` gives them
            out["head"].append(head(torch.cat([g[2].float() for g in grids], dim=1)))
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
    grid, as each kNN kind of `kinds`: embeddings z ("knn"), multi-scale descriptors ("knn_ms"),
    stage statistics ("knn_stats"); pixels: the train/good images' raw pixels on the score grid
    (`PixelReferences`) when `kinds` holds a kind of PIXEL_KINDS; head: a DefectHead fitted on
    the train/good images with training-only defects (`fit_head`) when `kinds` holds "head". By default `kinds` are those
    the config's detectors read (`ScoringConfig.kinds`). calibration: a ScoreCalibration
    fitted on `calibration_images`, normal images held out of training (train images would look
    too normal: the model has fitted them, and their own patches sit among the references), and
    calibration_raw, their raw scores. grid: the score grid.
    Everything is encoded at the run's `precision`, as `score_patches` must then be called.
    """
    config = config or ScoringConfig()
    grid = config.score_grid(model.grid)
    kinds = tuple(kinds) if kinds is not None else config.kinds
    unknown = [k for k in kinds if k not in (*REFERENCE_KINDS, *HEAD_KINDS, *PIXEL_KINDS)]
    if unknown:
        raise ValueError(f"unknown score kinds {unknown}; choose from "
                         f"{', '.join(REFERENCE_KINDS + HEAD_KINDS + PIXEL_KINDS)}")
    knn = [k for k in kinds if k in REFERENCE_KINDS]
    bank = model.build_bank(train_images, config.test_negatives, seed=seed, precision=precision)
    references = model.build_references(train_images, knn_size or config.knn_bank, seed=seed + 1, kinds=knn,
                                        grid=grid, precision=precision) if knn else {}
    pixels = PixelReferences.build(train_images, grid, [k for k in PIXEL_KINDS if k in kinds], device=device) \
        if any(k in PIXEL_KINDS for k in kinds) else None
    head = fit_head(model, train_images, grid, seed=seed + 2, device=device, precision=precision) \
        if "head" in kinds else None
    scoring = {"bank": bank, "references": references, "pixels": pixels, "head": head, "calibration": None,
               "calibration_raw": None, "config": config, "grid": grid}
    if calibration_images is not None and len(calibration_images):
        scoring["calibration_raw"] = raw_scores(model, calibration_images, scoring, batch_size, device,
                                                precision=precision)
        scoring["calibration"] = ScoreCalibration.fit(scoring["calibration_raw"])
    return scoring


def raw_scores(model: CPCAD, images: torch.Tensor, scoring: dict, batch_size: int = 16,
               device: str | torch.device = "auto", progress: bool = False,
               precision: str = "auto") -> dict[str, torch.Tensor]:
    """Every raw score `prepare_scoring`'s output can give of uint8 images (N, C, H, W): the
    loss and kNN kinds (`score_patches`) and the raw-pixel kinds (`PixelReferences`), each
    (N, n_sub, G, G) on the score grid, on the CPU."""
    raw = score_patches(model, images, scoring["bank"], scoring["references"], batch_size, device, progress,
                        precision, scoring["grid"], scoring.get("head"))
    if scoring.get("pixels") is not None:
        raw.update(scoring["pixels"].distances(images, device=device))
    return raw


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


AUTO = "auto"  # ScoringConfig's detector / reduce: chosen per class on its validation set (selection.py)
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
    "pixel": lambda raw, cal: raw["pixel"],                        # raw pixels, nearest train patch: nothing learned
    "pixel_pos": lambda raw, cal: raw["pixel_pos"],                # ... at the same place (aligned objects)
    "knn_stats_pixel": lambda raw, cal: cal["knn_stats"] + cal["pixel"],  # learned and pixel typicality
    "knn_stats_pixel_pos": lambda raw, cal: cal["knn_stats"] + cal["pixel_pos"],  # ... pixels at the same place
    "head": lambda raw, cal: cal["head"],                          # a head trained on synthetic defects (head.py)
    "knn_stats_head": lambda raw, cal: cal["knn_stats"] + cal["head"],  # untypical or defect-like
}
DETECTOR_PARTS: dict[str, tuple[str, ...]] = {  # the raw score kinds each detector reads
    "cpcad": ("loss",), "cpcad_cal": ("loss",), "cpcad_2sided": ("loss",), "knn": ("knn",),
    "cpcad_knn": ("loss", "knn"), "knn_ms": ("knn_ms",), "cpcad_knn_ms": ("loss", "knn_ms"),
    "knn_stats": ("knn_stats",), "cpcad_knn_stats": ("loss", "knn_stats"), "pixel": ("pixel",),
    "pixel_pos": ("pixel_pos",), "knn_stats_pixel": ("knn_stats", "pixel"),
    "knn_stats_pixel_pos": ("knn_stats", "pixel_pos"), "head": ("head",), "knn_stats_head": ("knn_stats", "head"),
}
HEAD_KINDS = ("head",)  # the defect head's logit (head.py): fitted after training, on synthetic defects
UNCALIBRATED = ("cpcad", "pixel", "pixel_pos")  # raw maps: they need no ScoreCalibration
CANDIDATES = ("cpcad", "knn_stats", "cpcad_knn_stats", "pixel", "pixel_pos", "knn_stats_pixel",
              "knn_stats_pixel_pos", "head", "knn_stats_head")  # what "auto" chooses from, each with every reduction
FIXED = ("knn_stats", "top10")  # one detector for every class beside the chosen ones (the study's earlier default)
assert set(DETECTOR_PARTS) == set(DETECTORS) and set(CANDIDATES) <= set(DETECTORS)


def detector_references(detector: str) -> str | None:
    """The kNN references a detector reads (one of REFERENCE_KINDS), None for none."""
    return next((k for k in DETECTOR_PARTS[detector] if k in REFERENCE_KINDS), None)


def score_kinds(detectors: Sequence[str]) -> tuple[str, ...]:
    """The score kinds beyond the loss that `detectors` read: REFERENCE_KINDS, HEAD_KINDS, PIXEL_KINDS."""
    parts = {k for d in detectors for k in DETECTOR_PARTS[d]}
    return tuple(k for k in (*REFERENCE_KINDS, *HEAD_KINDS, *PIXEL_KINDS) if k in parts)


def detector_maps(raw: dict[str, torch.Tensor], calibration: ScoreCalibration | None,
                  detector: str) -> torch.Tensor:
    """Patch anomaly maps of one named detector from raw scores (`raw_scores`)."""
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; choose from {', '.join(DETECTORS)}")
    if detector not in UNCALIBRATED and calibration is None:
        raise ValueError(f"detector {detector!r} needs a ScoreCalibration fitted on normal images")
    missing = [k for k in DETECTOR_PARTS[detector] if k not in raw]
    if missing:
        raise ValueError(f"detector {detector!r} needs {', '.join(missing)} scores: pass references "
                         "of its kinds (prepare_scoring) to raw_scores")
    parts = {k: raw[k] for k in DETECTOR_PARTS[detector]}
    return DETECTORS[detector](parts, calibration(parts) if detector not in UNCALIBRATED else {})


PIXEL_KINDS = ("pixel", "pixel_pos")  # raw-pixel nearest-neighbour distances: free of position, or at it
PIXEL_RESOLUTION = 8   # each patch average-pooled to 8 x 8 pixels before comparing
POSITION_RADIUS = 1    # "pixel_pos" compares with train patches at most this many grid steps away


def pixel_cell(grid: PatchGrid, resolution: int = PIXEL_RESOLUTION) -> int | None:
    """The side c of the pixel cells each patch's `resolution` x `resolution` pooling averages
    (patch_size / resolution), when the grid lies on whole cells (image, stride and sub-images in
    multiples of c): every patch's pooled pixels are then cells of the image pooled once, and the
    references need only the pooled images (64 times smaller at c = 8). None otherwise."""
    if grid.patch_size % resolution:
        return None
    c = grid.patch_size // resolution
    sizes = (grid.image_size, grid.stride, grid.subimage_size or c, grid.subimage_stride or c)
    return c if all(n % c == 0 for n in sizes) else None


def pixel_source(images: torch.Tensor, grid: PatchGrid, resolution: int = PIXEL_RESOLUTION,
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """What the raw-pixel features of uint8 images (N, C, H, W) are cut from: the images pooled
    to `pixel_cell`s, (N, C, H/c, W/c) float32, or the uint8 images where the grid is not on cells."""
    c = pixel_cell(grid, resolution)
    if c is None:
        return images
    return torch.cat([F.avg_pool2d(to_float(images[idx].to(device)), c) for idx in _batches(len(images), 64, None)])


def pixel_features(images: torch.Tensor, grid: PatchGrid, resolution: int = PIXEL_RESOLUTION,
                   device: str | torch.device = "cpu", source: torch.Tensor | None = None) -> torch.Tensor:
    """Every patch of `grid` of uint8 images (N, C, H, W) average-pooled to `resolution` x
    `resolution` pixels, (N, n_sub, G, G, C * r * r) float32 on `device`; from `source`
    (`pixel_source` of the images) when given."""
    source = pixel_source(images, grid, resolution, device) if source is None else source.to(device)
    c = pixel_cell(grid, resolution) if source.dtype != torch.uint8 else None
    out = []
    for idx in _batches(len(source), 32, None):
        if c is None:  # pool every patch
            p = extract_patches(to_float(source[idx]), grid)                     # (B', G, G, C, P, P)
            Bp, G = p.shape[:2]
            p = F.adaptive_avg_pool2d(p.reshape(Bp * G * G, *p.shape[3:]), resolution)
        else:  # cut the pooled patches out of the pooled image: the same numbers, no pooling per patch
            cells = PatchGrid(grid.image_size // c, resolution, grid.stride // c,
                              grid.subimage_size and grid.subimage_size // c,
                              grid.subimage_stride and grid.subimage_stride // c)
            p = extract_patches(source[idx], cells)                              # (B', G, G, C, r, r)
            Bp, G = p.shape[:2]
        out.append(p.reshape(Bp, G, G, -1))                                      # (B', G, G, C*r*r)
    f = torch.cat(out)
    return f.view(len(source), -1, *f.shape[1:])                                 # (N, n_sub, G, G, D)


@dataclass
class PixelReferences:
    """The train/good images' raw pixels on the score grid, the references of the raw-pixel
    kinds: "pixel", each patch's L2 distance to the nearest train patch at any position (the
    floor every learned detector is measured against); "pixel_pos", to the nearest train
    patch within POSITION_RADIUS grid steps of its own position. On aligned objects a blank
    where an imprint belongs matches a blank elsewhere on the object; it does not match the
    imprints found at its own place. Nothing is learned: the bundle keeps `source`."""
    source: torch.Tensor            # `pixel_source` of the train/good images: pooled cells, or the uint8 images
    features: torch.Tensor          # (M, n_sub, G, G, D), `pixel_features` of them
    grid: PatchGrid
    kinds: tuple[str, ...] = PIXEL_KINDS
    resolution: int = PIXEL_RESOLUTION

    @classmethod
    def build(cls, images: torch.Tensor, grid: PatchGrid, kinds: Sequence[str] = PIXEL_KINDS,
              device: str | torch.device = "cpu", resolution: int = PIXEL_RESOLUTION) -> "PixelReferences":
        """From uint8 train images (M, C, H, W)."""
        return cls.from_source(pixel_source(images, grid, resolution, resolve_device(device)), grid, kinds, device,
                               resolution)

    @classmethod
    def from_source(cls, source: torch.Tensor, grid: PatchGrid, kinds: Sequence[str] = PIXEL_KINDS,
                    device: str | torch.device = "cpu", resolution: int = PIXEL_RESOLUTION) -> "PixelReferences":
        """From a `source` (what a bundle keeps)."""
        features = pixel_features(None, grid, resolution, resolve_device(device), source=source)
        return cls(source.cpu(), features, grid, tuple(kinds), resolution)

    @torch.no_grad()
    def distances(self, images: torch.Tensor, device: str | torch.device = "cpu",
                  chunk: int = 2048) -> dict[str, torch.Tensor]:
        """{kind: (N, n_sub, G, G)} of uint8 images (N, C, H, W), on the CPU."""
        device = resolve_device(device)
        ref = self.features.to(device)
        out = {k: [] for k in self.kinds}
        for idx in _batches(len(images), 16, None):
            q = pixel_features(images[idx], self.grid, self.resolution, device)      # (B, n_sub, G, G, D)
            if "pixel" in out:
                flat = ref.reshape(-1, ref.shape[-1])
                d = torch.cat([torch.cdist(part, flat).min(1).values for part in q.reshape(-1, q.shape[-1]).split(chunk)])
                out["pixel"].append(d.view(q.shape[:-1]).cpu())
            if "pixel_pos" in out:
                out["pixel_pos"].append(_nearest_nearby(q, ref, POSITION_RADIUS).cpu())
        return {k: torch.cat(v) for k, v in out.items()}


def _nearest_nearby(q: torch.Tensor, ref: torch.Tensor, radius: int) -> torch.Tensor:
    """L2 distance of each query patch (B, n_sub, G, G, D) to the nearest reference patch
    (M, n_sub, G, G, D) of the same sub-image at most `radius` grid steps away: (B, n_sub, G, G)."""
    G = q.shape[2]
    q2 = (q ** 2).sum(-1)                                                        # (B, n_sub, G, G)
    best = torch.full(q.shape[:-1], float("inf"), device=q.device)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            # the reference patches dy, dx steps from each position, where there are any
            ys, xs = slice(max(0, -dy), G - max(0, dy)), slice(max(0, -dx), G - max(0, dx))
            ry, rx = slice(max(0, dy), G - max(0, -dy)), slice(max(0, dx), G - max(0, -dx))
            r = ref[:, :, ry, rx]                                                # (M, n_sub, g, g', D)
            dot = torch.einsum("bsijd,msijd->bmsij", q[:, :, ys, xs], r)
            d2 = q2[:, None, :, ys, xs] + (r ** 2).sum(-1)[None] - 2 * dot       # (B, M, n_sub, g, g')
            best[:, :, ys, xs] = torch.minimum(best[:, :, ys, xs], d2.min(1).values)
    return best.clamp_min(0).sqrt()


def pixel_baseline(train_images: torch.Tensor, test_images: torch.Tensor, grid: PatchGrid,
                   resolution: int = PIXEL_RESOLUTION, device: str | torch.device = "auto") -> torch.Tensor:
    """Non-learned reference: raw-pixel patch nearest-neighbour distance to train patches, the
    "pixel" detector's map (`PixelReferences`). Each patch is average-pooled to `resolution` pixels and
    compared (L2) with every train/good patch at any position. Returns (N, n_sub, G, G)
    distance maps; `patches_to_pixels` makes the pixel map."""
    refs = PixelReferences.build(train_images, grid, ("pixel",), device, resolution)
    return refs.distances(test_images, device)["pixel"]
