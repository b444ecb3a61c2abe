"""The model bundle: one file with everything scoring needs (weights, grid, negative bank, kNN
references, calibration, thresholds), read with weights_only=True, and scoring new images
with it (`python -m cpc_utils score`)."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .files import save_atomic, save_json
from .data import IMAGE_EXTENSIONS, _is_macos_metadata, _open_rgb, _resized_tensor
from .checks import check_param
from .patches import PatchGrid, patches_to_pixels
from .devices import PRECISIONS, resolve_device
from .models import CPCAD, CPCADConfig, REFERENCE_KINDS, encode_grid
from .runs import code_version
from .scoring import ScoreCalibration, ScoringConfig, detector_maps, detector_references, image_scores, score_patches
from .plots import HEATMAP_CMAP


# A trained model as a tool: one file with everything scoring needs (weights, grid, negative
# bank, kNN references, calibration, thresholds); `python -m cpc_utils score` on new images.

BUNDLE_FORMAT = "cpc_utils.bundle"
BUNDLE_VERSION = 3  # raise it when a bundle's contents change meaning; load_bundle refuses others
IMAGE_HANDLING = ("8-bit RGB: grayscale replicated to 3 equal channels, 16-bit scaled to 8 bit (read_image); "
                  "resized bilinearly to image_size x image_size")
MASK_COLOUR = "lime"  # the predicted mask's outline on an overlay (cyan is the ground truth's)


def save_bundle(path: str | os.PathLike, model: CPCAD, scoring: dict, threshold: dict, pixel_threshold: dict,
                data: dict | None = None, precision: str = "fp32") -> Path:
    """Write a self-contained model bundle, all `load_bundle` needs to score new images.

    It holds the weights, the CPCADConfig, ScoringConfig and PatchGrid (as dicts), the negative bank, the kNN
    references the configured detector reads (only those), the score calibration, the image
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
    """
    check_param("precision", precision, "str", choices=PRECISIONS[1:])  # resolved: what the run computed in
    config: ScoringConfig = scoring["config"]
    kind = config.references
    calibration = scoring["calibration"]
    bundle = {
        "format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "code_version": code_version(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "config": dataclasses.asdict(model.cfg), "scoring": dataclasses.asdict(config),
        "grid": dataclasses.asdict(model.grid),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "bank": scoring["bank"].detach().cpu(),
        "references": {kind: scoring["references"][kind].detach().cpu()} if kind else {},
        "calibration": calibration.to_dict() if calibration is not None else None,
        "image_size": model.grid.image_size, "image_handling": IMAGE_HANDLING,
        "threshold": dict(threshold), "pixel_threshold": dict(pixel_threshold), "data": data,
        "precision": precision,
    }
    save_atomic(bundle, path)
    return Path(path)


@dataclass
class Bundle:
    """A loaded model bundle (`load_bundle`): scores new images with its scoring config's
    detector and reduce, on its score grid.

    threshold_rule / pixel_threshold_rule: `normal_threshold`'s dicts; info: format_version,
    code_version, created, data (the training data's fingerprint), image_handling, path.
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

    def score(self, images: torch.Tensor, batch_size: int = 16, progress: bool = False) -> dict[str, torch.Tensor]:
        """Score uint8 images (N, 3, S, S), S = `image_size` (as `read_image(path, S)` gives them).

        Returns {"scores": (N,) image scores, "anomalous": (N,) bool at `threshold`,
                 "pixel_maps": (N, 1, S, S), "patch_maps": (N, n_sub, G, G)}, on the CPU.
        """
        S = self.image_size
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (3, S, S):
            raise ValueError(f"the bundle scores uint8 images (N, 3, {S}, {S}), got {images.dtype} "
                             f"{tuple(images.shape)}: read them with read_image(path, {S})")
        precision = (self.info.get("precision") or "fp32") if self.device.type == "cuda" else "fp32"  # as trained
        raw = score_patches(self.model, images, self.bank, self.references or None, batch_size, self.device, progress,
                            precision, self.score_grid)
        maps = detector_maps(raw, self.calibration, self.scoring.detector)  # (N, n_sub, G, G), score grid
        scores = image_scores(maps, self.scoring.reduce)
        return {"scores": scores, "anomalous": scores > self.threshold,
                "pixel_maps": patches_to_pixels(maps, self.score_grid), "patch_maps": maps}


def load_bundle(path: str | os.PathLike, device: str | torch.device = "cpu") -> Bundle:
    """Read a bundle written by `save_bundle`, onto `device` (any device, whatever it was trained on).

    Raises FileNotFoundError for a missing file and ValueError, naming the path, for a corrupt
    or truncated file, a file that is not a bundle (a training checkpoint), a bundle of
    another format version, and one whose contents cannot score (`_check_bundle_contents`: a
    missing or non-finite threshold, an empty or non-finite bank, references, calibration or
    weights), or do not fit together (`_bundle_misfit`: a grid the bank, references or
    calibration were not made for), here rather than inside torch on the first image scored.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model bundle at {path}" + (
            " (a folder: the bundle is the model.pt that notebook 02 writes next to metrics.json)"
            if path.is_dir() else ""))
    try:
        b = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle and EOF errors for a truncated or foreign file
        raise ValueError(f"cannot read model bundle {path}: {_first_line(e)} (truncated, corrupt, or not a bundle)") from e
    if not isinstance(b, dict) or b.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{path} is not a model bundle (a training checkpoint?); notebook 02 writes the bundle "
                         "as model.pt next to metrics.json")
    if b.get("format_version") != BUNDLE_VERSION:
        raise ValueError(f"model bundle {path} has format version {b.get('format_version')} (code "
                         f"{b.get('code_version')}), this cpc_utils ({code_version()}) reads version "
                         f"{BUNDLE_VERSION}: write it again with notebook 02 and this cpc_utils")
    _check_bundle_contents(b, path)
    device = resolve_device(device)
    try:
        cfg = CPCADConfig(**{**b["config"], "directions": tuple(b["config"]["directions"])})
        model = CPCAD(cfg, PatchGrid(**b["grid"]))
        model.load_state_dict(b["state_dict"])
        scoring = ScoringConfig(**b["scoring"])
        calibration = ScoreCalibration.from_dict(b["calibration"]) if b["calibration"] is not None else None
        info = {k: b.get(k) for k in ("format_version", "code_version", "created", "data", "image_handling",
                                      "precision")}
        bundle = Bundle(model.eval().to(device), scoring, b["bank"].to(device), {k: v.to(device) for k, v in b["references"].items()},
                        calibration, b["threshold"], b["pixel_threshold"], {**info, "path": str(path)}, device)
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise ValueError(f"model bundle {path} is inconsistent: {_first_line(e)}") from e
    misfit = _bundle_misfit(bundle)
    if misfit:
        raise ValueError(f"model bundle {path} is inconsistent: {misfit}")
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
    detector = b["scoring"].get("detector")
    kind = detector_references(detector) if isinstance(detector, str) else None
    if kind and kind not in b["references"]:
        fail(f"has no {kind} references, which its detector {detector!r} reads")
    if detector not in (None, "cpcad") and b["calibration"] is None:
        fail(f"has no calibration, which its detector {detector!r} needs")
    if b["image_size"] != b["grid"].get("image_size"):
        fail(f"has image_size {b['image_size']} but a grid for {b['grid'].get('image_size')} px images")
    unknown = [k for k in b["references"] if k not in REFERENCE_KINDS]
    if unknown:
        fail(f"has references of unknown kinds {unknown}, expected some of {REFERENCE_KINDS}")
    calibration = b["calibration"] or {"mean": {}, "std": {}}
    if not isinstance(calibration.get("mean"), dict) or not isinstance(calibration.get("std"), dict):
        fail("has a calibration without 'mean' and 'std' dicts")
    tensors = {"bank": b["bank"], **{f"references[{k!r}]": v for k, v in b["references"].items()},
               **{f"calibration mean[{k!r}]": v for k, v in calibration["mean"].items()},
               **{f"weights {k!r}": v for k, v in b["state_dict"].items()}}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            fail(f"has a {type(t).__name__} as {name}, expected a tensor")
        if not name.startswith("weights") and t.numel() == 0:
            fail(f"has an empty {name} {tuple(t.shape)}, expected at least one value")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            fail(f"has non-finite values in {name}, expected finite numbers")
    for k, std in calibration["std"].items():
        if not isinstance(std, numbers.Real) or isinstance(std, bool) or not math.isfinite(std) or std <= 0:
            fail(f"has calibration std[{k!r}] {std!r}, expected a finite positive number")


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
    shape = (grid.num_subimages ** 2, grid.grid, grid.grid)  # (n_sub, G, G) of the score grid
    for k, m in (bundle.calibration.mean.items() if bundle.calibration is not None else ()):
        if tuple(m.shape) != shape:
            return (f"calibration mean[{k!r}] is {tuple(m.shape)}, expected {shape} on the score grid "
                    f"{dataclasses.asdict(grid)}")
    return None


def find_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files that `inputs` name: files, folders (searched recursively) or globs.

    In folders and glob matches, files with an image extension (IMAGE_EXTENSIONS, any case),
    without macOS metadata (._*, __MACOSX); a file named directly is taken as it is (an
    unreadable one is reported when read). Each file once, in the order named, folders sorted.
    Raises FileNotFoundError for an input that names nothing, ValueError when no image is found.
    """
    import glob

    def is_image(p: Path, base: Path) -> bool:
        return (p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                and not any(_is_macos_metadata(part) for part in p.relative_to(base).parts))

    found: list[Path] = []
    for inp in map(str, inputs):
        p = Path(inp)
        if p.is_file():
            found.append(p)
            continue
        matches = [p] if p.is_dir() else [Path(m) for m in sorted(glob.glob(inp, recursive=True))]
        if not matches:
            raise FileNotFoundError(f"{inp}: no such file or folder, and no file matches it as a glob")
        for m in matches:
            found += sorted(f for f in m.rglob("*") if is_image(f, m)) if m.is_dir() else \
                [m] if is_image(m, m.parent) else []
    unique = list({str(p.resolve()): p for p in found}.values())
    if not unique:
        raise ValueError(f"no images ({' '.join(IMAGE_EXTENSIONS)}, any case) in {' '.join(map(str, inputs))}")
    return unique


def _output_names(paths: Sequence[Path]) -> list[Path]:
    """One relative .png name per image, mirroring the images' folders below their common folder.

    Names are unique, also where case is ignored (macOS, Windows): 000.jpg beside 000.png
    becomes 000_jpg.png, and a 000_jpg.png already among the images then 000_jpg_2.png.
    """
    full = [p.resolve() for p in paths]
    base = Path(os.path.commonpath([str(p.parent) for p in full]))
    names, used = [], set()
    for p in full:
        rel = p.relative_to(base)
        ext = rel.suffix.lstrip(".").lower()
        candidates = [rel.with_suffix(".png"), rel.with_name(f"{rel.stem}_{ext}.png")]
        candidates += (rel.with_name(f"{rel.stem}_{ext}_{k}.png") for k in range(2, len(full) + 3))
        name = next(c for c in candidates if c.as_posix().casefold() not in used)
        used.add(name.as_posix().casefold())
        names.append(name)
    return names


def overlay_heatmap(image: np.ndarray, pixel_map: np.ndarray, vmin: float, vmax: float,
                    mask: np.ndarray | None = None) -> np.ndarray:
    """The image (H, W, 3) uint8 with its anomaly map (H, W) blended over it at half opacity
    (HEATMAP_CMAP from vmin to vmax) and `mask` (H, W) bool outlined in MASK_COLOUR: (H, W, 3) uint8.

    Built in bands of rows through the colour map's 256-entry table, so a 6000 x 6000 photo
    needs a few tens of MB of float32 at a time, not gigabytes of float64 at full size.
    """
    import matplotlib
    half_lut = (0.5 * 255 * matplotlib.colormaps[HEATMAP_CMAP](np.arange(256))[:, :3]).astype(np.float32)  # (256, 3)
    scale = max(vmax - vmin, 1e-12)
    out = np.empty(image.shape, np.uint8)
    for r in range(0, image.shape[0], 256):
        t = np.clip((pixel_map[r:r + 256].astype(np.float32) - vmin) / scale, 0, 1)  # (rows, W)
        colour = half_lut[np.minimum((t * 256).astype(np.int32), 255)]  # matplotlib's own binning of [0, 1]
        out[r:r + 256] = np.rint(0.5 * image[r:r + 256].astype(np.float32) + colour)
    if mask is not None and mask.any():
        m = np.pad(mask, 1)
        inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]  # eroded by one pixel
        out[mask & ~inner] = np.rint(np.array(matplotlib.colors.to_rgb(MASK_COLOUR)) * 255)
    return out


def _colour_scale(pixel_rule: dict, pixel_threshold: float) -> tuple[float, float]:
    """One colour scale for every overlay: dark at the validation normals' median pixel score,
    the pixel threshold three quarters of the way up, brightest above it."""
    low = float(pixel_rule.get("median", pixel_threshold))
    span = pixel_threshold - low if pixel_threshold > low else max(abs(pixel_threshold), 1.0)
    return low, pixel_threshold + span / 3


SCORE_COLUMNS = ("path", "image_score", "verdict", "threshold", "max_pixel_x", "max_pixel_y", "max_pixel_score",
                 "width", "height", "upsampled", "heatmap", "mask", "error")
SCORE_MANIFEST = ".cpc_utils_score"  # in every score --out folder: the files score wrote there
UPSAMPLE_WARNING = 2.0  # an image enlarged more than this to image_size is flagged: detail the model never saw


def _score_out_plan(out: Path, names: Sequence[Path]) -> list[str]:
    """Check score's output folder before anything is scored; return the files it will write
    (relative). `out` must be new, empty or an earlier score output (SCORE_MANIFEST); no file
    not written by score is ever overwritten. The earlier output's files are deleted, so no
    stale heatmap or mask stays beside the new ones. Raises FileExistsError naming `out`.
    """
    planned = ["scores.csv"] + [f"{kind}/{n.as_posix()}" for n in names for kind in ("heatmaps", "masks")]
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file: expected a folder (new, empty or an earlier score output)")
    if not out.is_dir():
        return planned
    entries = sorted(e.name + ("/" if e.is_dir() else "") for e in out.iterdir())
    if entries and not (out / SCORE_MANIFEST).is_file():
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise FileExistsError(f"--out {out} is not empty and not an earlier score output (it holds {shown}); "
                              "score writes only into a new or empty folder or one it wrote before")
    try:
        previous = set(json.loads((out / SCORE_MANIFEST).read_text())["files"]) if entries else set()
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--out {out}: cannot read {SCORE_MANIFEST}, the list of what score wrote there ({e}); "
                         "choose a new or empty folder") from e
    previous = {f for f in previous if not Path(f).is_absolute() and ".." not in Path(f).parts}
    foreign = [f for f in planned if (out / f).exists() and f not in previous]
    if foreign:
        raise FileExistsError(f"--out {out}: {out / foreign[0]} was not written by score and would be overwritten; "
                              "choose a new or empty folder")
    for f in sorted(previous, reverse=True):
        if (out / f).is_file() and not (out / f).is_symlink():
            (out / f).unlink()
            for parent in (out / f).parents:  # the folders it leaves empty, up to `out`
                if parent == out or any(parent.iterdir()):
                    break
                parent.rmdir()
    return planned


def score_files(bundle_path: str | os.PathLike, inputs: Sequence[str | os.PathLike], out: str | os.PathLike,
                threshold: float | None = None, pixel_threshold: float | None = None,
                device: str | torch.device = "auto", batch_size: int = 16, progress: bool = True) -> dict:
    """Score image files with a bundle: `python -m cpc_utils score`.

    Writes `out`/scores.csv (SCORE_COLUMNS, one row per image, in `find_images` order),
    `out`/heatmaps/<name>.png (the map over the image, one colour scale for all, the mask
    outlined) and `out`/masks/<name>.png (0 / 255, pixels above the pixel threshold), both
    at each image's own size, <name> mirroring the input folders (unique, `_output_names`).
    `out` must be new, empty or an earlier score output, whose files are replaced
    (`_score_out_plan`); images inside `out` are never read as inputs (said, not silent).
    Images are read upright (EXIF orientation) and resized as in training (`read_image`); one
    enlarged more than UPSAMPLE_WARNING times is scored with a warning and its factor in the
    "upsampled" column. An unreadable image, or one whose score is not finite (verdict
    "error"), gets a row with its error and the others are still scored. Max-pixel x, y are
    column and row in the image's own pixels.

    Returns {"images", "scored", "failed" (unreadable), "nonfinite", "anomalous", "resized",
             "upsampled", "skipped" (images inside `out`), "csv", "seconds", ...}.
    """
    from PIL import Image
    t0 = time.perf_counter()
    bundle = load_bundle(bundle_path, device)
    check_param("batch_size", batch_size, "int", low=1)
    S, out = bundle.image_size, Path(out)
    thr = bundle.threshold if threshold is None else float(threshold)
    pthr = bundle.pixel_threshold if pixel_threshold is None else float(pixel_threshold)
    for name, value in (("threshold", thr), ("pixel threshold", pthr)):
        if not math.isfinite(value):
            raise ValueError(f"the {name} is {value}: expected a finite number")
    found = find_images(inputs)
    paths = [p for p in found if out.resolve() not in p.resolve().parents]  # never score's own outputs
    if len(paths) < len(found):
        tqdm.write(f"{len(found) - len(paths)} images inside --out {out} are not read as inputs")
        if not paths:
            raise ValueError(f"no images to score: every image found in {' '.join(map(str, inputs))} is inside "
                             f"--out {out}, which is never read as input")
    earlier = [p for p in paths if _in_score_output(p)]  # another --out's heatmaps and masks are not photos
    if earlier:
        paths = [p for p in paths if p not in earlier]
        tqdm.write(f"{len(earlier)} images inside earlier score outputs (folders holding {SCORE_MANIFEST}; first: "
                   f"{earlier[0]}) are not read as inputs")
        if not paths:
            raise ValueError(f"no images to score: every image found in {' '.join(map(str, inputs))} is inside an "
                             f"earlier score output (first: {earlier[0]})")
    names = _output_names(paths)
    planned = _score_out_plan(out, names)
    save_json({"written_by": "cpc_utils score", "files": planned}, out / SCORE_MANIFEST)  # before any output
    vmin, vmax = _colour_scale(bundle.pixel_threshold_rule, pthr)
    png = lambda a, f: Image.fromarray(a).save(f, format="PNG")  # noqa: E731
    rows: list[dict] = []
    resized = 0
    with tqdm(total=len(paths), desc="score", unit="image", disable=not progress) as bar:
        for lo in range(0, len(paths), batch_size):
            originals, xs, index = [], [], []
            for i in range(lo, min(lo + batch_size, len(paths))):
                try:
                    im = _open_rgb(paths[i])
                except Exception as e:  # PIL raises many types: record it and go on
                    rows.append({"path": str(paths[i]), "error": f"cannot read image: {e}"})
                    continue
                if im.size != (S, S) and not resized:
                    tqdm.write(f"images that are not {S}x{S} px are resized to {S}x{S} as in training "
                               f"(first: {paths[i]}, {im.size[0]}x{im.size[1]}); heatmaps and masks are "
                               "written at each image's own size")
                resized += im.size != (S, S)
                originals.append(im)
                xs.append(_resized_tensor(im, S))  # as read_image does
                index.append(i)
            if xs:
                result = bundle.score(torch.stack(xs), batch_size)
                for j, i in enumerate(index):
                    rows.append(_score_row(paths[i], names[i], np.asarray(originals[j]), result, j, thr, pthr,
                                           vmin, vmax, S, out, png))
                    originals[j] = None  # a large photo is held once, not for the whole batch
            bar.update(min(lo + batch_size, len(paths)) - lo)
    order = {str(p): k for k, p in enumerate(paths)}
    rows.sort(key=lambda r: order[r["path"]])
    _write_csv(rows, out / "scores.csv")
    scored = [r for r in rows if not r.get("error")]
    nonfinite = sum(r.get("verdict") == "error" for r in rows)
    return {"images": len(rows), "scored": len(scored), "failed": len(rows) - len(scored) - nonfinite,
            "nonfinite": nonfinite, "anomalous": sum(r["verdict"] == "anomalous" for r in scored),
            "resized": resized, "upsampled": sum(bool(r.get("upsampled")) for r in scored),
            "skipped": len(found) - len(paths), "threshold": thr, "pixel_threshold": pthr,
            "csv": out / "scores.csv", "seconds": time.perf_counter() - t0}


def _in_score_output(path: Path) -> bool:
    """Whether `path` lies in a folder a score run wrote (SCORE_MANIFEST in it or above it)."""
    return any((d / SCORE_MANIFEST).is_file() for d in path.resolve().parents)


def _score_row(path: Path, name: Path, original: np.ndarray, result: dict, j: int, thr: float, pthr: float,
               vmin: float, vmax: float, S: int, out: Path, png: Callable) -> dict:
    """Image j of a scored batch: its heatmap and mask written, its scores.csv row returned."""
    h, w = original.shape[:2]
    score = float(result["scores"][j])
    if not (math.isfinite(score) and torch.isfinite(result["patch_maps"][j]).all()):
        return {"path": str(path), "image_score": f"{score:.9g}", "verdict": "error", "threshold": f"{thr:.9g}",
                "width": w, "height": h, "error": f"the model's score is not finite ({score:.9g}, or its map "
                "holds NaN or inf): no verdict, heatmap or mask"}
    factor = S / min(w, h)
    if factor > UPSAMPLE_WARNING:
        warnings.warn(f"{path} is {w}x{h} px, enlarged {factor:.3g} times to the model's {S}x{S}: its patches "
                      "hold less detail than the training images' did, so its score may mean little")
    m = F.interpolate(result["pixel_maps"][j:j + 1], size=(h, w), mode="bilinear",
                      align_corners=False)[0, 0].numpy()  # (h, w): the image's own pixels
    mask = m > pthr
    y, x = np.unravel_index(int(np.argmax(m)), m.shape)
    save_atomic(overlay_heatmap(original, m, vmin, vmax, mask), out / "heatmaps" / name, png)
    save_atomic(mask.view(np.uint8) * np.uint8(255), out / "masks" / name, png)
    return {"path": str(path), "image_score": f"{score:.9g}", "verdict": "anomalous" if score > thr else "normal",
            "threshold": f"{thr:.9g}", "max_pixel_x": int(x), "max_pixel_y": int(y),
            "max_pixel_score": f"{m[y, x]:.9g}", "width": w, "height": h,
            "upsampled": f"{factor:.3g}" if factor > UPSAMPLE_WARNING else "",
            "heatmap": str(Path("heatmaps") / name), "mask": str(Path("masks") / name), "error": ""}


def _write_csv(rows: list[dict], path: Path) -> None:
    import csv
    import io
    text = io.StringIO()
    writer = csv.DictWriter(text, SCORE_COLUMNS, restval="")
    writer.writeheader()
    writer.writerows(rows)
    save_atomic(text.getvalue(), path, lambda s, f: f.write(s.encode()))
