"""Scoring new image files with a model bundle, `python -m cpc_utils score`: finding the
images (folders and globs, each real folder once), the output folder (only what score wrote
there is ever replaced), heatmap overlays and binary masks at each image's own size, and
scores.csv with one row per image."""
from __future__ import annotations

import fnmatch
import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .files import SCORE_MANIFEST, save_atomic, save_json, written_here
from .data import IMAGE_EXTENSIONS, _is_macos_metadata, _open_rgb, _resized_tensor
from .checks import check_param
from .plots import HEATMAP_CMAP
from .bundle import _colour_note, load_bundle

MASK_COLOUR = "lime"  # the predicted mask's outline on an overlay (cyan is the ground truth's)


def find_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files that `inputs` name: files, folders (searched recursively) or globs.

    In folders and glob matches, files with an image extension (IMAGE_EXTENSIONS, any case),
    without macOS metadata (._*, __MACOSX); a file named directly is taken as it is (an
    unreadable one is reported when read). Each file once, in the order named, folders sorted.
    Folders are searched, and globs matched, following each real folder once (`_walk`,
    `_glob`): a symlinked folder is followed the first time its real folder is met, so a link
    loop (sub/up -> ..) neither hangs the search nor repeats its images under ever longer paths.
    Raises FileNotFoundError for an input that names nothing, ValueError when no image is found.
    """
    def is_image(p: Path, base: Path) -> bool:
        return (p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                and not any(_is_macos_metadata(part) for part in p.relative_to(base).parts))

    found: list[Path] = []
    for inp in map(str, inputs):
        p = Path(inp)
        if p.is_file():
            found.append(p)
            continue
        matches = [p] if p.is_dir() else _glob(inp)
        if not matches:
            raise FileNotFoundError(f"{inp}: no such file or folder, and no file matches it as a glob")
        for m in matches:
            found += sorted(f for d, names in _walk(m) for f in (d / n for n in names) if is_image(f, m)) \
                if m.is_dir() else [m] if is_image(m, m.parent) else []
    unique: dict[str, Path] = {}
    for p in found:
        unique.setdefault(str(p.resolve()), p)  # a file met again (a second name, a link) keeps its first path
    if not unique:
        raise ValueError(f"no images ({' '.join(IMAGE_EXTENSIONS)}, any case) in {' '.join(map(str, inputs))}")
    return list(unique.values())


def _walk(top: Path, hidden: bool = True) -> Iterator[tuple[Path, list[str]]]:
    """(folder, its file names) for `top` and every folder below it, top down, names sorted,
    following symlinked folders but each real folder once (os.walk(followlinks=True) alone
    loops forever on sub/up -> ..). Where two names lead to one folder, a real folder claims it
    before a link beside it. `hidden=False` leaves out folders whose names start with "." (as
    glob's `**` does)."""
    seen = {os.path.realpath(top)}
    for folder, dirs, files in os.walk(top, followlinks=True):
        keep = set()
        for d in sorted(dirs, key=lambda d: (os.path.islink(os.path.join(folder, d)), d)):  # real folders first
            real = os.path.realpath(os.path.join(folder, d))
            if real not in seen and (hidden or not d.startswith(".")):
                seen.add(real)
                keep.add(d)
        dirs[:] = sorted(keep)
        yield Path(folder), sorted(files)


def _glob(pattern: str) -> list[Path]:
    """The paths `pattern` matches, sorted, as glob.glob(recursive=True) matches them but with
    each `**` following each real folder once (`_walk`; Python 3.11's glob follows link loops
    without end): `**` is zero or more folders, other segments match names with
    fnmatch.fnmatchcase, and a name starting with "." only a segment starting with ".". A
    trailing `**` names its folder alone, which `find_images` searches whole."""
    parts = Path(pattern).parts
    fixed = next((k for k, seg in enumerate(parts) if _has_magic(seg)), len(parts))
    root = Path(*parts[:fixed])  # the leading segments without wildcards ("." when there are none)
    if fixed == len(parts):
        return [root] if os.path.lexists(root) else []
    return sorted(set(_match(root, parts[fixed:])), key=str)


def _has_magic(segment: str) -> bool:
    return any(c in segment for c in "*?[")


def _match(folder: Path, segments: Sequence[str]) -> Iterator[Path]:
    """The paths below `folder` matching the pattern `segments` (see `_glob`)."""
    head, rest = segments[0], segments[1:]
    if head == "**":
        if not rest:
            yield folder
            return
        for sub, _ in _walk(folder, hidden=False):
            yield from _match(sub, rest)
        return
    try:
        names = [head] if not _has_magic(head) else sorted(os.listdir(folder))
    except OSError:  # unreadable or not a folder: it matches nothing, as in glob
        return
    for name in names:
        path = folder / name
        if not os.path.lexists(path) or not fnmatch.fnmatchcase(name, head) or (
                name.startswith(".") and not head.startswith(".")):
            continue
        if not rest:
            yield path
        elif path.is_dir():
            yield from _match(path, rest)


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
UPSAMPLE_WARNING = 2.0  # an image enlarged more than this to image_size is flagged: detail the model never saw


def _score_out_plan(out: Path, names: Sequence[Path]) -> list[str]:
    """Check score's output folder before anything is scored; return the files it will write
    (relative). `out` must be new, empty or an earlier score output (SCORE_MANIFEST); no file
    not written by score is ever overwritten, nor stands where score needs a folder. The
    earlier output's files are deleted, so no stale heatmap or mask stays beside the new ones.
    Nothing is written or deleted through a symbolic link inside `out` (heatmaps/ linked to a
    folder of the user's, a planned file that is a link): it is refused, as the files it
    points to are not score's. `out` itself may be a link to a folder, not a broken one.
    Raises FileExistsError naming `out` and the file or link in the way.
    """
    planned = ["scores.csv"] + [f"{kind}/{n.as_posix()}" for n in names for kind in ("heatmaps", "masks")]
    if out.is_symlink() and not out.exists():  # also a link loop, which resolve() would raise on
        raise FileExistsError(f"--out {out} is a broken symbolic link (to {os.readlink(out)}): expected a folder")
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
        previous = written_here(out, SCORE_MANIFEST)
    except ValueError as e:
        raise ValueError(f"--out {out}: {e}; or choose a new or empty folder") from None
    link = next(_links_on_the_way(out, [SCORE_MANIFEST, *planned, *previous]), None)
    if link:
        raise FileExistsError(f"--out {out}: {link} is a symbolic link, and score never writes or deletes through "
                              "one (what it points to is not score's); remove the link or choose a new folder")
    for f in planned:
        in_the_way = _in_the_way(out, f, previous)
        if in_the_way:
            raise FileExistsError(f"--out {out}: {in_the_way}; choose a new or empty folder")
    for f in sorted(previous, reverse=True):
        if (out / f).is_file():  # no link on the way: checked above
            (out / f).unlink()
            for parent in (out / f).parents:  # the folders it leaves empty, up to `out`
                if parent == out or any(parent.iterdir()):
                    break
                parent.rmdir()
    return planned


def _links_on_the_way(out: Path, files: Iterable[str]) -> Iterator[Path]:
    """The symbolic links among the files inside `out` and the folders leading to them."""
    checked: set[Path] = set()
    for f in files:
        parts = Path(f).parts
        for k in range(1, len(parts) + 1):
            path = out.joinpath(*parts[:k])
            if path not in checked:
                checked.add(path)
                if path.is_symlink():
                    yield path


def _in_the_way(out: Path, f: str, previous: set[str]) -> str | None:
    """Why the planned file `f` cannot be written without touching a file score did not
    write (not in `previous`): that file is at `f`, or where a folder leading to `f` must be."""
    parts = Path(f).parts
    for k in range(1, len(parts)):
        folder = out.joinpath(*parts[:k])
        if folder.exists() and not folder.is_dir() and "/".join(parts[:k]) not in previous:
            return f"{folder} was not written by score and stands where score needs a folder for {f}"
    if (out / f).exists() and f not in previous:
        return f"{out / f} was not written by score and would be overwritten"
    return None


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
    column and row in the image's own pixels. Images of the other colour mode than the
    training images' are scored and said in one line (their count in "other_colour"); a
    bundle with a degenerate calibration warns at load and says so in "calibration_note".

    Returns {"images", "scored", "failed" (unreadable), "nonfinite", "anomalous", "resized",
             "upsampled", "skipped" (images inside `out`), "other_colour", "colour" (the
             training images' mode or None), "calibration_note" (None when sound), "csv",
             "seconds", ...}.
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
    out_real = Path(os.path.realpath(out))  # not out.resolve(), which raises on a link loop
    paths = [p for p in found if out_real not in p.resolve().parents]  # never score's own outputs
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
    resized, other_colour = 0, []
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
                result = bundle.score(torch.stack(xs), batch_size, colour_warning=False)  # said once, below
                other_colour += [paths[i] for j, i in enumerate(index) if result["other_colour"][j]]
                for j, i in enumerate(index):
                    rows.append(_score_row(paths[i], names[i], np.asarray(originals[j]), result, j, thr, pthr,
                                           vmin, vmax, S, out, png))
                    originals[j] = None  # a large photo is held once, not for the whole batch
            bar.update(min(lo + batch_size, len(paths)) - lo)
    if other_colour:
        tqdm.write(_colour_note(bundle.info["colour"], len(other_colour), len(paths), bundle.info["path"])
                   + f" (first: {other_colour[0]})")
    order = {str(p): k for k, p in enumerate(paths)}
    rows.sort(key=lambda r: order[r["path"]])
    _write_csv(rows, out / "scores.csv")
    scored = [r for r in rows if not r.get("error")]
    nonfinite = sum(r.get("verdict") == "error" for r in rows)
    return {"images": len(rows), "scored": len(scored), "failed": len(rows) - len(scored) - nonfinite,
            "nonfinite": nonfinite, "anomalous": sum(r["verdict"] == "anomalous" for r in scored),
            "resized": resized, "upsampled": sum(bool(r.get("upsampled")) for r in scored),
            "skipped": len(found) - len(paths), "other_colour": len(other_colour), "colour": bundle.info["colour"],
            "calibration_note": bundle.calibration_note, "threshold": thr, "pixel_threshold": pthr,
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
