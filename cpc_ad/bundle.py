"""The model bundle: one file with everything scoring needs (weights, grid, negative bank, kNN
references, calibration, thresholds, the training images' colour mode), read with
weights_only=True, and scoring image tensors with it (`Bundle.score`); scoring image files,
`python -m cpc_utils score`, is inference.py's."""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
import pickle
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import save_atomic
from .checks import check_param
from .patches import PatchGrid, patches_to_pixels
from .devices import PRECISIONS, resolve_device
from .head import DefectHead
from .models import CPCAD, CPCADConfig, REFERENCE_KINDS, encode_grid
from .runs import code_version
from .scoring import (AUTO, DETECTOR_PARTS, PIXEL_KINDS, PixelReferences, pixel_cell, ScoreCalibration, ScoringConfig, detector_maps,
                      image_scores, score_kinds, score_patches)


# A trained model as a tool: one file with everything scoring needs (weights, grid, negative
# bank, kNN references, calibration, thresholds); `python -m cpc_utils score` on new images.

BUNDLE_FORMAT = "cpc_utils.bundle"
BUNDLE_VERSION = 5  # raise it when a bundle's contents change meaning; load_bundle refuses others
READABLE_VERSIONS = (3, 4, 5)  # 4: raw-pixel references (`pixel_source`) for the pixel detectors; 5: the defect head
IMAGE_HANDLING = ("8-bit RGB: grayscale replicated to 3 equal channels, 16-bit scaled to 8 bit (read_image); "
                  "resized bilinearly to image_size x image_size")
_COLOUR_MODES = ("grayscale", "colour", "mixed")  # what `colour_mode` says of a set of images


def colour_mode(images: torch.Tensor) -> str:
    """The colour mode of uint8 images (N, 3, H, W): "grayscale" when every image has three
    equal channels (as `read_image` makes of a grayscale file), "colour" when none has, else
    "mixed". A bundle records its training images' mode: a model that only ever saw equal
    channels flags any colour as anomalous, whatever the image shows, and the reverse."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3 or not len(images):
        raise ValueError(f"colour_mode reads uint8 images (N, 3, H, W), N >= 1, got {images.dtype} "
                         f"{tuple(images.shape)}")
    grey = _grayscale(images)
    return "grayscale" if bool(grey.all()) else "colour" if not bool(grey.any()) else "mixed"


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    """(N,) bool: which of the images (N, 3, H, W) have three equal channels."""
    return ((images[:, 0] == images[:, 1]) & (images[:, 1] == images[:, 2])).flatten(1).all(1)


def _colour_note(trained: str, n: int, total: int, where: str) -> str:
    """One line: `n` of `total` images are of the other colour mode than the `trained` one."""
    other = "colour" if trained == "grayscale" else "grayscale"
    return (f"{n} of {total} images are {other} while the model {where} was trained on {trained} images: "
            "their scores are not comparable with its threshold")


def save_bundle(path: str | os.PathLike, model: CPCAD, scoring: dict, threshold: dict, pixel_threshold: dict,
                data: dict | None = None, precision: str = "fp32", colour: str | None = None) -> Path:
    """Write a self-contained model bundle, all `load_bundle` needs to score new images.

    It holds the weights, the CPCADConfig, ScoringConfig and PatchGrid (as dicts), the negative bank, the kNN
    references the detector reads (only those), the train/good images' pixels when it reads raw
    pixels (`pixel_source`, `PixelReferences.source`: pooled to the cells every patch averages, or
    the uint8 images; the references are rebuilt from it on load), the defect head's weights when it
    reads the head (`fit_head`), the score calibration, the image
    size and handling, the image and pixel thresholds with their rules (`normal_threshold`),
    the bundle format version, `code_version()` and the training data's fingerprint (`data`,
    e.g. `data_fingerprint(root, category)`). Tensors are moved to the CPU and everything is
    plain tensors and Python values, so a bundle trained on a GPU loads on any machine, with
    `torch.load(weights_only=True)`. Written atomically.

    Args:
        scoring: `prepare_scoring`'s {"bank", "references", "calibration", "config", "grid"}.
        threshold, pixel_threshold: `normal_threshold` of the validation normals' image scores
            and pixel scores.
        precision: the precision the run trained and scored in, resolved (`resolve_precision`:
            bf16, fp16 or fp32); the bundle scores in it on a GPU, in fp32 elsewhere.
        colour: the training images' `colour_mode`, None for unknown; scoring images of the
            other mode is then said (`Bundle.score`, `score_files`).
    """
    check_param("precision", precision, "str", choices=PRECISIONS[1:])  # resolved: what the run computed in
    check_param("colour", colour, "str", choices=_COLOUR_MODES, optional=True)
    config: ScoringConfig = scoring["config"]
    if config.choosing:
        raise ValueError("a bundle scores with one detector and reduction: set them (the run's chosen ones) in "
                         f"scoring['config'], got detector={config.detector!r}, reduce={config.reduce!r}")
    kinds = score_kinds([config.detector])
    if "head" in kinds and scoring.get("head") is None:
        raise ValueError(f"detector {config.detector!r} reads the defect head: scoring needs its DefectHead")
    pixels = scoring.get("pixels")
    if any(k in PIXEL_KINDS for k in kinds) and pixels is None:
        raise ValueError(f"detector {config.detector!r} reads raw pixels: scoring needs its PixelReferences")
    calibration = scoring["calibration"]
    bundle = {
        "format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "code_version": code_version(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "config": dataclasses.asdict(model.cfg), "scoring": dataclasses.asdict(config),
        "grid": dataclasses.asdict(model.grid),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "bank": scoring["bank"].detach().cpu(),
        "references": {k: scoring["references"][k].detach().cpu() for k in kinds if k in REFERENCE_KINDS},
        "head": {k: v.detach().cpu() for k, v in scoring["head"].state_dict().items()} if "head" in kinds else None,
        "pixel_source": pixels.source.cpu() if any(k in PIXEL_KINDS for k in kinds) else None,
        "calibration": _calibration_of(calibration, config.detector),
        "image_size": model.grid.image_size, "image_handling": IMAGE_HANDLING,
        "threshold": dict(threshold), "pixel_threshold": dict(pixel_threshold), "data": data,
        "precision": precision, "colour": colour,
    }
    save_atomic(bundle, path)
    return Path(path)


def _calibration_of(calibration: ScoreCalibration | None, detector: str) -> dict | None:
    """The calibration of the kinds `detector` reads, as plain tensors (None when it reads none)."""
    if calibration is None:
        return None
    parts = DETECTOR_PARTS[detector]
    return ScoreCalibration({k: v for k, v in calibration.mean.items() if k in parts},
                            {k: v for k, v in calibration.std.items() if k in parts}).to_dict()


@dataclass
class Bundle:
    """A loaded model bundle (`load_bundle`): scores new images with its scoring config's
    detector and reduce, on its score grid.

    threshold_rule / pixel_threshold_rule: `normal_threshold`'s dicts; info: format_version,
    code_version, created, data (the training data's fingerprint), image_handling, precision,
    colour (the training images' `colour_mode`, None when unknown: bundles before it), path.
    """
    model: CPCAD
    scoring: ScoringConfig
    bank: torch.Tensor
    references: dict[str, torch.Tensor]
    calibration: ScoreCalibration | None
    threshold_rule: dict
    pixel_threshold_rule: dict
    info: dict
    device: torch.device
    pixels: PixelReferences | None = None  # the raw-pixel references of a pixel detector
    head: DefectHead | None = None         # the defect head of a head detector

    @property
    def threshold(self) -> float:
        """Image threshold: an image scoring above it is anomalous."""
        return float(self.threshold_rule["value"])

    @property
    def pixel_threshold(self) -> float:
        """Pixel threshold: the binary mask marks the pixels above it."""
        return float(self.pixel_threshold_rule["value"])

    @property
    def image_size(self) -> int:
        return self.model.grid.image_size

    @property
    def score_grid(self) -> PatchGrid:
        """The grid the patch maps are on (`ScoringConfig.score_grid` of the training grid)."""
        return self.scoring.score_grid(self.model.grid)

    @property
    def calibration_note(self) -> str | None:
        """One line when the score calibration is degenerate (`ScoreCalibration.check`: the
        calibration normals were all alike), so that calibrated scores, the threshold and every
        verdict mean little; None when it is sound or the bundle has none."""
        check = self.calibration.check() if self.calibration is not None else {"status": "ok"}
        if check["status"] == "ok":
            return None
        return f"model bundle {self.info['path']}: {check['message']}; its verdicts mean little"

    def score(self, images: torch.Tensor, batch_size: int = 16, progress: bool = False,
              colour_warning: bool = True) -> dict[str, torch.Tensor]:
        """Score uint8 images (N, 3, S, S), S = `image_size` (as `read_image(path, S)` gives them).

        Images of the other colour mode than the training images' (`colour_mode`, when the
        bundle knows it) are scored with a warning; `colour_warning=False` leaves the warning
        to the caller (`score_files` says it once for all its batches).

        Returns {"scores": (N,) image scores, "anomalous": (N,) bool at `threshold`,
                 "pixel_maps": (N, 1, S, S), "patch_maps": (N, n_sub, G, G),
                 "other_colour": (N,) bool, the images of the other colour mode}, on the CPU.
        """
        S = self.image_size
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (3, S, S):
            raise ValueError(f"the bundle scores uint8 images (N, 3, {S}, {S}), got {images.dtype} "
                             f"{tuple(images.shape)}: read them with read_image(path, {S})")
        precision = (self.info.get("precision") or "fp32") if self.device.type == "cuda" else "fp32"  # as trained
        raw = score_patches(self.model, images, self.bank, self.references or None, batch_size, self.device, progress,
                            precision, self.score_grid, self.head)
        if self.pixels is not None:
            raw.update(self.pixels.distances(images, self.device))
        maps = detector_maps(raw, self.calibration, self.scoring.detector)  # (N, n_sub, G, G), score grid
        scores = image_scores(maps, self.scoring.reduce)
        trained, grey = self.info.get("colour"), _grayscale(images)
        other = {"grayscale": ~grey, "colour": grey}.get(trained, torch.zeros_like(grey))  # (N,) bool
        if colour_warning and other.any():
            warnings.warn(_colour_note(trained, int(other.sum()), len(images), self.info["path"]))
        return {"scores": scores, "anomalous": scores > self.threshold,
                "pixel_maps": patches_to_pixels(maps, self.score_grid), "patch_maps": maps, "other_colour": other}


def load_bundle(path: str | os.PathLike, device: str | torch.device = "cpu") -> Bundle:
    """Read a bundle written by `save_bundle`, onto `device` (any device, whatever it was trained on).

    Raises FileNotFoundError for a missing file and ValueError, naming the path, for a corrupt
    or truncated file, a file holding pickled Python objects (refused unread: loading it
    could run code), a file that is not a bundle (a training checkpoint), a bundle of
    another format version, and one whose contents cannot score (`_check_bundle_contents`: a
    missing or non-finite threshold, an empty or non-finite bank, references, calibration or
    weights), or do not fit together (`_bundle_misfit`: a grid the bank, references or
    calibration were not made for), here rather than inside torch on the first image scored.
    Warns when its calibration is degenerate (`Bundle.calibration_note`): it scores, but its
    verdicts mean little.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model bundle at {path}" + (
            " (a folder: the bundle is the model.pt that notebook 02 writes next to metrics.json)"
            if path.is_dir() else ""))
    try:
        b = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # what torch's safe loader refused; its advice to load unsafely is dropped
        refused = re.search(r"GLOBAL [\w.]+", str(e))
        if refused:
            raise ValueError(f"refusing model bundle {path}: it holds Python objects, not only tensors and plain "
                             f"types ({refused.group(0)}), and loading it could run code; nothing in it was run; "
                             "write the bundle again with notebook 02") from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
        raise ValueError(f"cannot read model bundle {path}: {detail.group(1) if detail else type(e).__name__} "
                         "(truncated, corrupt, or not a bundle)") from None
    except Exception as e:  # zip and EOF errors for a truncated or foreign file
        raise ValueError(f"cannot read model bundle {path}: {_first_line(e)} (truncated, corrupt, or not a bundle)") from e
    if not isinstance(b, dict) or b.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{path} is not a model bundle (a training checkpoint?); notebook 02 writes the bundle "
                         "as model.pt next to metrics.json")
    if b.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"model bundle {path} has format version {b.get('format_version')} (code "
                         f"{b.get('code_version')}), this cpc_utils ({code_version()}) reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))}: write it again with notebook 02 and this cpc_utils")
    _check_bundle_contents(b, path)
    device = resolve_device(device)
    try:
        cfg = CPCADConfig(**{**b["config"], "directions": tuple(b["config"]["directions"])})
        model = CPCAD(cfg, PatchGrid(**b["grid"]))
        model.load_state_dict(b["state_dict"])
        scoring = ScoringConfig(**b["scoring"])
        calibration = ScoreCalibration.from_dict(b["calibration"]) if b["calibration"] is not None else None
        info = {k: b.get(k) for k in ("format_version", "code_version", "created", "data", "image_handling",
                                      "precision", "colour")}
        kinds = score_kinds([scoring.detector])
        pixels = PixelReferences.from_source(b["pixel_source"], scoring.score_grid(model.grid),
                                             [k for k in PIXEL_KINDS if k in kinds], device) \
            if b.get("pixel_source") is not None else None
        head = DefectHead.from_state(b["head"]).eval().to(device) if b.get("head") is not None else None
        bundle = Bundle(model.eval().to(device), scoring, b["bank"].to(device), {k: v.to(device) for k, v in b["references"].items()},
                        calibration, b["threshold"], b["pixel_threshold"], {**info, "path": str(path)}, device, pixels,
                        head)
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise ValueError(f"model bundle {path} is inconsistent: {_first_line(e)}") from e
    misfit = _bundle_misfit(bundle)
    if misfit:
        raise ValueError(f"model bundle {path} is inconsistent: {misfit}")
    if bundle.calibration_note:
        warnings.warn(bundle.calibration_note)
    return bundle


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


BUNDLE_CONTENTS = {"config": dict, "scoring": dict, "grid": dict, "state_dict": dict, "bank": torch.Tensor, "references": dict,
                   "calibration": (dict, type(None)), "image_size": int, "threshold": dict, "pixel_threshold": dict}


def _check_bundle_contents(b: dict, path: Path) -> None:
    """Raise ValueError, naming `path` and what was expected, for contents a bundle cannot score
    with: a missing entry or one of the wrong type, a threshold that is not a finite number, an
    empty or non-finite bank, reference set or calibration, non-finite weights. A NaN anywhere
    in them would make every score NaN, and every verdict "normal" (NaN > threshold is False)."""
    def fail(what: str) -> None:
        raise ValueError(f"model bundle {path} {what}; write it again with notebook 02")

    for key, kind in BUNDLE_CONTENTS.items():
        if key not in b:
            fail(f"has no {key!r}")
        if not isinstance(b[key], kind) or isinstance(b[key], bool):
            expected = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
            fail(f"has a {type(b[key]).__name__} as {key!r}, expected {expected}")
    for key in ("threshold", "pixel_threshold"):
        if "value" not in b[key]:
            fail(f"has no {key} value, expected a finite number")
        value = b[key]["value"]
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
            fail(f"has {key} value {value!r}, expected a finite number")
    if b["image_size"] != b["grid"].get("image_size"):
        fail(f"has image_size {b['image_size']} but a grid for {b['grid'].get('image_size')} px images")
    detector = b["scoring"].get("detector")
    if detector == AUTO or (isinstance(detector, str) and detector not in DETECTOR_PARTS):
        fail(f"has detector {detector!r}, expected one of {', '.join(DETECTOR_PARTS)}")
    kinds = score_kinds([detector]) if isinstance(detector, str) else ()
    for kind in kinds:
        if kind in REFERENCE_KINDS and kind not in b["references"]:
            fail(f"has no {kind} references, which its detector {detector!r} reads")
    if "head" in kinds and not isinstance(b.get("head"), dict):
        fail(f"has no defect head weights, which its detector {detector!r} reads")
    if any(k in PIXEL_KINDS for k in kinds):
        _check_pixel_source(b, fail)
    if detector not in (None, "cpcad", "pixel", "pixel_pos") and b["calibration"] is None:
        fail(f"has no calibration, which its detector {detector!r} needs")
    unknown = [k for k in b["references"] if k not in REFERENCE_KINDS]
    if unknown:
        fail(f"has references of unknown kinds {unknown}, expected some of {REFERENCE_KINDS}")
    calibration = b["calibration"] or {"mean": {}, "std": {}}
    if not isinstance(calibration.get("mean"), dict) or not isinstance(calibration.get("std"), dict):
        fail("has a calibration without 'mean' and 'std' dicts")
    tensors = {"bank": b["bank"], **{f"references[{k!r}]": v for k, v in b["references"].items()},
               **{f"calibration mean[{k!r}]": v for k, v in calibration["mean"].items()},
               **{f"weights {k!r}": v for k, v in b["state_dict"].items()},
               **{f"head weights {k!r}": v for k, v in (b.get("head") or {}).items()}}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            fail(f"has a {type(t).__name__} as {name}, expected a tensor")
        if "weights" not in name and t.numel() == 0:
            fail(f"has an empty {name} {tuple(t.shape)}, expected at least one value")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            fail(f"has non-finite values in {name}, expected finite numbers")
    for k, std in calibration["std"].items():
        if not isinstance(std, numbers.Real) or isinstance(std, bool) or not math.isfinite(std) or std <= 0:
            fail(f"has calibration std[{k!r}] {std!r}, expected a finite positive number")
    if b.get("colour") not in (None, *_COLOUR_MODES):  # optional: bundles before it have none
        fail(f"has colour {b['colour']!r}, expected None or one of {', '.join(_COLOUR_MODES)}")


def _check_pixel_source(b: dict, fail) -> None:
    """The raw-pixel references a pixel detector compares with: the uint8 train images (N, 3, S, S),
    or, on a grid of whole cells of c px (`pixel_cell`), the images pooled to them, (N, 3, S/c, S/c)
    finite float32; `fail` otherwise."""
    source, detector = b.get("pixel_source"), b["scoring"]["detector"]
    S = b["grid"].get("image_size")
    try:
        c = pixel_cell(PatchGrid(**b["grid"]))
    except (TypeError, ValueError):
        c = None  # a grid of another shape: named by the checks after this one
    side = S if c is None else S // c
    want = (f"uint8 (N, 3, {S}, {S})" if c is None else f"float32 (N, 3, {side}, {side})")
    ok = (isinstance(source, torch.Tensor) and source.ndim == 4 and len(source) and tuple(source.shape[1:]) == (3, side, side)
          and source.dtype == (torch.uint8 if c is None else torch.float32))
    if not ok:
        got = f"{source.dtype} {tuple(source.shape)}" if isinstance(source, torch.Tensor) else type(source).__name__
        fail(f"has pixel_source {got}, expected {want}: the train images' pixels, which its detector {detector!r} "
             "compares with")
    if source.is_floating_point() and not bool(torch.isfinite(source).all()):
        fail("has non-finite values in pixel_source, expected finite numbers")


def _bundle_misfit(bundle: Bundle) -> str | None:
    """What of a loaded bundle's bank, references and calibration does not fit its model and
    grid, or None. The weights do not fix the patch size, which sets the descriptors' sizes,
    nor the score grid, which sets the calibration's: a mismatch would fail only in scoring,
    inside torch. One patch through the encoder gives the sizes."""
    model, grid = bundle.model, bundle.score_grid
    n_enc, P = len(model.encoders), grid.patch_size
    x = torch.zeros(1, 3, P, P, device=bundle.device)
    with torch.no_grad():  # (1, D | D_ms | D_stats, 1, 1) each, in REFERENCE_KINDS order
        sizes = [t.shape[1] for t in encode_grid(model.encoders[0], x, PatchGrid(P, P, P), multiscale=True)]
    want = {"bank": sizes[0], **{f"references[{k!r}]": sizes[REFERENCE_KINDS.index(k)] for k in bundle.references}}
    for name, t in zip(want, [bundle.bank, *bundle.references.values()]):
        if t.ndim != 3 or t.shape[0] != n_enc or t.shape[2] != want[name]:
            return (f"{name} is {tuple(t.shape)}, expected ({n_enc}, M, {want[name]}) for {n_enc} encoder(s) "
                    f"on {P} px patches (the grid {dataclasses.asdict(model.grid)})")
    if bundle.head is not None and bundle.head.mean.numel() != n_enc * sizes[2]:
        return (f"the defect head reads {bundle.head.mean.numel()} descriptor dimensions, expected {n_enc} x "
                f"{sizes[2]} for {n_enc} encoder(s) on {P} px patches")
    shape = (grid.num_subimages ** 2, grid.grid, grid.grid)  # (n_sub, G, G) of the score grid
    for k, m in (bundle.calibration.mean.items() if bundle.calibration is not None else ()):
        if tuple(m.shape) != shape:
            return (f"calibration mean[{k!r}] is {tuple(m.shape)}, expected {shape} on the score grid "
                    f"{dataclasses.asdict(grid)}")
    return None
