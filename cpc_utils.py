"""Contrastive Predictive Coding for image anomaly detection, in one file.

Everything the notebooks share, read top to bottom in the order the data flows:
data (MVTec AD layout, the train / calibration / validation split, synthetic validation
anomalies) -> demo data (8 categories in the MVTec AD layout) -> parameter checks
(`check_param`, run by every config) and patch grids -> encoders (pre-activation ResNet v2,
DenseNet) -> CPC and CPC-AD heads and the InfoNCE loss -> one resumable training loop, with
run fingerprints, staged run folders and locks, so no run loses or misreports another's
results -> scoring (CPC-AD loss, kNN typicality, calibration, named detectors), metrics, decision
thresholds from normal data and the pixel baseline -> plots and results files -> the model
bundle (one file with all scoring needs) and scoring new images with it.

Model selection never looks at test/: every choice is made on held-out train/good images
with synthetic anomalies pasted in (`make_validation_set`); see scripts/study.py.

Papers:
  * CPC:    van den Oord, Li, Vinyals 2018, "Representation Learning with Contrastive
            Predictive Coding", arXiv:1807.03748 (and CPC v2, Henaff et al. 2019,
            arXiv:1905.09272, for the patch grid, LayerNorm and ResNet-v2 encoders).
  * CPC-AD: de Haan, Loewe 2021, "Contrastive Predictive Coding for Anomaly Detection",
            arXiv:2107.07820.

Use it as `import cpc_utils as cu` after `pip install -e .`, or upload this file as a
Kaggle utility script. `python -m cpc_utils demo-data OUT` writes the demo dataset;
`python -m cpc_utils score MODEL.pt IMAGES --out DIR` scores new images with a trained model.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import json
import math
import numbers
import os
import random
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence


def cli_parser() -> argparse.ArgumentParser:
    """The command line (`main` at the bottom runs it). Built before the heavy imports below,
    so that `python -m cpc_utils --help` answers at once."""
    parser = argparse.ArgumentParser(prog="python -m cpc_utils", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo-data", help="write the demo dataset in the MVTec AD layout (about 16 s)",
                          description="Write the embedded demo dataset (8 categories, MVTec AD layout).")
    demo.add_argument("out", help="output folder, e.g. data/demo")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--categories", nargs="*", default=None, metavar="CATEGORY",
                      help="default: all eight (brick gravel grass tissue bottle screw capsule nut)")
    summary = sub.add_parser("summary", help="summarise a results folder: summary.md, .csv, comparison.png",
                             description="Summarise every metrics.json under a results folder (e.g. results/demo).")
    summary.add_argument("run_dir", help="a results folder, e.g. results/demo")
    score = sub.add_parser("score", help="score new images with a trained model bundle: verdicts, heatmaps, masks",
                           description="Score images with a model bundle (model.pt, written by notebook 02): "
                                       "writes OUT/scores.csv, OUT/heatmaps/*.png and OUT/masks/*.png. Exit "
                                       "status 1 when an image could not be read or got a non-finite score "
                                       "(listed in the CSV).")
    score.add_argument("bundle", help="a model bundle, e.g. results/notebook02/brick/resnet18v2/model.pt")
    score.add_argument("inputs", nargs="+", metavar="INPUT",
                       help="an image file, a folder (searched recursively) or a glob (quote it)")
    score.add_argument("--out", required=True, help="output folder: new, empty, or an earlier score output "
                       "(whose files are replaced); never read as input")
    score.add_argument("--threshold", type=_finite_float, default=None,
                       help="image threshold (default: the bundle's, chosen on validation normals)")
    score.add_argument("--pixel-threshold", type=_finite_float, default=None, help="pixel threshold for the masks "
                       "(default: the bundle's)")
    score.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, ... (default auto)")
    score.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    return parser


def _finite_float(text: str) -> float:
    """A threshold from the command line: a NaN one would call every image normal (NaN > t is False)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


_CLI_ARGS = cli_parser().parse_args() if __name__ == "__main__" else None  # --help exits here, before torch

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

# ---- data ----------------------------------------------------------------------------
# MVTec AD layout: <root>/<category>/{train/good, test/<defect>, ground_truth/<defect>}.
# Images are decoded and resized once into uint8 tensors; every epoch reads those tensors.

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
KAGGLE_ROOTS = ("/kaggle/input/mvtec-ad", "/kaggle/input/mvtec-anomaly-detection")
NESTED_DIR = "mvtec_anomaly_detection"
LOCAL_ROOT = "data/mvtec_ad"
EXPECTED_LAYOUT = """expected layout:
  <root>/<category>/train/good/*.png
  <root>/<category>/test/<defect>/*.png         (test/good/ holds normal test images)
  <root>/<category>/ground_truth/<defect>/<stem>_mask.png  (non-zero = defect, e.g. 0/255 or 0/1)"""


def _configured_root(data_root: str | os.PathLike | None) -> tuple[Path, str] | None:
    """The root the user named, the argument else $MVTEC_ROOT, and how it was named (for
    error messages); None when neither is set. A leading ~ is the home folder, as in a shell
    (a notebook's data_root = "~/mvtec_ad" gets no shell to expand it)."""
    if data_root:
        return Path(data_root).expanduser(), f"data_root={str(data_root)!r}"
    if os.environ.get("MVTEC_ROOT"):
        return Path(os.environ["MVTEC_ROOT"]).expanduser(), f"$MVTEC_ROOT={os.environ['MVTEC_ROOT']}"
    return None


def candidate_roots(data_root: str | os.PathLike | None = None) -> list[Path]:
    """Where MVTec AD is looked for, each base also with its nested `mvtec_anomaly_detection/`.

    A configured root (the argument, else $MVTEC_ROOT) is the only base, so a typo fails
    instead of falling through to other data; with none, the Kaggle inputs, then ./data/mvtec_ad.
    """
    configured = _configured_root(data_root)
    bases = [configured[0]] if configured else [Path(b) for b in (*KAGGLE_ROOTS, LOCAL_ROOT)]
    return [root for base in bases for root in (base, base / NESTED_DIR)]


def _is_category_dir(path: Path) -> bool:
    return (path / "train" / "good").is_dir()


def list_categories(root: str | os.PathLike) -> list[str]:
    """Categories under `root`: the folders that hold train/good."""
    root = Path(root)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _is_category_dir(p)) if root.is_dir() else []


def find_mvtec_root(data_root: str | os.PathLike | None = None) -> Path:
    """Return the first of `candidate_roots(data_root)` that holds at least one category.

    Raises FileNotFoundError with the expected layout, naming the configured root and where
    it came from (data_root or $MVTEC_ROOT), or, with nothing configured, every path tried.
    """
    tried = candidate_roots(data_root)
    for root in tried:
        if list_categories(root):
            return root
    configured = _configured_root(data_root)
    if configured:
        path, source = configured
        raise FileNotFoundError(
            f"no MVTec AD category under {path} ({source}"
            f"{'' if path.exists() else ', which does not exist'}) nor under {path / NESTED_DIR}\n"
            f"{EXPECTED_LAYOUT}")
    listing = "\n".join(f"  {p}" + ("" if p.exists() else "  (does not exist)") for p in tried)
    raise FileNotFoundError(
        f"no MVTec AD dataset found; tried:\n{listing}\n{EXPECTED_LAYOUT}\n"
        "Pass data_root, set MVTEC_ROOT, or write the demo data with "
        "`python -m cpc_utils demo-data data/demo`."
    )


@dataclass
class ImageSet:
    """Decoded images of one split, ready for training or scoring.

    images: (N, 3, H, W) uint8; masks: (N, 1, H, W) bool; labels: (N,) long, 1 = anomalous.
    substituted: synthetic anomalies drawn as another kind than their slot's, because theirs
    could not be made visible on that image (`synthetic_anomalies`): path -> the slot's kind
    (their defect_types entry is the kind drawn); empty for images read from disk.
    """
    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    defect_types: list[str]
    paths: list[str]
    substituted: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: Sequence[int] | torch.Tensor) -> "ImageSet":
        index = torch.as_tensor(index, dtype=torch.long)
        paths = [self.paths[i] for i in index.tolist()]
        kept = set(paths)
        return ImageSet(self.images[index], self.masks[index], self.labels[index],
                        [self.defect_types[i] for i in index.tolist()], paths,
                        {p: k for p, k in self.substituted.items() if p in kept})


def read_image(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """Decode one image to (3, S, S) uint8, resized bilinearly.

    Channels: every image becomes RGB. The grayscale categories (grid, screw, zipper) are
    replicated to three equal channels, so one encoder shape serves all 15 categories and a
    grayscale category costs nothing extra to learn (the three channels stay identical).
    Depth: 16-bit grayscale (PIL mode "I;16", or "I" in some Pillow versions) is scaled to
    8 bit as value / 257 (65535 -> 255), a 32-bit integer image by the range its values show,
    and float ("F") as value * 255 when it lies in [0, 1], as it is in [0, 255], other ranges
    being a ValueError (`_to_8bit`); PIL's own `.convert("RGB")` would clip 16-bit data to white.
    """
    return _read_image_sized(path, image_size)[0]


def _read_image_sized(path: str | os.PathLike, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """`read_image` and the image's own (width, height), from one decode."""
    try:
        im = _open_rgb(path)
        return _resized_tensor(im, image_size), im.size
    except Exception as e:  # PIL raises many types; the user needs the file name
        raise ValueError(f"cannot read image {path}: {e}") from e


def _resized_tensor(im: "PIL.Image.Image", image_size: int) -> torch.Tensor:
    """An RGB PIL image resized bilinearly to (3, S, S) uint8."""
    from PIL import Image
    return torch.from_numpy(np.asarray(im.resize((image_size, image_size), Image.BILINEAR)).copy()).permute(2, 0, 1)


def _open_rgb(path: str | os.PathLike) -> "PIL.Image.Image":
    """Decode an image at its own size as 8-bit RGB (see `read_image` for channels and depth),
    upright (`_upright`)."""
    from PIL import Image
    with Image.open(path) as im:
        return _to_8bit(_upright(im)).convert("RGB")  # convert() loads the pixels: the file can close


def _upright(im: "PIL.Image.Image") -> "PIL.Image.Image":
    """The image turned as its EXIF orientation tag says: cameras store a portrait photo
    sideways with a tag, and every viewer shows it upright, so the model must see it so too."""
    from PIL import ImageOps
    return ImageOps.exif_transpose(im) if im.getexif().get(0x0112, 1) != 1 else im  # 0x0112: Orientation


def _to_8bit(im):
    """A 16-bit ("I;16*"), 32-bit integer ("I") or float ("F") grayscale PIL image as mode "L";
    others as they are.

    "I;16*" and a 16-bit file read as "I" (PNG, a TIFF saying 16 bits per sample) are value / 257.
    A 32-bit integer file declares no white level: its values are read as 8 bit when they all
    lie in 0..255 (an 8-bit image stored wide), as 16 bit in 0..65535, else ValueError; dividing
    an 8-bit image by 257 would silently turn it black. Float is * 255 in [0, 1], as it is in
    [0, 255], else ValueError (e.g. [-1, 1] or 16-bit values as float: no scale is safe to guess).
    """
    from PIL import Image
    if not (im.mode == "F" or im.mode.startswith("I")):
        return im
    a = np.asarray(im, dtype=np.float64)  # (H, W)
    if not np.isfinite(a).all():
        raise ValueError(f"{(~np.isfinite(a)).sum()} pixels are NaN or infinite")
    low, high = (a.min(), a.max()) if a.size else (0.0, 0.0)
    sixteen = im.mode != "I" or im.format == "PNG" or getattr(im, "tag_v2", {}).get(258) == (16,)
    if im.mode == "F":
        if not -0.5 <= low <= high < 255.5:  # what rounds into 0..255
            raise ValueError(f"float pixel values span {low:.6g}..{high:.6g}: expected 0..1 or 0..255")
        a = a * 255 if high <= 1 else a   # float in [0, 1], else already 0..255
    elif sixteen or high > 255:
        if not 0 <= low <= high <= 65535:
            raise ValueError(f"32-bit integer pixel values span {low:.0f}..{high:.0f}: expected 0..255 (8 bit) "
                             "or 0..65535 (16 bit)")
        a = a / 257                       # 16 bit: 65535 -> 255
    elif low < 0:
        raise ValueError(f"32-bit integer pixel values span {low:.0f}..{high:.0f}: expected 0..255 (8 bit) "
                         "or 0..65535 (16 bit)")
    return Image.fromarray(np.rint(np.clip(a, 0, 255)).astype(np.uint8), "L")


def read_mask(path: str | os.PathLike, image_size: int,
              image: tuple[Path, tuple[int, int]] | None = None) -> torch.Tensor:
    """Decode a ground-truth mask to (1, S, S) bool, resized with nearest neighbour.

    Every non-zero pixel is defect: MVTec AD writes 0/255, other tools 0/1, which a `> 127`
    threshold would read as empty. Grayscale of any depth is tested on its raw values, a
    colour or palette mask on every channel (a dark colour still marks a defect).
    `image` = (its image's path, (width, height)): a mask of another size is a ValueError
    naming both, since resizing both to S x S would silently misalign the defect region.
    """
    from PIL import Image
    try:
        im = Image.open(path)  # the header only, until the pixels are needed
    except Exception as e:
        raise ValueError(f"cannot read mask {path}: {e}") from e
    with im:
        im = _upright(im)  # as its image is read (`_open_rgb`)
        if image and im.size != image[1]:
            raise ValueError(f"mask {path} is {im.size[0]}x{im.size[1]} px but its image {image[0]} is "
                             f"{image[1][0]}x{image[1][1]} px (width x height); they must match")
        try:
            if not (im.mode in ("1", "L", "F") or im.mode.startswith("I")):
                im = im.convert("RGB")
            m = np.asarray(im.resize((image_size, image_size), Image.NEAREST)) > 0  # (S, S) or (S, S, 3)
            return torch.from_numpy(m.any(-1) if m.ndim == 3 else m)[None]
        except Exception as e:
            raise ValueError(f"cannot read mask {path}: {e}") from e


def _is_macos_metadata(name: str) -> bool:
    """AppleDouble files (._000.png) and __MACOSX folders: what macOS archivers add beside the
    data. They look like images or defect folders but are not."""
    return name.startswith("._") or name == "__MACOSX"


def _count_macos_metadata(cat_dir: Path) -> int:
    n = 0
    for _, dirnames, filenames in os.walk(cat_dir):
        n += sum(map(_is_macos_metadata, dirnames + filenames))
        dirnames[:] = [d for d in dirnames if d != "__MACOSX"]  # count a __MACOSX folder once
    return n


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_EXTENSIONS and not _is_macos_metadata(p.name))


def _mask_path(cat_dir: Path, defect: str, image: Path) -> Path | None:
    """ground_truth/<defect>/<stem>_mask.png, else with the image's extension; the extension's
    case is ignored as it is for images (000.JPG finds 000_mask.png, 000.png finds 000_mask.PNG).
    None when there is none (load_category says which file it expected)."""
    folder = cat_dir / "ground_truth" / defect
    files = sorted(folder.iterdir()) if folder.is_dir() else []
    masks = {p.suffix.lower(): p for p in files if p.stem == f"{image.stem}_mask"}
    return next((masks[ext] for ext in (".png", image.suffix.lower()) if ext in masks), None)


def _category_files(cat_dir: Path) -> tuple[list[Path], list[tuple[Path, str, Path | None]]]:
    """The files a category's run reads: the train/good images, and (image, defect, mask) for
    each test image (mask None for test/good, and for a defect image that has none).

    The one listing behind `load_category` and `data_fingerprint`, so the fingerprint covers
    exactly the files loaded, in symlinked folders too. A missing folder lists as empty:
    load_category says what is missing.
    """
    train_dir, test_dir = cat_dir / "train" / "good", cat_dir / "test"
    train = _image_files(train_dir) if train_dir.is_dir() else []
    defect_dirs = sorted(p for p in test_dir.iterdir()
                         if p.is_dir() and not _is_macos_metadata(p.name)) if test_dir.is_dir() else []
    test = [(f, d.name, None if d.name == "good" else _mask_path(cat_dir, d.name, f))
            for d in defect_dirs for f in _image_files(d)]
    return train, test


def load_category(data_root: str | os.PathLike | None, category: str, image_size: int = 256,
                  num_threads: int = 8) -> dict[str, ImageSet]:
    """Load train/good and the whole test split of one category.

    Returns {"train": ImageSet, "test": ImageSet}. Every file is decoded exactly once here.
    Raises FileNotFoundError / ValueError naming the root, category, image or mask at fault:
    a defect image without a mask, a mask of another size than its image, an unreadable
    file, or a test split without both normal and defect images (AUROC needs both).
    macOS metadata (._* files, __MACOSX folders) is skipped with one warning.
    """
    root = find_mvtec_root(data_root)
    cat_dir = root / category
    if not _is_category_dir(cat_dir):
        raise FileNotFoundError(f"unknown category {category!r} under {root}; available: "
                                f"{', '.join(list_categories(root))}\n{EXPECTED_LAYOUT}")
    if n := _count_macos_metadata(cat_dir):
        warnings.warn(f"ignoring {n} macOS metadata entries (._* files, __MACOSX folders) under {cat_dir}",
                      stacklevel=2)
    train_files, test_items = _category_files(cat_dir)  # test_items: (image, defect, mask or None)
    _warn_unread_files(cat_dir)
    if not train_files:
        raise FileNotFoundError(f"no images in {cat_dir / 'train' / 'good'}")
    test_dir = cat_dir / "test"
    if not test_dir.is_dir():
        raise FileNotFoundError(f"missing test folder {test_dir}\n{EXPECTED_LAYOUT}")
    for f, defect, mask in test_items:
        if defect != "good" and defect.casefold() == "good":  # else read as a defect type, or its masks missing
            raise ValueError(f"{test_dir / defect}: the normal test images' folder must be named test/good "
                             "(lower case); any other name is a defect type")
        if defect != "good" and mask is None:
            raise FileNotFoundError(f"defect image {f} has no mask: expected "
                                    f"{cat_dir / 'ground_truth' / defect / (f.stem + '_mask.png')}")
    if not test_items:
        raise FileNotFoundError(f"no images under {test_dir}\n{EXPECTED_LAYOUT}")
    n_normal = sum(defect == "good" for _, defect, _ in test_items)
    if not 0 < n_normal < len(test_items):
        raise ValueError(f"{test_dir} has {n_normal} normal (test/good) and {len(test_items) - n_normal} "
                         "defect images (test/<defect>); AUROC needs both")

    def decode(item):
        f, defect, mask = item
        x, size = _read_image_sized(f, image_size)
        if mask is None:
            return x, torch.zeros(1, image_size, image_size, dtype=torch.bool), defect, str(f)
        return x, read_mask(mask, image_size, (f, size)), defect, str(f)

    with ThreadPoolExecutor(num_threads) as pool:  # PIL releases the GIL while decoding
        train = list(pool.map(decode, [(f, "good", None) for f in train_files]))
        test = list(pool.map(decode, test_items))
    empty = [mask for (_, defect, mask), (_, m, _, _) in zip(test_items, test) if defect != "good" and not m.any()]
    if empty:
        warnings.warn(f"{len(empty)} defect images have no defect pixel at {image_size}x{image_size} px (first: "
                      f"{empty[0]}): an empty mask, or a defect too small for this size; they count as anomalous "
                      "images but add no pixel to the pixel metrics", stacklevel=2)
    return {"train": _stack(train), "test": _stack(test)}


def _warn_unread_files(cat_dir: Path) -> None:
    """Warn about images in subfolders of train/good or test/<defect>, and about files there of
    other types (.webp, .gif, ...): the layout reads only the folder's own IMAGE_EXTENSIONS files,
    so train/good/batch2/*.png or train/good/*.webp would otherwise be left out unsaid. Dotfiles,
    macOS metadata and Windows' Thumbs.db / desktop.ini are not data and are not mentioned."""
    folders = [cat_dir / "train" / "good", *((cat_dir / "test").iterdir() if (cat_dir / "test").is_dir() else ())]
    files = [(d, p) for d in folders if d.is_dir() and not _is_macos_metadata(d.name) for p in d.rglob("*")
             if p.is_file() and not any(map(_is_macos_metadata, p.relative_to(d).parts))]
    nested = sorted(p for d, p in files if p.parent != d and p.suffix.lower() in IMAGE_EXTENSIONS)
    other = sorted(p for d, p in files if p.parent == d and p.suffix.lower() not in IMAGE_EXTENSIONS
                   and not p.name.startswith(".") and p.name.lower() not in ("thumbs.db", "desktop.ini"))
    if nested:
        warnings.warn(f"ignoring {len(nested)} images in subfolders (first: {nested[0]}): only the images directly "
                      "in train/good and test/<defect> are read", stacklevel=3)
    if other:
        warnings.warn(f"ignoring {len(other)} files that are not images ({' '.join(IMAGE_EXTENSIONS)}, any case) in "
                      f"train/good and test/<defect> (first: {other[0]})", stacklevel=3)


def _stack(items: list[tuple]) -> ImageSet:
    images, masks, defects, paths = zip(*items)
    labels = torch.tensor([d != "good" for d in defects], dtype=torch.long)
    return ImageSet(torch.stack(images), torch.stack(masks), labels, list(defects), list(paths))


def split_train_val(train: ImageSet, val_fraction: float = 0.1, seed: int = 0) -> tuple[ImageSet, ImageSet | None]:
    """Hold out a seeded fraction of train/good for early stopping (never test images)."""
    n_val = int(round(len(train) * val_fraction))
    if n_val == 0:
        return train, None
    if n_val >= len(train):
        raise ValueError(f"val_fraction={val_fraction} leaves no training images out of {len(train)}")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return train.subset(perm[n_val:].sort().values), train.subset(perm[:n_val].sort().values)


def split_held_out(train: ImageSet, val_fraction: float = 0.2,
                   seed: int = 0) -> tuple[ImageSet, ImageSet, ImageSet]:
    """train/good -> (training images, calibration normals, validation normals), seeded.

    A fraction `val_fraction` of train/good is never trained on; half of it fits the score
    calibration (and the validation loss for early stopping), the other half, with synthetic
    anomalies pasted in by `make_validation_set`, is where choices are made. Raises ValueError
    when fewer than 4 images are held out (each half needs at least 2).
    """
    rest, held = split_train_val(train, val_fraction, seed)
    if held is None or len(held) < 4:
        raise ValueError(f"val_fraction={val_fraction} holds out {0 if held is None else len(held)} of "
                         f"{len(train)} train/good images; calibration and validation need at least 4")
    calibration, normals = split_train_val(held, 0.5, seed)
    return rest, calibration, normals


def concat_sets(sets: Sequence[ImageSet]) -> ImageSet:
    """One ImageSet from several, in order (e.g. the train splits of all categories, pooled)."""
    sets = list(sets)
    return ImageSet(torch.cat([s.images for s in sets]), torch.cat([s.masks for s in sets]),
                    torch.cat([s.labels for s in sets]), [d for s in sets for d in s.defect_types],
                    [p for s in sets for p in s.paths], {p: k for s in sets for p, k in s.substituted.items()})


# Synthetic anomalies: a validation set for model selection that never looks at test/.
# Each kind edits one random region of a normal image; its mask is exactly the changed pixels.

SYNTHETIC_KINDS = ("flat_fill", "smooth_blob", "thin_line", "shifted_block", "colour_shift", "foreign_patch")


def _region(shape: tuple[int, int], rng: np.random.Generator, radius: tuple[float, float],
            centre: tuple[float, float] | None = None) -> np.ndarray:
    """A random ellipse or irregular polygon (bool (H, W)); radii in px of a 256 px image."""
    from skimage.draw import ellipse, polygon
    H, W = shape
    s = H / 256
    cy, cx = centre if centre is not None else rng.uniform(0.2, 0.8, 2) * (H, W)
    mask = np.zeros(shape, bool)
    if rng.random() < 0.5:
        ry, rx = np.maximum(rng.uniform(*radius, 2) * s, 1.0)
        rr, cc = ellipse(cy, cx, ry, rx, shape=shape, rotation=rng.uniform(0, np.pi))
    else:
        angles = np.sort(rng.uniform(0, 2 * np.pi, 9))
        radii = np.maximum(rng.uniform(*radius) * rng.uniform(0.5, 1.0, 9) * s, 1.0)
        rr, cc = polygon(cy + radii * np.sin(angles), cx + radii * np.cos(angles), shape=shape)
    mask[rr, cc] = True
    return mask


def _polyline(shape: tuple[int, int], rng: np.random.Generator, width: float,
              centre: tuple[float, float] | None = None) -> np.ndarray:
    """A thin random polyline, `width` px wide (a crack or scratch), as bool (H, W)."""
    H, W = shape
    s = H / 256
    y, x = np.mgrid[:H, :W].astype(np.float32)
    pts = [np.array(centre if centre is not None else rng.uniform(0.2, 0.8, 2) * (H, W))]
    angle = rng.uniform(0, 2 * np.pi)
    for _ in range(int(rng.integers(2, 5))):
        angle += rng.uniform(-0.7, 0.7)
        pts.append(pts[-1] + rng.uniform(12, 30) * s * np.array([np.sin(angle), np.cos(angle)]))
    dist = np.full(shape, np.inf, np.float32)
    for a, b in zip(pts[:-1], pts[1:]):  # distance of every pixel to the segment a-b
        d = b - a
        t = np.clip(((y - a[0]) * d[0] + (x - a[1]) * d[1]) / max(d @ d, 1e-6), 0, 1)
        dist = np.minimum(dist, np.hypot(y - a[0] - t * d[0], x - a[1] - t * d[1]))
    return dist <= max(width, 1.0) / 2


def _bump(shape: tuple[int, int], rng: np.random.Generator, radius: tuple[float, float],
          centre: tuple[float, float] | None = None) -> np.ndarray:
    """A smooth bump (1 - r^2)^2 on a random ellipse, (H, W) float32 in [0, 1], exactly 0 outside:
    a Gaussian-like profile with compact support, so the changed pixels form one solid blob."""
    H, W = shape
    s = H / 256
    cy, cx = centre if centre is not None else rng.uniform(0.2, 0.8, 2) * (H, W)
    ry, rx = np.maximum(rng.uniform(*radius, 2) * s, 1.5)
    t = rng.uniform(0, np.pi)
    y, x = np.mgrid[:H, :W].astype(np.float32)
    y, x = y - cy, x - cx
    r2 = ((np.cos(t) * y + np.sin(t) * x) / ry) ** 2 + ((-np.sin(t) * y + np.cos(t) * x) / rx) ** 2
    return np.clip(1 - r2, 0, 1) ** 2


def _grey(img: np.ndarray) -> bool:
    """True if an (H, W, C) image has one channel or equal channels (a grayscale image)."""
    return img.shape[2] == 1 or bool((img == img[..., :1]).all())


def _colour_delta(img: np.ndarray, rng: np.random.Generator, size: float) -> np.ndarray:
    """A random intensity (grayscale) or colour (RGB) shift of length `size`, shape (C,)."""
    sign = rng.choice([-1.0, 1.0])
    if _grey(img):
        return np.full(img.shape[2], sign * size, np.float32)
    direction = rng.standard_normal(3)
    return (size * direction / np.linalg.norm(direction)).astype(np.float32)


def _source_patch(img: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The content that lands in `region` when a same-sized box from elsewhere in `img`,
    possibly flipped, is pasted over the region's bounding box, (H, W, C)."""
    H, W = region.shape
    ys, xs = np.nonzero(region)
    y0, x0, h, w = ys.min(), xs.min(), ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    sy, sx = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
    box = img[sy:sy + h, sx:sx + w]
    if rng.random() < 0.5:
        box = box[::-1]
    if rng.random() < 0.5:
        box = box[:, ::-1]
    out = img.copy()
    out[y0:y0 + h, x0:x0 + w] = box
    return out


def _edit(kind: str, img: np.ndarray, rng: np.random.Generator, subtle: bool,
          centre: tuple[float, float] | None = None, source: np.ndarray | None = None) -> np.ndarray:
    """One synthetic defect of `kind` on img (H, W, C) float32 in [0, 1]; returns the edited copy.

    Predictable kinds (flat_fill, smooth_blob, thin_line, shifted_block) are easy for a
    predictor to continue from the context; unpredictable ones (colour_shift, foreign_patch)
    are not. `subtle` draws a faint or small variant; `source` is the image a foreign patch
    comes from (default: another place in `img` itself).
    """
    shape, out = img.shape[:2], img.copy()
    s = shape[0] / 256
    u = rng.uniform
    if kind == "flat_fill":  # the region becomes (almost) the image's mean colour
        region = _region(shape, rng, (6, 14) if subtle else (10, 22), centre)
        a = u(0.5, 0.75) if subtle else 1.0
        out[region] = (1 - a) * img[region] + a * img.reshape(-1, img.shape[2]).mean(0)
    elif kind == "smooth_blob":  # a brighter or darker smooth blob
        bump = _bump(shape, rng, (8, 16) if subtle else (12, 26), centre)
        amp = u(0.08, 0.15) if subtle else u(0.25, 0.45)
        out = img + rng.choice([-1.0, 1.0]) * amp * bump[..., None]
    elif kind == "thin_line":  # a dark or bright crack, 1-3 px wide
        line = _polyline(shape, rng, u(1, 3) * max(s, 0.5), centre)
        a = u(0.3, 0.5) if subtle else u(0.8, 1.0)
        out[line] = (1 - a) * img[line] + a * (0.05 if rng.random() < 0.5 else 0.95)
    elif kind == "shifted_block":  # the region shows the image shifted by 8-24 px
        region = _region(shape, rng, (6, 14) if subtle else (10, 22), centre)
        step, angle = (u(8, 14) if subtle else u(14, 24)) * max(s, 0.5), rng.uniform(0, 2 * np.pi)
        dy, dx = int(round(step * np.sin(angle))), int(round(step * np.cos(angle)))
        out[region] = np.roll(img, (dy, dx), axis=(0, 1))[region]
    elif kind == "colour_shift":  # a stain: intensity or colour offset of a blotchy region
        region = _region(shape, rng, (6, 16) if subtle else (10, 24), centre)
        out[region] = img[region] + _colour_delta(img, rng, u(0.05, 0.1) if subtle else u(0.15, 0.3))
    elif kind == "foreign_patch":  # texture from elsewhere (or from another photograph)
        region = _region(shape, rng, (6, 14) if subtle else (10, 22), centre)
        src = _source_patch(img, region, rng) if source is None else source
        a = u(0.4, 0.6) if subtle else u(0.9, 1.0)
        out[region] = (1 - a) * img[region] + a * src[region]
    else:
        raise ValueError(f"unknown synthetic anomaly kind {kind!r}; known: {SYNTHETIC_KINDS}")
    return np.clip(out, 0, 1).astype(np.float32)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    # float32 first: an unchanged pixel that went through float64 must round the same way
    return (np.clip(np.asarray(img, np.float32), 0, 1) * 255).round().astype(np.uint8)


def _changed(draw: Callable[[], np.ndarray], clean: np.ndarray, what: str,
             tries: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """`_visible`'s (uint8 image, mask), or ValueError naming `what` when no draw shows."""
    found = _visible(draw, clean, tries)
    if found is None:
        raise ValueError(f"{what}: {tries} random draws changed no pixel visibly (is the image uniform?)")
    return found


def _visible(draw: Callable[[], np.ndarray], clean: np.ndarray,
             tries: int = 50) -> tuple[np.ndarray, np.ndarray] | None:
    """Call `draw()` (a float image) until, as uint8, it visibly differs from `clean` (uint8
    (H, W, C)); return (uint8 image, mask of exactly the changed pixels (H, W) bool), or None
    after `tries` draws.

    A draw that changes (almost) nothing is redrawn: a block shifted by one period of a
    texture, a flat fill of a flat region, a patch of noisy background pasted on background.
    "Visibly": at least (H/64)^2 pixels changed, by 3 grey levels on average.
    """
    min_pixels = max(1, round((clean.shape[0] / 64) ** 2))
    for _ in range(tries):
        out = _to_uint8(draw())
        diff = np.abs(out.astype(np.int16) - clean).max(-1)  # (H, W)
        mask = diff > 0
        if mask.sum() >= min_pixels and diff[mask].mean() >= 3:
            return out, mask
    return None


def _visible_defect(kind: str, kinds: Sequence[str], clean: np.ndarray, seed: int,
                    i: int) -> tuple[str, np.ndarray, np.ndarray]:
    """A visible synthetic defect for the slot (kind, image i) of clean (H, W, C) uint8:
    (the kind drawn, uint8 image, changed-pixel mask (H, W)).

    Some kinds cannot show on some images: a flat fill of the mean colour on a weave so fine
    that it averages to that colour at this size. One such image must not abort a run, so the
    slot then takes the first other kind of `kinds`, in an order seeded by (seed, kind, i), that
    shows. ValueError only when none does.
    """
    img = clean.astype(np.float32) / 255
    rng = np.random.default_rng([seed, SYNTHETIC_KINDS.index(kind), i])
    found = _visible(lambda: _edit(kind, img, rng, subtle=rng.random() < 0.5), clean)
    if found is not None:
        return (kind, *found)
    rng = np.random.default_rng([seed, SYNTHETIC_KINDS.index(kind), i, 1])  # not the other slots' draws
    others = [k for k in kinds if k != kind]
    for other in [others[j] for j in rng.permutation(len(others))]:
        found = _visible(lambda: _edit(other, img, rng, subtle=rng.random() < 0.5), clean)
        if found is not None:
            return (other, *found)
    raise ValueError(f"{kind} on image {i}: 50 random draws changed no pixel visibly"
                     + (f", nor did those of {', '.join(others)}" if others else "") + " (is the image uniform?)")


def synthetic_anomalies(images: torch.Tensor, seed: int = 0, kinds: Sequence[str] = SYNTHETIC_KINDS,
                        paths: Sequence[str] | None = None) -> ImageSet:
    """One synthetic anomaly of every kind on every image, with exact masks.

    Model selection (hyperparameters, the best epoch, image aggregation, calibration) needs
    anomalies, and test/ must stay unseen until the end; these are made from held-out normal
    images instead. The kinds include *predictable* defects (flat_fill, smooth_blob,
    thin_line, shifted_block), which the context predicts well: CPC-AD's loss measures
    unpredictability, not unusualness, and a choice made on these shows where it fails.
    About half of the draws are subtle (faint or small), half obvious. A kind that cannot be
    made visible on an image (a flat fill on a fine weave) is replaced there by another kind
    of `kinds` that can (`_visible_defect`), and recorded.

    Args:
        images: (N, 3, H, W) uint8, e.g. `ImageSet.images` of the validation split; grayscale
            images (three equal channels) stay grayscale.
        seed: the draws for image i and kind k depend only on (seed, k, i) (a replacement's
            also on `kinds`).
        kinds: names from SYNTHETIC_KINDS.
        paths: names of the N source images; anomaly paths become f"{path}#{kind}"
            (default f"{kind}/{i}"), a replacement's f"{path}#{kind} drawn as {other}".
    Returns:
        ImageSet of N * len(kinds) anomalies, kind by kind: labels 1, defect_types the kind
        drawn, masks (M, 1, H, W) exactly the changed pixels (never empty), `substituted`
        the replacements (path -> the kind they replace).
    """
    unknown = [k for k in kinds if k not in SYNTHETIC_KINDS]
    if unknown:
        raise ValueError(f"unknown synthetic anomaly kinds {unknown}; known: {SYNTHETIC_KINDS}")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if paths is not None and len(paths) != len(images):
        raise ValueError(f"{len(paths)} paths for {len(images)} images")
    clean = images.permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    out, masks, drawn, names, substituted = [], [], [], [], {}
    for kind in kinds:
        for i, x in enumerate(clean):
            used, y, m = _visible_defect(kind, kinds, x, seed, i)
            name = f"{paths[i]}#{kind}" if paths is not None else f"{kind}/{i}"
            if used != kind:
                name = f"{name} drawn as {used}"
                substituted[name] = kind
            out.append(y)
            masks.append(m)
            drawn.append(used)
            names.append(name)
    M = len(out)
    return ImageSet(torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous(),  # (M, 3, H, W)
                    torch.from_numpy(np.stack(masks))[:, None],                      # (M, 1, H, W)
                    torch.ones(M, dtype=torch.long), drawn, names, substituted)


def make_validation_set(val: ImageSet, seed: int = 0, kinds: Sequence[str] = SYNTHETIC_KINDS) -> ImageSet:
    """The validation normals (label 0) followed by their synthetic anomalies (label 1).

    This is the set on which the detector's choices are made and estimated without touching
    test/: hyperparameters, the best epoch, image aggregation and the decision threshold.
    Every anomaly's path is its source image's path plus "#<kind>"; `substituted` lists the
    anomalies drawn as another kind, theirs could not be made visible on that image.
    """
    if val.labels.any():
        raise ValueError("make_validation_set expects normal images only (train/good), "
                         f"got {int(val.labels.sum())} anomalous")
    return concat_sets([val, synthetic_anomalies(val.images, seed, kinds, paths=val.paths)])


# ---- demo data -----------------------------------------------------------------------
# A small dataset in exactly the MVTec AD layout, cut from or shaded with real photographs
# that ship inside scikit-image, with synthetic defects whose masks are exact by construction.

@dataclass(frozen=True)
class DemoCategory:
    """How one demo category is made.

    kind: "texture" (random crops of `photo`, like MVTec carpet/tile) or "object" (one
    procedural `shape` centred on a plain background with a little pose jitter, like MVTec
    bottle/screw, its surface shaded with the fine detail of `photo`).
    colour: written as RGB; otherwise grayscale. tint: the object's base colour(s) (RGB in
    [0, 1]; a capsule has two halves), background: its background level.
    """
    kind: str
    photo: str
    colour: bool
    shape: str = ""
    tint: tuple[tuple[float, float, float], ...] = ()
    background: float = 0.0


DEMO_CATEGORIES: dict[str, DemoCategory] = {
    "brick": DemoCategory("texture", "brick", False),                 # periodic, like MVTec tile/grid
    "gravel": DemoCategory("texture", "gravel", False),               # stochastic, like carpet
    "grass": DemoCategory("texture", "grass", False),                 # oriented strokes, like wood
    "tissue": DemoCategory("texture", "immunohistochemistry", True),  # stained tissue, like leather
    # objects: (photo whose detail shades the surface, colour, shape, tint(s), background)
    "bottle": DemoCategory("object", "retina", True, "bottle", ((0.30, 0.42, 0.20),), 0.10),       # top view
    "capsule": DemoCategory("object", "chelsea", True, "capsule", ((0.78, 0.16, 0.12), (0.92, 0.88, 0.78)), 0.22),
    "nut": DemoCategory("object", "moon", False, "nut", ((0.62, 0.62, 0.62),), 0.12),             # like metal_nut
    "screw": DemoCategory("object", "camera", False, "screw", ((0.55, 0.55, 0.55),), 0.82),
}
# Demo defect -> the edit that makes it (see `_edit`); objects can also lose a piece or grow one.
DEMO_KIND_DEFECTS = {
    "texture": ("blob", "crack", "flat", "foreign", "shifted", "stain"),
    "object": ("blob", "crack", "extra", "foreign", "missing", "stain"),
}
# demo defect type: the synthetic kind (SYNTHETIC_KINDS) whose edit makes it; "extra" and "missing" have none
DEMO_EDITS = {"blob": "smooth_blob", "crack": "thin_line", "flat": "flat_fill", "foreign": "foreign_patch",
              "shifted": "shifted_block", "stain": "colour_shift"}
# Two halves for studies: decisions are made on the tuning half's validation data only; the
# confirmation half is evaluated once per decision and never used to choose.
DEMO_TUNING = ("brick", "gravel", "bottle", "screw")
DEMO_CONFIRMATION = ("tissue", "grass", "capsule", "nut")
DEMO_IMAGE_SIZE = 256
DEMO_FOREIGN_PHOTO = "coffee"  # the source of foreign material: a photograph of no category


def demo_defects(category: str) -> tuple[str, ...]:
    """The defect types (test/<defect> folders) of a demo category."""
    if category not in DEMO_CATEGORIES:
        raise ValueError(f"unknown demo category {category!r}; known: {', '.join(DEMO_CATEGORIES)}")
    return DEMO_KIND_DEFECTS[DEMO_CATEGORIES[category].kind]


def _demo_photo(name: str, colour: bool) -> np.ndarray:
    """A scikit-image photograph as (H, W, C) float32 in [0, 1], C = 3 if colour else 1."""
    import skimage.data
    im = getattr(skimage.data, name)().astype(np.float32) / 255.0
    im = im[..., None] if im.ndim == 2 else im[..., :3]
    if colour:
        return np.repeat(im, 3, axis=2) if im.shape[2] == 1 else im
    return im.mean(-1, keepdims=True)


def _random_crop(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    H, W = photo.shape[:2]
    crop = int(rng.integers(int(0.6 * min(H, W)), int(0.75 * min(H, W)) + 1))
    y, x = rng.integers(0, H - crop + 1), rng.integers(0, W - crop + 1)
    patch = photo[y:y + crop, x:x + crop]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    from skimage.transform import resize
    return resize(patch, (size, size, photo.shape[2]), order=1, anti_aliasing=True).astype(np.float32)


def _detail(photo: np.ndarray) -> np.ndarray:
    """The fine detail of a photograph, (H, W) float32: high-pass luminance with unit std."""
    from scipy.ndimage import gaussian_filter
    g = photo.mean(-1)
    d = g - gaussian_filter(g, 6)
    return np.clip(d / (d.std() + 1e-6), -3, 3).astype(np.float32)


def _sdf_hexagon(u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Signed distance to a regular hexagon of inradius r (flat top and bottom)."""
    kx, ky, kz = -0.866025404, 0.5, 0.577350269
    u, v = np.abs(u), np.abs(v)
    dot = np.minimum(kx * u + ky * v, 0)
    u, v = u - 2 * dot * kx, v - 2 * dot * ky
    u = u - np.clip(u, -kz * r, kz * r)
    return np.hypot(u, v - r) * np.sign(v - r)


def _object_layers(spec: DemoCategory, size: int, detail: np.ndarray, rng: np.random.Generator) -> dict:
    """Render one object with pose jitter; returns its layers, all (H, W, C) or (H, W):

    "object" (the object's surface everywhere), "background", "alpha" (coverage, soft at the
    outline), "sdf" (signed distance to the outline in px, negative inside) and "image".
    Shapes are drawn in a 256-unit frame centred on the object, so they scale with `size`.
    """
    from scipy.ndimage import map_coordinates
    k = size / 256 * rng.uniform(0.96, 1.04)                    # px per unit
    theta = np.deg2rad(rng.uniform(-4, 4))
    cy, cx = size / 2 + rng.uniform(-6, 6, 2) * size / 256
    y, x = np.mgrid[:size, :size].astype(np.float32)
    u = (np.cos(theta) * (x - cx) + np.sin(theta) * (y - cy)) / k  # (H, W) object frame
    v = (-np.sin(theta) * (x - cx) + np.cos(theta) * (y - cy)) / k
    r = np.hypot(u, v)
    tint = np.array(spec.tint[0], np.float32)
    base = np.broadcast_to(tint, (size, size, 3)).copy()
    if spec.shape == "nut":      # hexagonal nut with a bored hole and bevelled edges
        sdf = np.maximum(_sdf_hexagon(u, v, 78), 34 - r)
        shade = 0.55 + 0.45 * np.clip(-sdf / 14, 0, 1) + 0.12 * (u - v) / 110
        shade *= 1 - 0.15 * np.exp(-((r - 52) / 5) ** 2)       # a turned groove
    elif spec.shape == "bottle":  # a bottle seen from above: shoulder rings round a dark mouth
        sdf = r - 100
        shade = 0.55 + 0.3 * np.cos(2 * np.pi * r / 24) ** 2 + 0.4 * np.exp(-((r - 88) / 5) ** 2)
        shade = np.where(r < 36, 0.25 + 0.5 * np.exp(-((r - 31) / 3) ** 2), shade)
    elif spec.shape == "screw":   # head, threaded shank and a tapered tip
        half = 14 * np.clip((100 - u) / 28, 0, 1)
        shank = np.maximum(np.abs(v) - half, np.maximum(u - 100, -62 - u))
        sdf = np.minimum(shank, np.hypot(u + 84, v) - 30)
        across = np.clip(1 - (v / np.maximum(half, 1)) ** 2, 0, 1)
        thread = 0.72 + 0.28 * np.sin(2 * np.pi * (u + 0.35 * v) / 8) ** 2
        shade = np.where(u > -58, (0.55 + 0.45 * np.sqrt(across)) * thread,
                         0.6 + 0.4 * np.clip(-(np.hypot(u + 84, v) - 30) / 10, 0, 1))
        shade = np.where((np.abs(v) < 4) & (np.abs(u + 84) < 22), 0.3, shade)  # the slot
    elif spec.shape == "capsule":  # two coloured halves, shaded as a cylinder
        sdf = np.hypot(np.maximum(np.abs(u) - 72, 0), v) - 40
        base[u > 0] = spec.tint[1]
        shade = 0.6 + 0.4 * np.sqrt(np.clip(1 - (v / 40) ** 2, 0, 1)) - 0.25 * np.exp(-(u / 2) ** 2)
    else:
        raise ValueError(f"unknown demo shape {spec.shape!r}")
    H, W = detail.shape
    oy, ox = rng.uniform(0.3, 0.7) * H, rng.uniform(0.3, 0.7) * W  # a new piece of surface each time
    tex = map_coordinates(detail, [np.clip(oy + v * 0.8, 0, H - 1), np.clip(ox + u * 0.8, 0, W - 1)],
                          order=1)                                # (H, W)
    obj = base * (shade * (1 + 0.09 * tex))[..., None]
    bg = spec.background * (1 - 0.1 * ((x - size / 2) ** 2 + (y - size / 2) ** 2) / size ** 2)
    bg = np.broadcast_to(bg[..., None], (size, size, 3)).astype(np.float32)
    noise = rng.normal(0, 0.008, (size, size, 1)).astype(np.float32)  # sensor noise, on both layers
    sdf = sdf * k
    alpha = np.clip(0.5 - sdf, 0, 1)[..., None]
    obj, bg = obj + noise, bg + noise
    if not spec.colour:
        obj, bg = obj.mean(-1, keepdims=True), bg.mean(-1, keepdims=True)
    return {"object": obj, "background": bg, "alpha": alpha, "sdf": sdf,
            "image": np.clip(alpha * obj + (1 - alpha) * bg, 0, 1)}


def _pick(where: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """A random pixel (row, col) among the True ones of `where` (H, W)."""
    ys, xs = np.nonzero(where)
    i = rng.integers(len(ys))
    return float(ys[i]), float(xs[i])


def _demo_defect(defect: str, img: np.ndarray, layers: dict | None, foreign: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
    """One demo defect on img (H, W, C) float32; objects (`layers` given) are hit on the object,
    lose a piece of it ("missing") or grow material outside the outline ("extra")."""
    subtle = rng.random() < 0.5
    if layers is None:
        return _edit(DEMO_EDITS[defect], img, rng, subtle, source=foreign if defect == "foreign" else None)
    s = img.shape[0] / 256
    sdf = layers["sdf"]
    if defect == "missing":   # part of the object near its outline shows the background
        region = _region(img.shape[:2], rng, (6, 12) if subtle else (12, 24), _pick((sdf < 0) & (sdf > -10 * s), rng))
        return np.where(region[..., None], layers["background"], img)
    if defect == "extra":     # object material outside the outline
        region = _region(img.shape[:2], rng, (5, 10) if subtle else (10, 20), _pick((sdf > 2 * s) & (sdf < 8 * s), rng))
        return np.where(region[..., None], np.clip(layers["object"], 0, 1), img)
    centre = _pick(sdf < -6 * s, rng)
    out = _edit(DEMO_EDITS[defect], img, rng, subtle, centre, source=foreign if defect == "foreign" else None)
    return out if defect == "blob" else np.where(layers["alpha"] > 0.99, out, img)  # edits stay on the object


def _demo_sources(spec: DemoCategory) -> dict[str, np.ndarray | None]:
    """What a category's images are made from: its photograph, the photograph's detail (objects)
    and the photograph foreign material comes from, in the category's channels."""
    photo = _demo_photo(spec.photo, spec.colour)
    return {"photo": photo, "detail": _detail(photo) if spec.kind == "object" else None,
            "foreign": _demo_photo(DEMO_FOREIGN_PHOTO, spec.colour)}


def _demo_clean(spec: DemoCategory, size: int, sources: dict, rng: np.random.Generator) -> tuple[np.ndarray, dict | None]:
    """One normal image (H, W, C) float32, and the object's layers (None for a texture)."""
    if spec.kind == "texture":
        return _random_crop(sources["photo"], size, rng), None
    layers = _object_layers(spec, size, sources["detail"], rng)
    return layers["image"], layers


def _demo_defect_image(spec: DemoCategory, defect: str, size: int, sources: dict,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A normal image and the same image with one defect: (clean, defective) uint8 (H, W, C)
    and the mask of exactly the changed pixels, (H, W) bool, never empty."""
    img, layers = _demo_clean(spec, size, sources, rng)
    clean = _to_uint8(img)
    foreign = _random_crop(sources["foreign"], size, rng)
    bad, mask = _changed(lambda: _demo_defect(defect, img, layers, foreign, rng), clean, f"demo defect {defect}")
    return clean, bad, mask


DEMO_MANIFEST = ".cpc_utils_demo"  # in each demo category folder: the files demo-data wrote there


def _write_demo_category(out: Path, category: str, n_train: int, n_test_good: int, n_per_defect: int,
                         image_size: int, seed: int) -> None:
    import io
    from PIL import Image
    spec = DEMO_CATEGORIES[category]
    rng = np.random.default_rng([seed, list(DEMO_CATEGORIES).index(category)])
    sources = _demo_sources(spec)
    files: dict[str, bytes] = {}  # relative path -> PNG bytes: all drawn before anything is written

    def save(arr: np.ndarray, name: str) -> None:  # arr: (H, W, C) uint8 or (H, W) uint8
        buf = io.BytesIO()
        Image.fromarray(arr if arr.ndim == 2 or arr.shape[2] == 3 else arr[..., 0]).save(buf, "PNG", compress_level=1)
        files[name] = buf.getvalue()

    for split, n in (("train", n_train), ("test", n_test_good)):
        for i in range(n):
            save(_to_uint8(_demo_clean(spec, image_size, sources, rng)[0]), f"{split}/good/{i:03d}.png")
    for defect in demo_defects(category):
        for i in range(n_per_defect):
            _, bad, mask = _demo_defect_image(spec, defect, image_size, sources, rng)
            save(bad, f"test/{defect}/{i:03d}.png")
            save(mask.astype(np.uint8) * 255, f"ground_truth/{defect}/{i:03d}_mask.png")
    _write_owned(out / category, files)


def _write_owned(d: Path, files: dict[str, bytes]) -> None:
    """Write `files` (relative path -> bytes) under `d`, a demo category folder that is new or
    was written by demo-data before (DEMO_MANIFEST lists its files, which are replaced).

    No file demo-data did not write is overwritten or left among the data: a file under `d`
    that the manifest does not list is FileExistsError naming it, unless it already holds
    exactly the bytes to be written (the demo is deterministic: a folder written before the
    manifest existed is taken over). Checked before anything is written.
    """
    if d.exists() and not d.is_dir():
        raise FileExistsError(f"{d} is a file: expected a folder for the demo category")
    try:
        previous = set(json.loads((d / DEMO_MANIFEST).read_text())["files"]) if (d / DEMO_MANIFEST).is_file() else set()
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read {d / DEMO_MANIFEST}, the list of what demo-data wrote there ({e}); "
                         f"choose another folder") from e
    previous = {f for f in previous if not Path(f).is_absolute() and ".." not in Path(f).parts}
    existing = sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() or p.is_symlink()) \
        if d.is_dir() else []
    foreign = [f for f in existing if f != DEMO_MANIFEST and f not in previous
               and not (f in files and not (d / f).is_symlink() and (d / f).read_bytes() == files[f])]
    if foreign:
        raise FileExistsError(f"{d / foreign[0]} was not written by demo-data" + (f" (and {len(foreign) - 1} more "
                              "files)" if len(foreign) > 1 else "") + ": it would be overwritten or mixed into the "
                              "demo data; choose another folder, or move it away")
    save_json({"written_by": "cpc_utils demo-data", "files": sorted(previous | set(files))}, d / DEMO_MANIFEST)
    for f in sorted(previous - set(files)):  # an earlier, larger demo's files: not mixed into this one
        (d / f).unlink(missing_ok=True)
    for f, data in files.items():
        save_atomic(data, d / f, lambda b, fh: fh.write(b))
    save_json({"written_by": "cpc_utils demo-data", "files": sorted(files)}, d / DEMO_MANIFEST)


def make_demo_dataset(out: str | os.PathLike, categories: Sequence[str] | None = None,
                      n_train: int = 80, n_test_good: int = 20, n_per_defect: int = 6,
                      image_size: int = DEMO_IMAGE_SIZE, seed: int = 0, num_threads: int = 2) -> Path:
    """Write the embedded demo dataset in the MVTec AD layout and return its root.

    Categories (DEMO_CATEGORIES) are textures, random crops of one real photograph each, and
    aligned objects, one procedural shape per image shaded with a photograph's detail, with a
    few px of shift, a few degrees of rotation and a few % of scale. Each test/<defect> image
    (demo_defects(category)) carries one synthetic defect, subtle or obvious at random, whose
    mask is exactly the changed pixels. Deterministic for `seed`, and each category's files
    do not depend on which other categories are written. A category folder is written only
    when new or written by demo-data before (`_write_owned`): a user's file is never replaced.
    """
    out = Path(out)
    categories = list(categories or DEMO_CATEGORIES)
    for c in categories:
        demo_defects(c)  # an unknown category fails before anything is written
    with ThreadPoolExecutor(num_threads) as pool:  # numpy, scipy and PNG encoding release the GIL
        list(pool.map(lambda c: _write_demo_category(out, c, n_train, n_test_good, n_per_defect, image_size, seed),
                      categories))
    return out


def resolve_data_root(data_root: str | os.PathLike | None, demo_dir: str | os.PathLike = "data/demo") -> Path:
    """MVTec AD as `find_mvtec_root(data_root)` finds it; with nothing configured (no
    data_root, no $MVTEC_ROOT) and nothing found, the demo data under `demo_dir`, written on
    first use, announced in one printed line. A configured root that holds no category is
    FileNotFoundError, never the demo data. Used by notebooks with an empty data_root."""
    try:
        return find_mvtec_root(data_root)
    except FileNotFoundError:
        if _configured_root(data_root):
            raise
    demo_dir = Path(demo_dir)
    write = not all(_is_category_dir(demo_dir / c) for c in DEMO_CATEGORIES)
    print(f"no MVTec AD found: {'writing and ' if write else ''}using the demo data in {demo_dir} "
          "(pass data_root or set MVTEC_ROOT to use MVTec AD)", flush=True)
    if write:
        make_demo_dataset(demo_dir)
    return demo_dir


# ---- patches -------------------------------------------------------------------------
# An image is cut into a grid of overlapping patches (CPC v2: 64 px at stride 32 on 256 px
# gives 7x7); CPC-AD cuts larger images into overlapping 256 px sub-images first.

def check_param(name: str, value, kind: str, low: float | None = None, high: float | None = None,
                choices: Iterable | None = None, optional: bool = False, open_low: bool = False) -> None:
    """Raise ParameterError naming the parameter, its value and what is allowed.

    kind: "int", "float" (an int is fine), "bool" or "str". Every config dataclass runs its
    fields through this when built, so a bad value (`epochs="5"`, `temperature=-1`) stops a
    run before any data is loaded, in the API and the notebooks alike, instead of deep in torch.
    """
    if optional and value is None:
        return
    types = {"int": numbers.Integral, "float": numbers.Real, "bool": bool, "str": str}[kind]
    if not isinstance(value, types) or (kind in ("int", "float") and isinstance(value, bool)):
        raise ParameterError(f"{name}={value!r}: expected {'None or ' if optional else ''}{kind}, "
                             f"got {type(value).__name__}")
    if choices is not None and value not in tuple(choices):
        raise ParameterError(f"{name}={value!r}: choose one of {', '.join(map(str, choices))}")
    if low is not None and (value <= low if open_low else value < low):
        raise ParameterError(f"{name}={value!r}: must be {'>' if open_low else '>='} {low}")
    if high is not None and value > high:
        raise ParameterError(f"{name}={value!r}: must be <= {high}")


class ParameterError(ValueError):
    """A parameter with a wrong type or value (raised before anything runs)."""


@dataclass
class PatchGrid:
    """Geometry of the patch grid.

    Defaults follow the papers: 256 px images, 64 px patches, stride 32 -> a 7x7 grid.
    With `subimage_size` set (CPC-AD: 768 px images, 256 px sub-images at stride 128 ->
    5x5 sub-images x 49 patches = 1,225 patches), the grid is laid on every sub-image.
    """
    image_size: int = 256
    patch_size: int = 64
    stride: int = 32
    subimage_size: int | None = None
    subimage_stride: int | None = None

    def __post_init__(self):
        for name in ("image_size", "patch_size", "stride"):
            check_param(name, getattr(self, name), "int", low=1)
        for name in ("subimage_size", "subimage_stride"):
            check_param(name, getattr(self, name), "int", low=1, optional=True)
        sub = self.subimage_size or self.image_size
        if not (0 < self.stride <= self.patch_size and 0 < (self.subimage_stride or sub) <= sub <= self.image_size):
            raise ValueError(f"{self}: need 0 < stride <= patch_size and 0 < subimage_stride <= subimage_size "
                             "<= image_size (a larger stride leaves pixels that no patch covers)")
        if (sub - self.patch_size) % self.stride or self.patch_size > sub:
            raise ValueError(f"patch_size {self.patch_size} at stride {self.stride} does not tile {sub} px")
        if self.subimage_size and (self.image_size - self.subimage_size) % (self.subimage_stride or self.subimage_size):
            raise ValueError(f"sub-images of {self.subimage_size} px at stride {self.subimage_stride} "
                             f"do not tile {self.image_size} px")

    @property
    def grid(self) -> int:
        """Patches per side of one (sub-)image."""
        return ((self.subimage_size or self.image_size) - self.patch_size) // self.stride + 1

    @property
    def num_subimages(self) -> int:
        """Sub-images per side (1 without sub-images)."""
        if not self.subimage_size:
            return 1
        return (self.image_size - self.subimage_size) // (self.subimage_stride or self.subimage_size) + 1

    @property
    def overlap_steps(self) -> int:
        """How many neighbouring rows share pixels with a patch: ceil(P / S) - 1."""
        return math.ceil(self.patch_size / self.stride) - 1


def to_subimages(x: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """(B, C, H, W) -> (B * S * S, C, s, s) sub-images, row-major; identity without sub-images."""
    if not grid.subimage_size:
        return x
    s, st, S = grid.subimage_size, grid.subimage_stride or grid.subimage_size, grid.num_subimages
    B, C = x.shape[:2]
    u = x.unfold(2, s, st).unfold(3, s, st)                  # (B, C, S, S, s, s)
    return u.permute(0, 2, 3, 1, 4, 5).reshape(B * S * S, C, s, s)


def patch_positions(num_images: int, grid: PatchGrid, device: torch.device | str | None = None) -> torch.Tensor:
    """Where each grid patch sits in its image, as one integer key: (num_images * n_sub * G * G,) long.

    Ordered like `encode_grid`'s patches, b' * G * G + i * G + j with b' = (b, sub-image row,
    sub-image column) row-major; key = b * H * W + top * W + left of the patch's top-left pixel.
    Overlapping sub-images cut the same window up to four times (768 px, 256 px sub-images at
    stride 128): equal keys mark those bit-identical copies, which must not serve as negatives.
    """
    S, G, H = grid.num_subimages, grid.grid, grid.image_size
    sub_st = grid.subimage_stride or grid.subimage_size or 0
    sub, step = torch.arange(S, device=device), torch.arange(G, device=device)
    corner = (sub * sub_st)[:, None] + step * grid.stride                # (S, G): pixel of sub-image row, grid row
    image = torch.arange(num_images, device=device) * H * H
    key = image.view(-1, 1, 1, 1, 1) + corner.view(1, S, 1, G, 1) * H + corner.view(1, 1, S, 1, G)  # (B, S, S, G, G)
    return key.reshape(-1)


def extract_patches(x: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """(B, C, H, W) images -> (B * n_sub, G, G, C, P, P) patches (unfold, no copies in loops)."""
    x = to_subimages(x, grid)
    P, st = grid.patch_size, grid.stride
    return x.unfold(2, P, st).unfold(3, P, st).permute(0, 2, 3, 1, 4, 5)  # (B', G, G, C, P, P)


def _fold_sum(values: torch.Tensor, out_size: int, kernel: int, stride: int) -> torch.Tensor:
    """Spread each value over its kernel x kernel window and sum: (B, G, G) -> (B, 1, H, W)."""
    B, G, _ = values.shape
    cols = values.reshape(B, 1, G * G).expand(B, kernel * kernel, G * G)
    return F.fold(cols, (out_size, out_size), kernel, stride=stride)


def patches_to_pixels(values: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """Per-patch values -> per-pixel map, averaging over every patch (and sub-image) covering a pixel.

    Args:
        values: (B, n_sub, G, G) with n_sub = num_subimages ** 2 (1 without sub-images).
    Returns:
        (B, 1, H, W) float map at image resolution.
    """
    B, n_sub, G, _ = values.shape
    sub = grid.subimage_size or grid.image_size
    v = values.reshape(B * n_sub, G, G).float()
    total = _fold_sum(v, sub, grid.patch_size, grid.stride)                # (B*n_sub, 1, s, s)
    count = _fold_sum(torch.ones_like(v[:1]), sub, grid.patch_size, grid.stride)
    if grid.subimage_size:
        S, st = grid.num_subimages, grid.subimage_stride or grid.subimage_size
        total = _fold_sum_maps(total.reshape(B, S, S, sub, sub), grid.image_size, st)
        count = _fold_sum_maps(count.expand(S * S, 1, sub, sub).reshape(1, S, S, sub, sub), grid.image_size, st)
    return total / count


def _fold_sum_maps(maps: torch.Tensor, out_size: int, stride: int) -> torch.Tensor:
    """(B, S, S, s, s) sub-image maps -> (B, 1, H, W), summing where sub-images overlap."""
    B, S, _, s, _ = maps.shape
    cols = maps.permute(0, 3, 4, 1, 2).reshape(B, s * s, S * S)
    return F.fold(cols, (out_size, out_size), s, stride=stride)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [-1, 1], channels_last (the fast layout for convs)."""
    return (images.float() / 127.5 - 1.0).contiguous(memory_format=torch.channels_last)


# ---- encoders ------------------------------------------------------------------------
# Patch encoders (N, C, P, P) -> (N, D) by mean pooling: pre-activation ResNet v2 (He et al.
# 2016, arXiv:1603.05027) and DenseNet (Huang et al. 2017, arXiv:1608.06993), cut after stage 3.

class LayerNorm2d(nn.GroupNorm):
    """LayerNorm over (C, H, W) of each sample with a per-channel affine: GroupNorm(1, C).

    On CUDA the same function runs as F.layer_norm over the trailing (H, W, C) of the
    channels_last view: CUDA's group_norm copies channels_last inputs to NCHW and back,
    which cost more than the convolutions. On CPU GroupNorm's own kernel is the faster.
    """

    def __init__(self, channels: int):
        super().__init__(1, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda:
            return super().forward(x)
        C, H, W = x.shape[1:]
        y = F.layer_norm(x.permute(0, 2, 3, 1), (H, W, C), self.weight.expand(H, W, C),
                         self.bias.expand(H, W, C), self.eps)               # (N, H, W, C)
        return y.permute(0, 3, 1, 2)                                          # (N, C, H, W), channels_last


NORMS = ("layer", "group", "batch", "none")


def norm_layer(norm: str, channels: int) -> nn.Module:
    """Normalisation for the encoders.

    "layer" (the default) is LayerNorm over (C, H, W) of each patch (GroupNorm with one
    group), as in CPC v2: BatchNorm lets the patches of one batch share statistics, which
    the contrastive task can exploit to find its positive, and it makes a patch's embedding
    (hence its anomaly score) depend on what else is in the batch. LayerNorm keeps every
    patch independent, so training and scoring see the same function. "group" (32 groups),
    "batch" and "none" are there to study that choice. Measured on demo gravel (CPC-AD,
    width 16, 12 epochs): with "batch" the training loss fell to 2.30 while the validation
    loss (eval mode, running statistics) stayed at 3.48, near chance 4.16, and image AUROC
    was 0.45; with "layer", 1.86 / 1.93 and 0.75.
    """
    if norm == "layer":
        return LayerNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; choose layer, group, batch or none")


class PreActBasicBlock(nn.Module):
    """norm-ReLU-conv3x3 twice, identity shortcut (ResNet-18 v2)."""
    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int, norm: str):
        super().__init__()
        c_out = width * self.expansion
        self.norm1, self.conv1 = norm_layer(norm, c_in), nn.Conv2d(c_in, width, 3, stride, 1, bias=False)
        self.norm2, self.conv2 = norm_layer(norm, width), nn.Conv2d(width, c_out, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None

    def forward(self, x):
        h = F.relu(self.norm1(x))
        skip = self.shortcut(h) if self.shortcut is not None else x
        h = self.conv1(h)
        return skip + self.conv2(F.relu(self.norm2(h)))


class PreActBottleneck(nn.Module):
    """norm-ReLU-conv 1x1 / 3x3 / 1x1 with 4x expansion (ResNet-50 v2)."""
    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int, norm: str):
        super().__init__()
        c_out = width * self.expansion
        self.norm1, self.conv1 = norm_layer(norm, c_in), nn.Conv2d(c_in, width, 1, bias=False)
        self.norm2, self.conv2 = norm_layer(norm, width), nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.norm3, self.conv3 = norm_layer(norm, width), nn.Conv2d(width, c_out, 1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None

    def forward(self, x):
        h = F.relu(self.norm1(x))
        skip = self.shortcut(h) if self.shortcut is not None else x
        h = self.conv1(h)
        h = self.conv2(F.relu(self.norm2(h)))
        return skip + self.conv3(F.relu(self.norm3(h)))


STEMS = ("imagenet", "imagenet_norm", "small")


def make_stem(stem: str, in_channels: int, channels: int, norm: str) -> nn.Sequential:
    """The layers before the first stage, which set the size of the stage maps.

    "imagenet" (the default, as trained so far): conv7x7/2 -> maxpool3/2, no norm or ReLU
    between them; a 32 px patch gives 8x8 -> 4x4 -> 2x2 stage maps, where most 3x3 kernels
    see padding. "imagenet_norm": conv7x7/2 -> norm -> ReLU -> maxpool3/2, as in the published
    pre-activation ResNet and DenseNet-121. "small": conv3x3/1 -> norm -> ReLU -> maxpool2/2,
    a quarter of the downsampling: 16x16 -> 8x8 -> 4x4 stage maps on 32 px patches, at about
    4x the FLOPs of "imagenet" (the stages run on 4x the area; measured 3.7x to 3.9x for the
    three encoders at width 64) rather than the 16x of no downsampling at all.
    """
    if stem == "imagenet":  # layer indices stay stem.0 / stem.1: old checkpoints load
        return nn.Sequential(nn.Conv2d(in_channels, channels, 7, 2, 3, bias=False), nn.MaxPool2d(3, 2, 1))
    if stem == "imagenet_norm":
        return nn.Sequential(nn.Conv2d(in_channels, channels, 7, 2, 3, bias=False), norm_layer(norm, channels),
                             nn.ReLU(), nn.MaxPool2d(3, 2, 1))
    if stem == "small":
        return nn.Sequential(nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False), norm_layer(norm, channels),
                             nn.ReLU(), nn.MaxPool2d(2))
    raise ValueError(f"unknown stem {stem!r}; choose {', '.join(STEMS)}")


class PatchEncoder(nn.Module):
    """Stem (`make_stem`) -> stages -> final norm -> mean pool. `out_dim` = D.

    No ReLU before the pool: it would confine every z to the positive orthant, where cosine
    similarities crowd together; without it the CPC-AD loss fell about twice as fast (see the
    study in CPCADConfig).
    """

    def __init__(self, stem_channels: int, stages: nn.Sequential, out_dim: int, norm: str, in_channels: int = 3,
                 stem: str = "imagenet"):
        super().__init__()
        self.stem = make_stem(stem, in_channels, stem_channels, norm)
        self.stages = stages
        self.final_norm = norm_layer(norm, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.final_norm(self.stages(self.stem(x)))          # (N, D, P/16, P/16); P/8 with the "small" stem
        return h.mean(dim=(2, 3))                                 # (N, D)

    def multiscale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z as `forward`, and two descriptors of the patch from the same pass, for the kNN
        typicality scores:

        * "ms" (N, sum of stage channels): each stage's output mean-pooled and scaled to unit
          length, concatenated, so the fine early stages (edges, intensity) weigh as much as
          the final embedding; compared by cosine ("knn_ms").
        * "stats" (N, D_stats): the mean *and* the spatial standard deviation of every channel
          of the stem's output, of each stage's but the last, and of the final normed map (the
          std only where the map is larger than 1x1), unscaled; compared by Euclidean distance
          after standardising each dimension by the references' spread ("knn_stats"). The
          mean of a textured patch's features is close to the features of its mean colour, so
          a flat fill looks typical to "ms"; its spread, and the magnitude cosine drops, do not.
        """
        h, parts, stats = self.stem(x), [], []

        def pool(t):
            stats.append(t.float().mean(dim=(2, 3)))
            if t.shape[-1] * t.shape[-2] > 1:
                stats.append(t.float().std(dim=(2, 3), unbiased=False))

        pool(h)
        for i, stage in enumerate(self.stages):
            h = stage(h)
            if i < len(self.stages) - 1:
                parts.append(F.normalize(h.float().mean(dim=(2, 3)), dim=-1))
                pool(h)
        h = self.final_norm(h)
        pool(h)
        z = h.mean(dim=(2, 3))
        parts.append(F.normalize(z.float(), dim=-1))
        return z, torch.cat(parts, -1) / math.sqrt(len(parts)), torch.cat(stats, -1)


def resnet_v2(block: type, layers: Sequence[int], norm: str = "layer", width: int = 64,
              in_channels: int = 3, stem: str = "imagenet") -> PatchEncoder:
    """Pre-activation ResNet with three stages (widths w, 2w, 4w; strides 1, 2, 2)."""
    stages, c = [], width
    for i, n in enumerate(layers):
        w = width * 2 ** i
        blocks = []
        for j in range(n):
            blocks.append(block(c, w, 2 if (i > 0 and j == 0) else 1, norm))
            c = w * block.expansion
        stages.append(nn.Sequential(*blocks))
    return PatchEncoder(width, nn.Sequential(*stages), c, norm, in_channels, stem)


class DenseLayer(nn.Module):
    """norm-ReLU-conv1x1 (4k) -> norm-ReLU-conv3x3 (k); output concatenated to its input."""

    def __init__(self, c_in: int, growth: int, norm: str):
        super().__init__()
        self.body = nn.Sequential(norm_layer(norm, c_in), nn.ReLU(), nn.Conv2d(c_in, 4 * growth, 1, bias=False),
                                  norm_layer(norm, 4 * growth), nn.ReLU(),
                                  nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


def densenet(layers: Sequence[int] = (6, 12, 24), norm: str = "layer", width: int = 64,
             in_channels: int = 3, stem: str = "imagenet") -> PatchEncoder:
    """DenseNet-121 cut after its third dense block (growth rate width/2; transitions halve
    channels and size)."""
    stages, c, growth = [], width, width // 2
    for i, n in enumerate(layers):
        mods = []
        if i > 0:  # transition: norm-ReLU-conv1x1 halving channels, then 2x2 average pool
            mods += [norm_layer(norm, c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
            c //= 2
        for _ in range(n):
            mods.append(DenseLayer(c, growth, norm))
            c += growth
        stages.append(nn.Sequential(*mods))
    return PatchEncoder(width, nn.Sequential(*stages), c, norm, in_channels, stem)


ENCODERS: dict[str, Callable[..., PatchEncoder]] = {
    # name: builder(norm, width, in_channels, stem)    D     params (width 64, LayerNorm, "imagenet" stem)
    "resnet18v2": lambda **kw: resnet_v2(PreActBasicBlock, (2, 2, 2), **kw),   # 256    2.78 M
    "resnet50v2": lambda **kw: resnet_v2(PreActBottleneck, (3, 4, 6), **kw),   # 1024   8.54 M
    "densenet": lambda **kw: densenet((6, 12, 24), **kw),                      # 1024   4.27 M
}


def build_encoder(name: str, norm: str = "layer", width: int = 64, in_channels: int = 3,
                  stem: str = "imagenet") -> PatchEncoder:
    """Build a patch encoder from the `ENCODERS` registry; `width` scales every channel count,
    `stem` is one of `STEMS` (see `make_stem`)."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; available: {', '.join(ENCODERS)}")
    enc = ENCODERS[name](norm=norm, width=width, in_channels=in_channels, stem=stem)
    return enc.to(memory_format=torch.channels_last)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- CPC and CPC-AD ------------------------------------------------------------------
# InfoNCE the MoCo way (positive in column 0, per-row cross-entropy kept unreduced), the
# PixelCNN context network of CPC, and the context-free directional predictors of CPC-AD.

def _for_similarity(x: torch.Tensor, similarity: str) -> torch.Tensor:
    """Embeddings as the score sees them: fp32, unit length for "cosine", as they are for "dot"."""
    if similarity == "cosine":
        return F.normalize(x.float(), dim=-1)
    if similarity == "dot":
        return x.float()
    raise ValueError(f"unknown similarity {similarity!r}; choose dot or cosine")


def _randint(high: int, size: tuple[int, ...], generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    """Uniform integers in [0, high) on `device`, reproducible from the host `generator`.

    On CUDA they are drawn there by a generator seeded from `generator`: drawing about a
    million per step on the host and copying them over starved the GPU.
    """
    if device.type != "cuda":
        return torch.randint(0, high, size, generator=generator).to(device)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    return torch.randint(0, high, size, device=device, generator=torch.Generator(device).manual_seed(seed))


def info_nce(pred: torch.Tensor, positive: torch.Tensor, candidates: torch.Tensor,
             num_negatives: int | None = None, pos_index: torch.Tensor | None = None,
             generator: torch.Generator | None = None, similarity: str = "dot",
             temperature: float = 1.0, pos_key: torch.Tensor | None = None,
             cand_key: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row InfoNCE loss: -log softmax of the positive among itself and its negatives.

    Args:
        pred: (N, D) predictions W_k c_t.
        positive: (N, D) the true targets z_{t+k}.
        candidates: (M, D) embeddings the negatives are drawn from.
        num_negatives: negatives per row, sampled uniformly without the positive; None uses
            every candidate (deterministic: how CPC-AD scores against its bank).
        pos_index: (N,) index of each row's positive inside `candidates`, excluded from its
            negatives; None when the candidates cannot contain it (a bank of train patches).
        pos_key: (N,) and cand_key: (M,) integer keys (`patch_positions`): a negative with its
            row's key is a copy of the positive (overlapping sub-images) and scores -inf, so it
            neither wins nor adds to the softmax. pos_index still keeps the positive itself out
            of the draw, so without copies every row has num_negatives real negatives.
    Returns:
        loss (N,) and correct (N,) bool: the positive scored above every negative (a tie within
        float rounding, as between identical patches, is a miss).
    """
    N, M = pred.shape[0], candidates.shape[0]
    pred, positive, candidates = (_for_similarity(t, similarity) for t in (pred, positive, candidates))
    pos = (pred * positive).sum(-1, keepdim=True) / temperature                         # (N, 1)
    scores = pred @ candidates.T / temperature                                          # (N, M)
    if num_negatives is None:
        if pos_index is not None:
            scores = scores.scatter(1, pos_index[:, None], float("-inf"))
        if pos_key is not None:
            scores = scores.masked_fill(cand_key[None, :] == pos_key[:, None], float("-inf"))
        neg = scores
    else:
        n_pool = M - (pos_index is not None)
        idx = _randint(n_pool, (N, num_negatives), generator, pred.device)
        if pos_index is not None:
            idx = idx + (idx >= pos_index[:, None]).long()  # skip over the positive
        neg = scores.gather(1, idx)                                                     # (N, num_negatives)
        if pos_key is not None:
            neg = neg.masked_fill(cand_key[idx] == pos_key[:, None], float("-inf"))
    logits = torch.cat([pos, neg], dim=1)      # positive in column 0; finite, so -inf columns give no NaN
    loss = F.cross_entropy(logits, torch.zeros(N, dtype=torch.long, device=pred.device), reduction="none")
    pos = logits[:, 0]  # a hit beats every negative by more than float rounding (the two are summed differently):
    return loss, pos > logits[:, 1:].max(1).values + 1e-5 * (1 + pos.abs())  # identical patches tie, no hit


def encode_grid(encoder: nn.Module, x: torch.Tensor, grid: PatchGrid,
                multiscale: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Images (B, C, H, W) float -> patch embeddings on the grid (B * n_sub, D, G, G); with
    `multiscale`, (z, ms, stats): also both descriptors of `PatchEncoder.multiscale`
    (B * n_sub, D_ms | D_stats, G, G) from the same pass."""
    p = extract_patches(x, grid)                                  # (B', G, G, C, P, P)
    Bp, G = p.shape[:2]
    p = p.reshape(Bp * G * G, *p.shape[3:]).contiguous(memory_format=torch.channels_last)
    out = encoder.multiscale(p) if multiscale else (encoder(p),)  # (B' * G * G, D) each
    grids = tuple(t.reshape(Bp, G, G, -1).permute(0, 3, 1, 2) for t in out)  # (B', D, G, G)
    return grids if multiscale else grids[0]


# The kNN typicality scores, named after what they compare, in the order `PatchEncoder.multiscale`
# returns the descriptors: z (cosine), "ms" (cosine), "stats" (standardised Euclidean).
REFERENCE_KINDS = ("knn", "knn_ms", "knn_stats")


class CausalConv2d(nn.Conv2d):
    """Convolution whose output row i sees input rows <= i only (padding above, none below)."""

    def forward(self, x):
        kh, kw = self.kernel_size
        return super().forward(F.pad(x, (kw // 2, kw // 2, kh - 1, 0)))


class PixelCNNContext(nn.Module):
    """PixelCNN-style context network over the patch grid, top to bottom.

    Residual blocks of ReLU -> causal 2x3 conv -> ReLU -> 1x1 conv, so c[:, :, i] depends
    on z[:, :, :i + 1] only (rows of the grid at and above i), with a receptive field
    that grows by one row per block. (B, D, G, G) -> (B, hidden, G, G).
    """

    def __init__(self, dim: int, hidden: int, layers: int = 4):
        super().__init__()
        self.inp = nn.Conv2d(dim, hidden, 1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ReLU(), CausalConv2d(hidden, hidden, (2, 3)), nn.ReLU(), nn.Conv2d(hidden, hidden, 1))
            for _ in range(layers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c = self.inp(z)
        for block in self.blocks:
            c = c + block(c)
        return c


@dataclass
class CPCConfig:
    """CPC (notebook 01). Row i of the context predicts rows i + overlap + k, k = 1..pred_steps:
    rows closer than that share pixels with the context patch, which would make the task a
    copy. With 64 px patches at stride 32 the overlap is one row."""
    encoder: str = "resnet18v2"
    norm: str = "layer"
    width: int = 64
    stem: str = "imagenet"        # see make_stem: "small" keeps larger stage maps on small patches
    pred_steps: int = 3
    num_negatives: int = 16
    context_dim: int = 256
    context_layers: int = 4
    similarity: str = "dot"
    temperature: float = 1.0

    def __post_init__(self):
        _check_model_fields(self)
        for name in ("context_dim", "context_layers"):
            check_param(name, getattr(self, name), "int", low=1)
        check_param("num_negatives", self.num_negatives, "int", low=1)


def _check_model_fields(cfg) -> None:
    """The fields CPCConfig and CPCADConfig share: encoder, width, steps, score."""
    check_param("encoder", cfg.encoder, "str", choices=ENCODERS)
    check_param("norm", cfg.norm, "str", choices=NORMS)
    check_param("stem", cfg.stem, "str", choices=STEMS)
    check_param("width", cfg.width, "int", low=1)
    check_param("pred_steps", cfg.pred_steps, "int", low=1)
    check_param("similarity", cfg.similarity, "str", choices=("dot", "cosine"))
    check_param("temperature", cfg.temperature, "float", low=0, open_low=True)


class CPC(nn.Module):
    """Encoder + PixelCNN context + one linear predictor W_k per step, trained with InfoNCE."""

    def __init__(self, cfg: CPCConfig, grid: PatchGrid):
        super().__init__()
        self.cfg, self.grid = cfg, grid
        self.offset = grid.overlap_steps
        if grid.grid - self.offset - cfg.pred_steps < 1:
            raise ValueError(f"a {grid.grid}x{grid.grid} grid with {self.offset} overlapping rows "
                             f"leaves no context for pred_steps={cfg.pred_steps}")
        self.encoder = build_encoder(cfg.encoder, cfg.norm, cfg.width, stem=cfg.stem)
        D = self.encoder.out_dim
        self.context = PixelCNNContext(D, cfg.context_dim, cfg.context_layers)
        self.W = nn.ModuleList(nn.Linear(cfg.context_dim, D, bias=False) for _ in range(cfg.pred_steps))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return self.loss(x, generator)  # what DistributedDataParallel wraps: the training objective

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None,
             negatives: str = "batch") -> dict[str, torch.Tensor]:
        """InfoNCE over every (context row, step k) pair.

        negatives="batch" (training): `num_negatives` drawn from every patch of the batch, so
        most come from other images, and a model that only recognises which image a patch
        belongs to already does well. negatives="image" (evaluation): every other patch of the
        *same* image and none else, the spatial question "which of this image's patches lies
        k rows below?"; deterministic, chance log(patches per image).
        Returns loss (scalar), loss_per_step (K,) and acc_per_step (K,).
        """
        if negatives not in ("batch", "image"):
            raise ValueError(f"negatives must be 'batch' or 'image', got {negatives!r}")
        z = encode_grid(self.encoder, x, self.grid)               # (B', D, G, G), B' = B * n_sub
        c = self.context(z)                                       # (B', Dc, G, G)
        B, D, G, _ = z.shape
        candidates = z.permute(0, 2, 3, 1).reshape(B * G * G, D)  # (B'*G*G, D), index b*G*G + i*G + j
        ids = torch.arange(B * G * G, device=z.device).view(B, G, G)
        keys = patch_positions(len(x), self.grid, z.device)      # (B'*G*G,): copies of a patch share a key
        per_image = B * G * G // len(x)                           # candidates of one image (all its sub-images)
        losses, accs = [], []
        for k, W_k in enumerate(self.W, start=1):
            rows = G - self.offset - k
            pred = W_k(c[:, :, :rows].permute(0, 2, 3, 1).reshape(-1, c.shape[1]))   # (B'*rows*G, D)
            pos_index = ids[:, self.offset + k:].reshape(-1)
            if negatives == "batch":
                loss, correct = info_nce(pred, candidates[pos_index], candidates, self.cfg.num_negatives,
                                         pos_index, generator, self.cfg.similarity, self.cfg.temperature,
                                         pos_key=keys[pos_index], cand_key=keys)
            else:  # one image at a time: its predictions against its own patches only
                parts = []
                for b in range(len(x)):
                    rows_b, own = pos_index // per_image == b, slice(b * per_image, (b + 1) * per_image)
                    pos_b = pos_index[rows_b]
                    parts.append(info_nce(pred[rows_b], candidates[pos_b], candidates[own], None, pos_b - own.start,
                                          None, self.cfg.similarity, self.cfg.temperature, pos_key=keys[pos_b],
                                          cand_key=keys[own]))
                loss, correct = (torch.cat(t) for t in zip(*parts))
            losses.append(loss.mean())
            accs.append(correct.float().mean())
        per_step = torch.stack(losses)
        return {"loss": per_step.mean(), "loss_per_step": per_step.detach(), "acc_per_step": torch.stack(accs)}


DIRECTIONS = ("top_down", "bottom_up", "left_right", "right_left")


def orient(t: torch.Tensor, direction: str) -> torch.Tensor:
    """Turn a (..., G, G) grid so that `direction` becomes row i -> row i + k."""
    if direction == "top_down":
        return t
    if direction == "bottom_up":
        return t.flip(-2)
    if direction == "left_right":
        return t.transpose(-1, -2)
    if direction == "right_left":
        return t.transpose(-1, -2).flip(-2)
    raise ValueError(f"unknown direction {direction!r}; choose from {DIRECTIONS}")


def unorient(t: torch.Tensor, direction: str) -> torch.Tensor:
    """Inverse of `orient`."""
    return t.flip(-2).transpose(-1, -2) if direction == "right_left" else orient(t, direction)


@dataclass
class CPCADConfig:
    """CPC-AD (notebook 02): score(z_t, z_{t+k}) = z_{t+k}^T W_k z_t, no context network.

    Every default below was chosen by scripts/study.py on the *validation set* of the demo's
    tuning half only (held-out train/good images with synthetic anomalies pasted in; the
    confirmation half and every test split were never used to choose). Numbers are tuning-half
    validation image AUROC (with the reduction named) / pixel AUROC, mean over 4 categories x
    3 seeds, 128 px images, 40 epochs; tables in results/study/.
      * detector "knn_stats" (decision 16 in results/study/README.md): the distance of the
        patch's stage statistics (`PatchEncoder.multiscale`) of the CPC-trained encoder to
        its nearest train/good patch's, standardised per grid position. On the dense grid it
        scored 0.809 / 0.958 against 0.802 / 0.938 for the same plus CPC-AD's calibrated loss
        ("cpcad_knn_stats", the default until 2026-11-30), higher in every seed (criterion
        0.883 ± 0.015 against 0.870 ± 0.016); the same encoder untrained scores lower (the
        "untrained" setting). Pure CPC-AD stays one parameter away (detector="cpcad") and
        is always reported. Before: "cpcad_knn_stats" was chosen over CPC-AD's loss alone,
        which measures how *unpredictable* a patch is, so a flat fill or a smooth blob
        scores low: at 16 px patches, pure CPC-AD 0.72 (top10) / 0.74,
        per-position calibration 0.72 / 0.84, two-sided 0.72 / 0.81, loss + kNN of z 0.76 /
        0.89, loss + multi-scale kNN ("cpcad_knn_ms", cosine on mean-pooled stages) 0.765 /
        0.910, loss + kNN of stage statistics (mean and spread of every stage, stem included,
        standardised Euclidean) 0.792 / 0.928, higher in every seed (criterion 0.860 ± 0.010
        against 0.838 ± 0.011; on gravel 0.67 against 0.60 image AUROC). The raw-pixel
        baseline scores 0.74 / 0.90 on the same 15x15 grid (0.76 / 0.94 on the 29x29 grid of
        dense_scoring, the default's).
      * knn_bank 16384: with 16,384 train/good references instead of 4,096, loss +
        multi-scale kNN 0.765 / 0.910 (the criterion, the mean of the two, 0.838 against
        0.828). The typicality term alone scores about the same criterion as with the loss
        (multi-scale 0.838 against 0.838, stage statistics 0.863 against 0.860): the loss is
        kept because this is CPC-AD, and its share is reported as pure CPC-AD beside.
      * dense_scoring: the maps are scored on a grid of half the training stride (29x29
        instead of 15x15 at 16 px patches on 128 px images), the kNN references sampled from
        that grid too; the loss is computed on the training grid, whose patches are every
        other one of the dense grid's, and interpolated onto it. 0.802 / 0.938 against
        0.792 / 0.928 (criterion 0.870 ± 0.013 against 0.860 ± 0.010, higher in every seed;
        gravel 0.70 against 0.67 image AUROC), at about 3 times the scoring time on the CPU
        (23 -> 8 images/s at the demo grid; training is unchanged). Averaging each distance
        with the mirror image's as well scored 0.881 against 0.873 offline, at twice that
        cost again and assuming that mirrored normals look normal (a screw thread does not):
        not adopted.
      * reduce "top10" (mean of the highest 10% of patch scores): 0.76 against 0.73 for the
        mean (the paper's) and 0.73 for the max (loss + kNN, 4,096 references).
      * pred_steps 1, target_offset 0: the k = 1 target shares half its pixels with the
        context. Targets that share none (target_offset 1) did worse: 0.72 / 0.80 against
        0.73 / 0.84 (loss + kNN, top10, 32 px patches), and on gravel the validation loss
        ended at or above chance (4.20-4.63 vs 4.16) in all three seeds.
      * similarity "cosine" at temperature 0.1, lr 2e-4: from the first study (chosen on test
        data of an older demo, kept in results/study/legacy_*), not re-chosen here; raw dot
        products collapsed there. The "paper" preset (`cpcad_config`) is the dot-product run.
      * stem "imagenet": the published norm + ReLU after the 7x7 conv did not help (0.729 /
        0.835 against 0.734 / 0.844, loss + kNN, top10, 32 px patches), nor did the "small"
        stem at 16 px patches (0.794 / 0.893 against 0.788 / 0.912, one seed, twice the time).
      * encoder "resnet18v2": under the chosen setting DenseNet scored the criterion 0.841 ±
        0.003 and ResNet-50 v2 0.817 ± 0.005 against 0.838 ± 0.011, at 2.5 and 3 times the
        training cost per patch.
      * negatives "batch": training with every other patch of the target's own image as the
        negatives ("image", the hard ones on textures) left the default detector where it was
        (criterion 0.883 against 0.884) and raised pure CPC-AD's by 0.013 in every seed
        (decision 17): an option for the pure loss, not the default.
      * num_negatives 63 from the batch in training; at test time a fixed bank of
        `test_negatives` encoded train/good patches, all used for every test patch, so
        scoring is deterministic and less noisy than sampled negatives.
    """
    encoder: str = "resnet18v2"
    norm: str = "layer"
    width: int = 64
    stem: str = "imagenet"        # see make_stem: "small" keeps larger stage maps on small patches
    pred_steps: int = 1
    target_offset: int = 0
    num_negatives: int | None = 63
    negatives: str = "batch"      # training negatives: "batch" (num_negatives from the batch) | "image" (see patch_losses)
    test_negatives: int = 1024
    similarity: str = "cosine"
    temperature: float = 0.1
    shared_encoder: bool = True
    directions: tuple[str, ...] = DIRECTIONS
    knn_bank: int = 16384         # train/good patches the kNN typicality scores compare with
    dense_scoring: bool = True    # anomaly maps on the grid of half the training stride (CPCAD.score_grid)
    detector: str = "knn_stats"   # how patch scores become the anomaly map: a key of DETECTORS
    reduce: str = "top10"         # how the map becomes the image score: a name in REDUCES

    def __post_init__(self):
        _check_model_fields(self)
        check_param("target_offset", self.target_offset, "int", low=0)
        check_param("num_negatives", self.num_negatives, "int", low=1, optional=True)  # None: all in the batch
        check_param("negatives", self.negatives, "str", choices=("batch", "image"))
        check_param("test_negatives", self.test_negatives, "int", low=1)
        check_param("knn_bank", self.knn_bank, "int", low=1)
        check_param("dense_scoring", self.dense_scoring, "bool")
        check_param("shared_encoder", self.shared_encoder, "bool")
        for d in self.directions:
            check_param("directions", d, "str", choices=DIRECTIONS)
        check_param("detector", self.detector, "str", choices=DETECTORS)
        check_param("reduce", self.reduce, "str", choices=REDUCES)


def cpcad_config(preset: str = "fast", grid: PatchGrid | None = None, **overrides) -> CPCADConfig:
    """CPCADConfig from a named preset, then `overrides` (None keeps the preset's value).

    "fast": the dataclass defaults (what the study chose). "paper": de Haan & Loewe as
    published: four independent encoder + W_k models, dot-product scores (temperature 1),
    targets that share no pixels with the context patch (target_offset = the grid's overlap,
    hence the `grid`), the mean patch loss as the image score, pure CPC-AD loss as the map,
    on the training grid.

    One difference from the paper remains: the paper's image score averages every prediction's
    loss equally, while here each patch's map value is the mean of the predictions that target
    it and the image score ("mean") averages patches equally. Patches near the border are
    targeted by fewer directions, so their predictions weigh more: on a 7x7 grid with
    target_offset 1 a corner patch's two predictions count twice as much as each of an interior
    patch's four. The map is what the heatmaps need; the image scores differ only in weighting.
    """
    if preset == "fast":
        base = {}
    elif preset == "paper":
        if grid is None:
            raise ValueError("the paper preset needs the grid: its targets skip the overlapping rows")
        base = dict(shared_encoder=False, similarity="dot", temperature=1.0, target_offset=grid.overlap_steps,
                    pred_steps=1, detector="cpcad", reduce="mean", dense_scoring=False)
    else:
        raise ValueError(f"unknown preset {preset!r}; choose fast or paper")
    cfg = make_config(CPCADConfig, **{**base, **{k: v for k, v in overrides.items() if v is not None}})
    if grid is not None:
        _check_grid_fits(cfg, grid)  # here, with the other parameters: before any data is loaded
    return cfg


def _check_grid_fits(cfg: CPCADConfig, grid: PatchGrid) -> None:
    """Each row of the grid needs a context patch before its targets: G - target_offset - pred_steps >= 1."""
    G, K, off = grid.grid, cfg.pred_steps, cfg.target_offset
    if G - off - K < 1:
        raise ParameterError(f"a {G}x{G} grid leaves no context for pred_steps={K}, target_offset={off}: "
                             f"pred_steps + target_offset must be at most {G - 1} (a larger image_size or a "
                             "smaller stride gives a larger grid)")


class CPCAD(nn.Module):
    """CPC-AD: per-patch InfoNCE losses in four directions, averaged into an anomaly map.

    `shared_encoder=True` encodes each patch once and gives each direction its own W_k;
    `False` trains four independent encoder + W_k models, as in the paper (4x the encoding).
    Each prediction's loss is assigned to the patch being predicted, z_{t+k}.
    """

    def __init__(self, cfg: CPCADConfig, grid: PatchGrid):
        super().__init__()
        self.cfg, self.grid = cfg, grid
        G, K, off = grid.grid, cfg.pred_steps, cfg.target_offset
        _check_grid_fits(cfg, grid)
        cover = sum(unorient(self._target_count(G), d) for d in cfg.directions)
        if (cover == 0).any():
            raise ValueError(f"directions {cfg.directions} leave patches that are never predicted; "
                             "add the opposite direction")
        if cfg.detector not in DETECTORS or cfg.reduce not in REDUCES:
            raise ValueError(f"detector {cfg.detector!r} / reduce {cfg.reduce!r}: choose a detector from "
                             f"{', '.join(DETECTORS)} and a reduce from {', '.join(REDUCES)}")
        n_enc = 1 if cfg.shared_encoder else len(cfg.directions)
        self.encoders = nn.ModuleList(build_encoder(cfg.encoder, cfg.norm, cfg.width, stem=cfg.stem)
                                      for _ in range(n_enc))
        D = self.encoders[0].out_dim
        W = torch.empty(len(cfg.directions), K, D, D)
        for w in W.view(-1, D, D):
            nn.init.xavier_uniform_(w)
        self.W = nn.Parameter(W)                                  # (n_dir, K, D, D): W_k per direction

    def chance_loss(self, batch_size: int) -> float:
        """The training loss of a model that has learned nothing: log of the candidates each
        prediction chooses among (the positive and its negatives), for batches of `batch_size`."""
        per_image = self.grid.num_subimages ** 2 * self.grid.grid ** 2
        if self.cfg.negatives == "image":
            return math.log(per_image)
        return math.log(self.cfg.num_negatives + 1 if self.cfg.num_negatives else batch_size * per_image)

    @property
    def score_grid(self) -> PatchGrid:
        """The grid the anomaly maps are on: with `dense_scoring` the training grid at half its
        stride (an even stride: the training grid's patches are every other one of it, so one
        encoding pass serves both), otherwise the training grid itself."""
        g = self.grid
        if not self.cfg.dense_scoring or g.stride % 2:
            return g
        return dataclasses.replace(g, stride=g.stride // 2)

    def _target_count(self, G: int) -> torch.Tensor:
        """How many predictions target each patch in the oriented frame: (G, G)."""
        count = torch.zeros(G, G)
        for k in range(1, self.cfg.pred_steps + 1):
            count[self.cfg.target_offset + k:] += 1
        return count

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One (B', D, G, G) grid per encoder (one when shared, one per direction otherwise)."""
        return [encode_grid(enc, x, self.grid) for enc in self.encoders]

    def patch_losses(self, zs: list[torch.Tensor], bank: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-patch InfoNCE loss, averaged over steps k and directions: (B', G, G).

        Negatives: with `bank` (n_enc, M, D) every bank entry (scoring); without it, in
        training (all normal images), never a copy of the target cut from another sub-image
        (same image, same position), and with cfg.negatives "batch" `num_negatives` patches of
        the whole batch, with "image" every other patch of the target's own image and none
        else: the hard negatives of a texture, the same material at other places.
        """
        G, off = self.grid.grid, self.cfg.target_offset
        if bank is None:
            n_images = len(zs[0]) // self.grid.num_subimages ** 2
            keys = patch_positions(n_images, self.grid, zs[0].device)          # (B*G*G,), index b*G*G + i*G + j
        total = 0.0
        count = 0.0
        for d, direction in enumerate(self.cfg.directions):
            z = zs[d % len(zs)]                                               # (B, D, G, G)
            B, D = z.shape[:2]
            flat = z.permute(0, 2, 3, 1).reshape(B * G * G, D)                 # candidates, index b*G*G + i*G + j
            ids = orient(torch.arange(B * G * G, device=z.device).view(B, G, G), direction)
            zo = orient(z, direction)
            loss_map = z.new_zeros(B, G, G, dtype=torch.float32)
            for k in range(1, self.cfg.pred_steps + 1):
                rows = G - off - k
                ctx = zo[:, :, :rows].permute(0, 2, 3, 1).reshape(-1, D)       # (B*rows*G, D)
                pred = ctx @ self.W[d, k - 1].to(ctx.dtype)
                pos_index = ids[:, off + k:].reshape(-1)
                if bank is None and self.cfg.negatives == "image":  # one image at a time, its own patches
                    per_image = len(flat) // n_images                          # all its sub-images' patches
                    owner = pos_index // per_image
                    loss = pred.new_empty(len(pred), dtype=torch.float32)
                    for b in range(n_images):
                        own, rows_b = slice(b * per_image, (b + 1) * per_image), owner == b
                        pos_b = pos_index[rows_b]
                        loss[rows_b] = info_nce(pred[rows_b], flat[pos_b], flat[own], None, pos_b - own.start, None,
                                                self.cfg.similarity, self.cfg.temperature, pos_key=keys[pos_b],
                                                cand_key=keys[own])[0].float()
                elif bank is None:
                    loss, _ = info_nce(pred, flat[pos_index], flat, self.cfg.num_negatives, pos_index,
                                       generator, self.cfg.similarity, self.cfg.temperature,
                                       pos_key=keys[pos_index], cand_key=keys)
                else:
                    loss, _ = info_nce(pred, flat[pos_index], bank[d % len(zs)], None, None,
                                       None, self.cfg.similarity, self.cfg.temperature)
                loss_map[:, off + k:] += loss.view(B, rows, G)
            total = total + unorient(loss_map, direction)
            count = count + unorient(self._target_count(G).to(z.device), direction)
        return total / count

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Training objective: the mean per-patch loss with in-batch negatives."""
        return {"loss": self.patch_losses(self.encode(x), generator=generator).mean()}

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return self.loss(x, generator)  # what DistributedDataParallel wraps: the training objective

    @torch.no_grad()
    def build_bank(self, images: torch.Tensor, size: int | None = None, seed: int = 0,
                   batch_size: int = 512, precision: str = "auto") -> torch.Tensor:
        """Encode a fixed random sample of `size` (default `test_negatives`) train/good patches
        as test-time negatives: (n_enc, M, D)."""
        return self.build_references(images, size or self.cfg.test_negatives, seed, ("knn",), batch_size,
                                     self.grid, precision)["knn"]

    def build_references(self, images: torch.Tensor, size: int, seed: int = 0,
                         kinds: Sequence[str] = REFERENCE_KINDS, batch_size: int = 512,
                         grid: PatchGrid | None = None, precision: str = "auto") -> dict[str, torch.Tensor]:
        """Encode a fixed random sample of `size` train/good patches once, as each of `kinds`:
        {"knn": z (n_enc, M, D), "knn_ms": (n_enc, M, D_ms), "knn_stats": (n_enc, M, D_stats)}.

        The patches are sampled from `grid` (default `score_grid`, where the typicality scores
        are measured). Only they are cut out and encoded: the cost is M patches, not the set.
        `precision` is the run's (`TrainConfig.precision`): a model trained in fp32 is encoded in fp32.
        """
        device = self.W.device
        g = torch.Generator().manual_seed(seed)
        grid = grid or self.score_grid
        P, H = grid.patch_size, grid.image_size
        keys = patch_positions(len(images), grid)                # (N * n_sub * G * G,), encode_grid's order
        pick = torch.randperm(len(keys), generator=g)[:size].sort().values
        img, top, left = keys[pick] // (H * H), keys[pick] % (H * H) // H, keys[pick] % H  # patch corners
        windows = images.unfold(2, P, 1).unfold(3, P, 1)         # (N, C, H-P+1, W-P+1, P, P), a view
        out = {k: [[] for _ in self.encoders] for k in kinds}
        for lo in range(0, len(pick), batch_size):
            sl = slice(lo, lo + batch_size)
            # gather only the picked uint8 patches (no float copy of whole images, no Python loop)
            patches = to_float(windows[img[sl], :, top[sl], left[sl]].to(device))  # (b, C, P, P)
            with autocast(device, precision):
                for e, enc in enumerate(self.encoders):
                    described = (enc(patches),) if set(kinds) == {"knn"} else enc.multiscale(patches)
                    d = dict(zip(REFERENCE_KINDS, described))
                    for k in kinds:
                        out[k][e].append(d[k].float())
        return {k: torch.stack([torch.cat(o) for o in v]) for k, v in out.items()}  # each (n_enc, M, ...)


# ---- training ------------------------------------------------------------------------
# One loop for CPC and CPC-AD: Adam, early stopping on validation loss, an atomic checkpoint
# after every epoch with the RNG states, so an interrupted run resumes to the same weights.

@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 16          # images per step; each gives n_sub * G * G patches
    lr: float = 2e-4
    weight_decay: float = 0.0
    patience: int = 5             # epochs without a better validation loss before stopping
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"       # auto | bf16 | fp16 | fp32, see resolve_precision
    time_budget: float | None = None  # seconds this call may train; stops at an epoch boundary before it

    def __post_init__(self):
        for name in ("epochs", "batch_size", "patience"):
            check_param(name, getattr(self, name), "int", low=1)
        check_param("lr", self.lr, "float", low=0)  # 0 keeps the initial weights (a random-init reference)
        if not math.isfinite(self.lr):  # nan passes every comparison above
            raise ParameterError(f"lr={self.lr!r}: must be a finite number")
        check_param("weight_decay", self.weight_decay, "float", low=0)
        check_param("seed", self.seed, "int", low=0)
        check_param("device", self.device, "str")
        check_param("precision", self.precision, "str", choices=PRECISIONS)
        check_param("time_budget", self.time_budget, "float", low=0, open_low=True, optional=True)


def make_config(cls: type, **overrides):
    """Config dataclass `cls` with `overrides`, where None keeps the default: how a notebook's
    parameters (None = "the module's default") reach CPCConfig, CPCADConfig and TrainConfig."""
    return cls(**{k: v for k, v in overrides.items() if v is not None})


DEVICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda, then mps, then cpu; "cpu", "cuda", "cuda:N", "mps" as named.

    A device this machine does not have is a ParameterError naming it, raised here, before a
    model or bundle is loaded, so the message is about the device and not whatever it stopped.
    """
    if str(device) != "auto":
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda", "mps"):
            raise ParameterError(f"device={device!r}: expected {DEVICES}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ParameterError(f"device={device!r}: no CUDA device is available on this machine; use auto or cpu")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise ParameterError(f"device={device!r}: this machine has {n} CUDA device{'s' * (n != 1)} "
                                 f"(cuda:0 to cuda:{n - 1})")
        if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ParameterError(f"device={device!r}: MPS is not available on this machine; use auto or cpu")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """"auto" -> what the device runs fast: bf16 on CUDA compute capability >= 8.0 (A100, H100;
    it has tensor cores for bf16 from there), fp16 with a gradient scaler on 7.x (V100, T4:
    bf16 would be emulated, far slower), fp32 below 7.0 (P100: no fp16 tensor cores either)
    and on CPU / MPS. An explicit bf16 or fp16 needs CUDA."""
    check_param("precision", precision, "str", choices=PRECISIONS)
    device = torch.device(device)
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise ParameterError(f"precision={precision!r} needs a CUDA device, not {device}; use auto or fp32")
        return "fp32"
    if precision != "auto":
        return precision
    major, _ = torch.cuda.get_device_capability(device)
    return "bf16" if major >= 8 else "fp16" if major >= 7 else "fp32"


def autocast(device: torch.device, precision: str = "auto"):
    """Mixed-precision autocast for `precision` (see resolve_precision); fp32: a no-op."""
    import contextlib
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


class RunBlocked(RuntimeError):
    """A run cannot start or go on for a reason its user can fix (another process holds its
    folder, a checkpoint that cannot be read): the message names the file and what to do, so
    command-line entry points print it as one line, not a traceback."""


class TimeBudgetReached(RuntimeError):
    """Training stopped at an epoch boundary because the next epoch would not fit in the time
    budget (a Kaggle session's 12 hours, a cluster job's limit); the checkpoint is kept."""


def parse_duration(value: str | float | int | None) -> float | None:
    """Seconds from 3600, "90s", "30m", "11h" or "1h30m"; None stays None."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if value is None else float(value)
    import re
    text = str(value).strip().lower()
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?", text)
    if not text or parts is None:
        raise ParameterError(f"time_budget={value!r}: expected seconds or a duration such as 90s, 30m, 11h, 1h30m")
    h, m, sec = (float(x) if x else 0.0 for x in parts.groups())
    return h * 3600 + m * 60 + sec


def save_atomic(obj, path: str | os.PathLike, writer: Callable = torch.save) -> None:
    """Write through a temporary file in the same folder, then rename over `path`.

    A failed write leaves the previous `path` as it was and raises OSError naming the file and
    the cause (a full disk is ENOSPC, also when torch's zip writer reports it as "unexpected
    pos"). Files get the usual mode (0644 under the common umask 022), not mkstemp's 0600.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            writer(obj, f)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        full = getattr(e, "errno", None) == errno.ENOSPC or "unexpected pos" in str(e)
        if full or isinstance(e, OSError):
            kept = f"; the previous {path.name} is kept" if path.exists() else ""
            cause = "the disk is full (no space left on device)" if full else (e.strerror or str(e))
            raise OSError(errno.ENOSPC if full else e.errno, f"cannot write {path}: {cause}{kept}") from e
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_json(obj, path: str | os.PathLike) -> None:
    save_atomic(obj, path, lambda o, f: f.write(json.dumps(o, indent=2, default=_json_default).encode()))


def _json_default(o):
    if isinstance(o, (np.generic, np.ndarray, torch.Tensor)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} to JSON")


# A run's identity and folder: what determines its result is fingerprinted; a run writes into
# a staging folder next to its output and replaces the previous run only once it succeeded.

# where and how long a run computes, not what: a pair finished on cuda:1 is not rerun on cuda:0
NOT_IDENTITY = ("resume", "output_dir", "num_heatmaps", "data_root", "time_budget", "device")
RESUMABLE_TRAIN = ("epochs", "patience", "time_budget")  # what a resumed run may change
RESUMABLE_CHANGES = tuple(f"parameters.{k}" for k in RESUMABLE_TRAIN)


def code_version() -> str:
    """The first 12 hex digits of this file's SHA-256: the code a run used (no git needed)."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def data_fingerprint(root: str | os.PathLike, category: str) -> dict:
    """The files a category's run reads: {"root", "category", "files", "digest"} (names and sizes).

    The files are those `load_category` reads (`_category_files`, symlinked folders included):
    deleting a training image changes the digest however train/good got there.
    """
    cat_dir = Path(root).resolve() / category
    train, test = _category_files(cat_dir)
    files = sorted({*train, *(f for f, _, _ in test), *(m for _, _, m in test if m is not None)})
    size = lambda p: p.stat().st_size if p.exists() else "missing"  # noqa: E731 (a dangling link: the loader says so)
    listing = "\n".join(f"{p.relative_to(cat_dir).as_posix()} {size(p)}" for p in files)
    return {"root": str(cat_dir.parent), "category": category, "files": len(files),
            "digest": hashlib.sha256(listing.encode()).hexdigest()[:16]}


def run_fingerprint(parameters: dict, root: str | os.PathLike, category: str) -> dict:
    """What determines a run's result: its parameters (all but NOT_IDENTITY), the data, the code.

    Notebook 02 stores it in its checkpoints and metrics.json; resume and scripts/sweep.py
    compare it (`fingerprint_diff`), so results of other settings are never taken as current.
    """
    params = {k: v for k, v in sorted(parameters.items()) if k not in NOT_IDENTITY}
    return json.loads(json.dumps({"parameters": params, "data": data_fingerprint(root, category),
                                  "code": code_version()}, default=_json_default))


def fingerprint_diff(old: dict, new: dict, ignore: Sequence[str] = ()) -> list[str]:
    """Dotted names of the fields where two fingerprints differ, e.g. ["parameters.width", "code"]."""
    def flat(d, prefix=""):
        return {k2: v2 for k, v in d.items()
                for k2, v2 in (flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}).items()}
    a, b = flat(old or {}), flat(new or {})
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k not in ignore]


def acquire_lock(path: str | os.PathLike) -> Path:
    """Create lock file `path` ({"pid", "host", "started"}), or raise RunBlocked naming its holder.

    A lock left by a process that no longer exists on this host is taken over; one held by
    this process (a notebook cell run again in the same kernel) is kept.
    """
    import socket
    path, host = Path(path), socket.gethostname()
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            if holder.get("host") == host and holder.get("pid") == os.getpid():
                return path
            if holder.get("host") == host and not _alive(holder.get("pid")):
                path.unlink(missing_ok=True)  # its process is gone: a crash, a killed kernel
                continue
            raise RunBlocked(f"{path.parent} is being written by process {holder.get('pid')} on "
                               f"{holder.get('host')} since {holder.get('started')} (lock {path}); wait for it "
                               "to finish, or delete the lock file if that process is gone") from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        return path
    raise RunBlocked(f"cannot take the lock {path}")


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except PermissionError:  # exists, owned by someone else
        return True
    except (OSError, TypeError, ValueError):
        return False
    return True


RUN_MARKER = ".cpc_utils_run"  # in every run folder this module writes: proof that it may replace it
# what a run wrote before RUN_MARKER existed (notebooks 01, 02, scripts/sweep.py's executed copy, the
# score output notebook 02 suggests): a folder with a metrics.json or run.json (unfinished) and
# nothing else is taken as an earlier run
LEGACY_RUN_FILES = ("metrics.json", "model.pt", "run.json", "*.png", "*.ipynb")
LEGACY_RUN_FOLDERS = ("checkpoints", "scored")


def _foreign_entries(path: Path) -> list[str]:
    """The entries of folder `path` that no run writes (a user's notes, data, another tree)."""
    return sorted(e.name + ("/" if e.is_dir() else "") for e in path.iterdir()
                  if not ((e.is_file() and (e.name == RUN_MARKER or any(e.match(f) for f in LEGACY_RUN_FILES)))
                          or (e.is_dir() and not e.is_symlink() and e.name in LEGACY_RUN_FOLDERS)))


def is_run_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a run folder this module wrote and holds nothing else (so a run may
    replace it): it carries RUN_MARKER, or, written before the marker existed, a metrics.json
    or run.json; and every entry is what a run writes. A user's file added to a finished run's
    folder makes it not replaceable: the next run stops and names it instead of deleting it."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    ours = any((path / f).is_file() for f in (RUN_MARKER, "metrics.json", "run.json"))
    return ours and not _foreign_entries(path)


def _check_replaceable(path: Path, what: str) -> None:
    """Raise FileExistsError unless `path` is absent, an empty folder or a run folder of ours:
    a run never deletes what it did not write (a data folder, notes, an earlier sweep)."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir() or path.is_symlink():
        raise FileExistsError(f"{what} {path} is {'a link' if path.is_symlink() else 'a file'}, not a run folder; "
                              "choose another output_dir")
    entries = sorted(e.name + ("/" if e.is_dir() else "") for e in path.iterdir())
    if entries and not is_run_folder(path):
        if (path / RUN_MARKER).is_file():  # our run, with something of the user's added
            foreign = _foreign_entries(path)
            raise FileExistsError(f"{what} {path} is an earlier run of cpc_utils, but it also holds "
                                  f"{', '.join(foreign[:5])}{' and more' if len(foreign) > 5 else ''}, which no run "
                                  "writes; move that out (a run replaces the whole folder) or choose another output_dir")
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise FileExistsError(f"{what} {path} is not empty and not a run folder of cpc_utils (it holds {shown}); "
                              "a run replaces only an earlier run's folder: choose a new or empty output_dir")


def _remove_run(path: Path) -> None:
    """Delete a run folder of ours, its marker and run.json last, so a deletion cut short
    leaves a folder that is still recognisably ours."""
    import shutil
    if not path.exists():
        return
    for e in path.iterdir():
        if e.name in (RUN_MARKER, "run.json"):
            continue
        if e.is_dir() and not e.is_symlink():
            shutil.rmtree(e)
        else:
            e.unlink()
    shutil.rmtree(path)


def _named(out: str | os.PathLike) -> Path:
    """`out` as a path with a name of its own: "." or "a/.." name no folder, so their staging
    and previous-run siblings would land inside them; the absolute path does."""
    out = Path(out)
    return out.resolve() if out.name in ("", "..") else out


def begin_run(out: str | os.PathLike, fingerprint: dict, resume: bool = False) -> Path:
    """Lock output folder `out` and return the staging folder this run writes into.

    Nothing of a previous run in `out` is touched until `finish_run` replaces it, so a run that
    fails (a bad parameter, a crash, Ctrl-C) loses no model and leaves no results that claim
    to be its own. The staging folder is `out`'s hidden sibling `.<name>.partial`; its
    run.json records the fingerprint and status, its RUN_MARKER that it is a run folder.
    An `out` that holds anything but an earlier run (`is_run_folder`), e.g. a data folder or
    a results tree, is a FileExistsError naming it and some of its entries, before anything
    is written; an `out` inside the data folder of `fingerprint`'s category is a ValueError.
    resume=True continues an unfinished staging run, or else a copy of `out`'s checkpoints
    (to train a finished run further). Under torchrun only rank 0 prepares the
    folder; the others wait for it and get its path.
    """
    import shutil
    out = _named(out)
    work, old = out.parent / f".{out.name}.partial", out.parent / f".{out.name}.old"
    data = (fingerprint or {}).get("data") or {}
    if data.get("root") and data.get("category"):  # its figures would be read as that category's images
        cat_dir = Path(data["root"], data["category"]).resolve()
        if cat_dir in out.resolve().parents:
            raise ValueError(f"output_dir {out} is inside the data folder {cat_dir}: the run's files (figures, "
                             f"model.pt) would be read as {data['category']}'s images by the next run; choose an "
                             "output_dir outside the data")
    rank, world = _distributed()
    if rank != 0:
        torch.distributed.barrier()  # rank 0 has prepared `work`
        return work
    lock = acquire_lock(out.parent / f".{out.name}.lock")
    try:
        if old.exists() and not out.exists():  # a switch-over was interrupted: put the previous run back
            _check_replaceable(old, "the previous run's copy")
            old.rename(out)
        for path, what in ((out, "output_dir"), (work, "the staging folder"), (old, "the previous run's copy")):
            _check_replaceable(path, what)
    except FileExistsError:
        lock.unlink(missing_ok=True)
        raise
    has_checkpoint = lambda run: any((run / "checkpoints").rglob("last.pt"))  # noqa: E731 (notebook 01: one per seed)
    if not resume or not has_checkpoint(work):
        _remove_run(work)
        if resume and has_checkpoint(out):
            shutil.copytree(out / "checkpoints", work / "checkpoints")
        elif resume:  # e.g. a mistyped output_dir: said, so hours of training from epoch 0 are no surprise
            print(f"resume=True, but neither {out} nor its staging folder holds a checkpoint: training from the start")
    work.mkdir(parents=True, exist_ok=True)
    save_json({"written_by": "cpc_utils.begin_run", "output_dir": str(out)}, work / RUN_MARKER)
    save_json({"status": "running", "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "output_dir": str(out), "fingerprint": fingerprint}, work / "run.json")
    if world > 1:
        torch.distributed.barrier()
    return work


def finish_run(out: str | os.PathLike, work: str | os.PathLike, metrics: dict) -> Path:
    """Write metrics.json into the staging folder `work` (last), then make it `out`; unlock.

    The previous run in `out`, if any, is moved aside first and deleted once the new one is
    in place; `out` is checked again (`begin_run`'s rule), so a folder that became something
    else meanwhile is kept and this run stays in `work`. Returns the path of the metrics.json written.
    """
    out, work = _named(out), Path(work)
    old = out.parent / f".{out.name}.old"
    _check_replaceable(out, "output_dir")
    _check_replaceable(old, "the previous run's copy")
    save_json(metrics, work / "metrics.json")
    save_json({**json.loads((work / "run.json").read_text()), "status": "finished",
               "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, work / "run.json")
    _remove_run(old)
    if out.exists():
        if not (out / RUN_MARKER).exists():  # an earlier run without one: marked, so a cut deletion stays ours
            save_json({"written_by": "cpc_utils.finish_run", "output_dir": str(out)}, out / RUN_MARKER)
        out.rename(old)
    work.rename(out)
    _remove_run(old)
    (out.parent / f".{out.name}.lock").unlink(missing_ok=True)
    return out / "metrics.json"


def stage_continuation(out: str | os.PathLike, source: str | os.PathLike, fingerprint: dict) -> Path:
    """Prepare `out`'s staging folder to continue the training of the finished run `source`.

    What an epoch ladder does (scripts/sweep.py --epochs 20 40 60): the 40-epoch rung takes
    up the 20-epoch rung's training instead of starting over. Its checkpoints (best.pt, then
    last.pt, each copied to a temporary name and renamed) go into `out`'s staging folder, and
    `begin_run(out, fingerprint, resume=True)` with `train_model(resume=True)` continue from
    there. train_model resumes exactly (weights, optimizer, every RNG, early stopping's
    count), so the rung is the run a separate training to its epochs would give: same
    weights, same metrics. `train_model` still refuses a `source` whose configuration differs
    in more than the epochs. A staging folder already there (an interrupted rung of ours) is
    replaced; `out` itself is not touched. Returns the staging folder.
    """
    import shutil
    out, source = _named(out), Path(source)
    last = source / "checkpoints" / "last.pt"
    if not last.is_file():
        raise FileNotFoundError(f"{source} holds no checkpoints/last.pt to continue from")
    work = out.parent / f".{out.name}.partial"
    lock = acquire_lock(out.parent / f".{out.name}.lock")
    try:
        _check_replaceable(work, "the staging folder")
        _remove_run(work)
        (work / "checkpoints").mkdir(parents=True)
        save_json({"written_by": "cpc_utils.stage_continuation", "output_dir": str(out)}, work / RUN_MARKER)
        save_json({"status": "staged", "continues": str(source), "output_dir": str(out), "fingerprint": fingerprint},
                  work / "run.json")
        for name in ("best.pt", "last.pt"):  # last.pt last: without it the staging folder is not resumed
            if (source / "checkpoints" / name).is_file():
                tmp = work / "checkpoints" / f".{name}.tmp"
                shutil.copyfile(source / "checkpoints" / name, tmp)
                os.replace(tmp, work / "checkpoints" / name)
    finally:
        lock.unlink(missing_ok=True)
    return work


def _batches(n: int, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


@torch.no_grad()
def validation_loss(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device,
                    seed: int = 0, precision: str = "auto") -> float:
    """Mean training objective on held-out images, with a fixed negative sample (repeatable)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for idx in _batches(len(images), batch_size, None):
        with autocast(device, precision):
            total += model.loss(to_float(images[idx].to(device, non_blocking=True)), g)["loss"].item() * len(idx)
        n += len(idx)
    return total / n


NEGATIVES_SEED_OFFSET = 1_000_003  # the negatives' generator: seed + this, a stream apart from the batch order


def _rng_state() -> dict:
    """The global RNG states as tensors and plain types (what weights_only=True reads back):
    torch's (CPU and each CUDA device), numpy's and python's, for an exact resume of code (a
    model, an on_epoch hook) that draws from them."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy_rng": {"name": name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python_rng": {"version": version, "keys": list(keys), "gauss": gauss}}


def _set_rng_state(state: dict) -> None:
    """Restore what `_rng_state` saved (a checkpoint of older code has the torch CPU state only)."""
    torch.set_rng_state(state["torch_rng"].cpu())
    if state.get("cuda_rng") and torch.cuda.is_available() and len(state["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
    if "numpy_rng" in state:
        n = state["numpy_rng"]
        np.random.set_state((n["name"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    if "python_rng" in state:
        py = state["python_rng"]
        random.setstate((py["version"], tuple(py["keys"]), py["gauss"]))


def load_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu",
                    remedy: str = "delete it, or start over with resume=False") -> dict:
    """torch.load(weights_only=True) with a one-line error that names the file and the `remedy`.

    Checkpoints travel (a Kaggle run's output copied back in), so one is read as tensors and
    plain types only: a pickled object in it (a payload, or a checkpoint of older code that
    pickled one) is refused before anything in it runs, as is a truncated or corrupt file.
    """
    import pickle
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only met something other than tensors and plain types
        what = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), type(e).__name__)
        raise RunBlocked(f"refusing checkpoint {path}: it holds Python objects, not only tensors and plain "
                           f"types ({what}), and loading it could run code; nothing in it was run; {remedy}") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, ... for a bad file
        raise RunBlocked(f"cannot read checkpoint {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__} "
                           f"(truncated or corrupt); {remedy}") from e


def train_model(model: nn.Module, train: ImageSet, val: ImageSet | None, cfg: TrainConfig,
                checkpoint_dir: str | os.PathLike | None = None, resume: bool = False,
                progress: bool = True, on_epoch: Callable[[nn.Module, int], dict] | None = None,
                fingerprint: dict | None = None) -> list[dict]:
    """Train `model` (CPC or CPCAD) with Adam; returns the history, one dict per epoch.

    Checkpoints `last.pt` (and a small `progress.json`: epoch, losses, seconds) after every
    epoch and `best.pt` on every better validation loss;
    at the end the best weights are loaded (without `checkpoint_dir`, from a CPU copy kept
    in memory). `resume=True` continues from `last.pt`
    (epochs counts the total). A non-finite loss raises FloatingPointError and leaves the
    last good checkpoint in place. `on_epoch(model, epoch)`, if given, runs after each epoch's
    validation and its dict is added to that epoch's record (e.g. detection on the synthetic
    validation anomalies, to study how long to train). `fingerprint` (`run_fingerprint`) is
    stored in the checkpoint; resuming from one whose fingerprint differs (other than in
    `epochs`) is an error naming the differing fields.

    Precision: `cfg.precision` (resolve_precision: "auto" picks bf16, fp16 or fp32 by device);
    fp16 trains with a gradient scaler (torch.amp.GradScaler), whose state is checkpointed and
    restored on resume. Each epoch's record names the precision used. `cfg.time_budget`: before
    each epoch, if the slowest epoch so far would overrun the budget, the last checkpoint is
    kept and TimeBudgetReached is raised; resume=True continues from there.

    Under torchrun (torch.distributed initialised, see `init_distributed`): each of the N
    processes trains on its share of every batch (images i, i + N, ...; negatives come from
    that share), DistributedDataParallel all-reduces the gradients, the logged losses are
    averaged over processes, and rank 0 alone writes checkpoints. A global batch smaller than
    N is skipped. Resume works with another N: the checkpoint holds the model, the optimizer
    and the batch-order generator, none of which depends on N (the negatives drawn do: they
    come from a generator of their own, so a share of another size never shifts the batch order).
    A checkpoint holds tensors and plain types only and is read with weights_only=True
    (`load_checkpoint`).
    """
    t_start = time.perf_counter()
    rank, world = _distributed()
    _check_negatives(model, cfg.batch_size // world, len(train))
    device = resolve_device(cfg.device)
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # one GPU per process
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")  # fp16 gradients underflow unscaled
    # two streams: every process draws the same batch order whatever the negatives of its share took
    order = torch.Generator().manual_seed(cfg.seed)
    negatives = torch.Generator().manual_seed(cfg.seed + NEGATIVES_SEED_OFFSET)
    history, best, bad_epochs, start = [], float("inf"), 0, 0
    best_state = None  # the best weights when there is no checkpoint_dir to hold best.pt
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    if ckpt and rank == 0 and not (resume and (ckpt / "last.pt").exists()):
        for stale in ("last.pt", "best.pt"):  # a fresh run must not end on an older run's weights
            (ckpt / stale).unlink(missing_ok=True)
    if resume and ckpt and (ckpt / "last.pt").exists():
        state = load_checkpoint(ckpt / "last.pt", device)
        _check_resumable(state, model, cfg, ckpt / "last.pt", fingerprint)
        if (ckpt / "best.pt").exists():
            load_checkpoint(ckpt / "best.pt")  # a truncated best.pt fails now, not after training
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        order.set_state(state["generator"].cpu())  # loaded onto `device`; generator states live on the CPU
        if "negatives_generator" in state:  # not in a checkpoint of older code
            negatives.set_state(state["negatives_generator"].cpu())
        _set_rng_state(state)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history, best, bad_epochs, start = state["history"], state["best"], state["bad_epochs"], state["epoch"]
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    writes = ckpt if rank == 0 else None  # only rank 0 writes files
    images = train.images.to(device)  # decoded once; one host->device copy for the whole run
    val_images = val.images.to(device) if val is not None and len(val) else None
    bar = tqdm(range(start, cfg.epochs), desc="train", disable=not progress, initial=start, total=cfg.epochs)
    for epoch in bar:
        if bad_epochs >= cfg.patience:
            break
        slowest = max((h["seconds"] for h in history[start:] if "seconds" in h), default=0.0)
        over = cfg.time_budget is not None and epoch > start and time.perf_counter() - t_start + slowest > cfg.time_budget
        if _any_rank(over, world, device):  # every process stops at the same epoch
            bar.close()
            raise TimeBudgetReached(f"stopped after epoch {epoch} of {cfg.epochs}: another epoch (up to "
                                    f"{slowest:.0f} s) would overrun time_budget={cfg.time_budget:.0f} s"
                                    f"{_kept(ckpt)}; run again with resume=True to continue")
        t0, model_losses, extras = time.perf_counter(), [], {}
        model.train()
        for step, idx in enumerate(_batches(len(images), cfg.batch_size, order)):
            if len(idx) < world:
                continue  # a last batch too small to give every process an image
            with autocast(device, precision):
                out = net(to_float(images[idx[rank::world].to(device)]), negatives)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss diverged with lr={cfg.lr:g}: non-finite loss ({loss.item()}) at "
                                         f"epoch {epoch + 1}, step {step}{_kept(ckpt)}; try a lower lr")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)  # with fp16: skipped when the scaled gradients overflowed
            scaler.update()
            model_losses.append(loss.item())
            for key, v in out.items():
                if key != "loss":
                    extras.setdefault(key, []).append(v.detach().float().cpu())
        if not torch.stack([p.isfinite().all() for p in model.parameters()]).all():  # e.g. an inf step
            raise FloatingPointError(f"the training diverged with lr={cfg.lr:g}: non-finite weights after epoch "
                                     f"{epoch + 1}{_kept(ckpt)}; try a lower lr")
        record = {"epoch": epoch + 1, "train_loss": _mean_over_ranks(float(np.mean(model_losses)), world, device),
                  "precision": precision,
                  **{k: torch.stack(v).mean(0).tolist() for k, v in extras.items()}}
        if val_images is not None:
            record["val_loss"] = validation_loss(model, val_images, cfg.batch_size, device, cfg.seed + 1, precision)
            if record["val_loss"] < best:
                best, bad_epochs = record["val_loss"], 0
                if writes:
                    save_atomic({"model": model.state_dict(), "epoch": epoch + 1}, ckpt / "best.pt")
                elif not ckpt:
                    best_state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
            else:
                bad_epochs += 1
        record["seconds"] = time.perf_counter() - t0
        if on_epoch is not None:
            record.update(on_epoch(model, epoch + 1))
        history.append(record)
        bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                        **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
        if writes:
            save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                         "generator": order.get_state(), "negatives_generator": negatives.get_state(),
                         **_rng_state(), "scaler": scaler.state_dict(),
                         "history": history, "best": best, "bad_epochs": bad_epochs, "fingerprint": fingerprint,
                         "config": {"train": dataclasses.asdict(cfg), "model": _model_config(model)}},
                        ckpt / "last.pt")
            save_json({"epoch": epoch + 1, "epochs": cfg.epochs, "train_loss": record["train_loss"],
                       "val_loss": record.get("val_loss"), "seconds": record["seconds"]},
                      ckpt / "progress.json")  # for whoever watches the run from outside (scripts/sweep.py)
    if world > 1:
        torch.distributed.barrier()  # rank 0's best.pt is complete before anyone reads it
    if ckpt and (ckpt / "best.pt").exists():
        model.load_state_dict(load_checkpoint(ckpt / "best.pt", device)["model"])
    elif best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun describes (env RANK, WORLD_SIZE, MASTER_ADDR...): NCCL on
    CUDA, gloo on CPU. Returns (rank, world size); (0, 1) when not launched by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return _distributed()


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _any_rank(flag: bool, world: int, device: torch.device) -> bool:
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)  # NCCL reduces CUDA tensors only
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _mean_over_ranks(value: float, world: int, device: torch.device) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item()) / world


def _kept(ckpt: Path | None) -> str:
    """What an error can promise about checkpoints: only files that exist."""
    last = ckpt / "last.pt" if ckpt else None
    return f"; the last good checkpoint is kept in {last}" if last and last.exists() else "; no checkpoint was written"


def _check_negatives(model: nn.Module, batch_size: int, num_train: int) -> None:
    """num_negatives must fit in what one full batch supplies (otherwise they repeat)."""
    k, grid = getattr(getattr(model, "cfg", None), "num_negatives", None), getattr(model, "grid", None)
    if k is None or grid is None:
        return
    pool = min(batch_size, num_train) * grid.num_subimages ** 2 * grid.grid ** 2 - 1
    if k > pool:
        raise ParameterError(f"num_negatives={k}: a batch of {min(batch_size, num_train)} images gives only "
                             f"{pool} other patches to draw from; lower num_negatives or raise batch_size")


def learning_check(history: list[dict], chance_loss: float, margin: float = 0.05) -> dict:
    """Did training learn anything? {"status": "ok" | "at_chance" | "diverged", "message": str}.

    at_chance: the best validation loss (the training loss without validation) is within
    `margin` x chance of the chance loss log(N + 1), the loss of a model that ranks the
    positive no better than a negative (e.g. a collapsed encoder). diverged: the last epoch's
    training loss is above twice chance (e.g. dot-product scores blowing up). Runs that end
    like this still produce metrics; they are flagged, not hidden.
    """
    val = [h["val_loss"] for h in history if "val_loss" in h]
    best = min(val) if val else min(h["train_loss"] for h in history)
    last = history[-1]["train_loss"]
    numbers = f"best loss {best:.3f}, last training loss {last:.3g}, chance {chance_loss:.3f}"
    if not math.isfinite(last) or last > 2 * chance_loss:
        return {"status": "diverged", "message": f"training diverged: {numbers}"}
    if best >= (1 - margin) * chance_loss:
        return {"status": "at_chance", "message": f"nothing learned: the loss stayed at chance ({numbers})"}
    return {"status": "ok", "message": f"learned: {numbers}"}


def chosen_epoch(history: list[dict]) -> int:
    """The epoch whose weights `train_model` ended on: that of the best validation loss (the
    first of equals, as best.pt is only replaced by a lower loss), else the last epoch. With
    early stopping it can lie well before the epochs asked for; an epoch ladder records it
    per rung."""
    val = [(h["val_loss"], h["epoch"]) for h in history if h.get("val_loss") is not None]
    return min(val, key=lambda v: v[0])[1] if val else history[-1]["epoch"]


def _model_config(model: nn.Module) -> dict:
    cfg = getattr(model, "cfg", None)
    return {"class": type(model).__name__, **(dataclasses.asdict(cfg) if cfg is not None else {})}


def _check_resumable(state: dict, model: nn.Module, cfg: TrainConfig, path: Path,
                     fingerprint: dict | None = None) -> None:
    saved = state.get("config", {})
    now = {"train": dataclasses.asdict(cfg), "model": _model_config(model)}
    # a model option missing from the saved config is newer than the checkpoint, which was
    # trained with that option's default (e.g. `stem`)
    fields = dataclasses.fields(model.cfg) if hasattr(model, "cfg") else ()
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    saved_model = json.loads(json.dumps({**defaults, **(saved.get("model") or {})}, default=list))
    now_model = json.loads(json.dumps(now["model"], default=list))
    diff = [k for k in now_model if saved_model.get(k) != now_model[k]]
    diff += [f"train.{k}" for k in now["train"]
             if k not in RESUMABLE_TRAIN and saved.get("train", {}).get(k) != now["train"][k]]
    if fingerprint is not None and state.get("fingerprint") is not None:
        diff += fingerprint_diff(state["fingerprint"], fingerprint, ignore=RESUMABLE_CHANGES)
    if diff:
        raise ValueError(f"cannot resume from {path}: its configuration differs in {', '.join(diff)}; "
                         "use another checkpoint_dir or resume=False")
    if state.get("epoch", 0) > cfg.epochs:  # else its model would be reported as one of cfg.epochs epochs
        raise ValueError(f"cannot resume from {path}: it has trained {state['epoch']} epochs, more than "
                         f"epochs={cfg.epochs}; ask for at least {state['epoch']}, or resume=False to train "
                         f"{cfg.epochs} from the start")


# ---- scoring and metrics -------------------------------------------------------------
# Raw patch scores (CPC-AD loss, kNN typicality) -> calibrated, named detectors -> image
# scores (mean as in the paper, max, top10) and pixel heatmaps; the MVTec AD metrics; and
# the non-learned reference every report is compared against.

@torch.no_grad()
def score_patches(model: CPCAD, images: torch.Tensor, bank: torch.Tensor,
                  references: dict[str, torch.Tensor] | None = None, batch_size: int = 16,
                  device: str | torch.device = "auto", progress: bool = False,
                  precision: str = "auto") -> dict[str, torch.Tensor]:
    """Raw per-patch scores of uint8 images (N, C, H, W), deterministic, each (N, n_sub, G, G)
    on `model.score_grid` (what `patches_to_pixels` and `evaluate_maps` must be given with them).

    "loss": CPC-AD's InfoNCE loss against the fixed `bank` of train/good negatives (the paper's
    score: how *unpredictable* a patch is from its neighbours), computed on the training grid
    and, with `dense_scoring`, interpolated bilinearly onto the dense grid (exact at the
    training grid's patches, every other one). With `references` (from
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
    G, dense = model.score_grid.grid, model.score_grid != model.grid
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("loss", *refs)}
    for idx in tqdm(_batches(len(images), batch_size, None), desc="score", disable=not progress):
        x = to_float(images[idx.to(device)])
        with autocast(device, precision):
            if refs:  # descriptors on the score grid; the training grid's z are every other patch of it
                grids = [encode_grid(enc, x, model.score_grid, multiscale=True) for enc in model.encoders]
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
                    knn_size: int | None = None, batch_size: int = 16, device: str | torch.device = "auto",
                    seed: int = 0, precision: str = "auto") -> dict:
    """What scoring needs from normal data, computed once after training.

    bank: `test_negatives` encoded train/good patches, the InfoNCE negatives; references: up
    to `knn_size` (default `model.cfg.knn_bank`) other train/good patches of the score grid, as embeddings z
    ("knn"), multi-scale descriptors ("knn_ms") and stage statistics ("knn_stats"), what the
    typicality scores compare with; calibration: a ScoreCalibration fitted on
    `calibration_images`, normal images held out of training (train images would look too
    normal: the model has fitted them, and their own patches sit among the references).
    Everything is encoded at the run's `precision`, as `score_patches` must then be called.
    """
    bank = model.build_bank(train_images, seed=seed, precision=precision)
    size = knn_size or model.cfg.knn_bank
    references = model.build_references(train_images, size, seed=seed + 1, precision=precision)
    calibration = None
    if calibration_images is not None and len(calibration_images):
        raw = score_patches(model, calibration_images, bank, references, batch_size, device, precision=precision)
        calibration = ScoreCalibration.fit(raw)
    return {"bank": bank, "references": references, "calibration": calibration}


def score_images(model: CPCAD, images: torch.Tensor, bank: torch.Tensor, batch_size: int = 16,
                 device: str | torch.device = "auto", progress: bool = False, precision: str = "auto") -> torch.Tensor:
    """CPC-AD patch loss maps of uint8 images (N, C, H, W) -> (N, n_sub, G, G) on
    `model.score_grid`, deterministic.

    Sub-images are scored one grid at a time, against the same bank of train/good negatives.
    """
    return score_patches(model, images, bank, None, batch_size, device, progress, precision)["loss"]


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
             "scores": {reduce: (N,)}, "pixel_maps": (N, 1, H, W)}.
    """
    reduces = list(reduces)
    pixel_maps = patches_to_pixels(patch_maps, grid)
    scores = {r: image_scores(patch_maps, r) for r in reduces}
    metrics = compute_metrics(test.labels, scores[reduces[0]], test.masks, pixel_maps)
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


# ---- what CPC learned (notebook 01) -------------------------------------------------
# CPC's training loss flatters it: most in-batch negatives come from other images, so a model
# that only knows which image a patch came from already beats chance. `prediction_metrics`
# asks the spatial question with the image's own patches as the only negatives, and the
# patch probes ask whether frozen embeddings find defects, always beside the same network
# untrained and beside raw pixels.

PROBE_MIN_FRACTION = 0.1   # a patch is a defect patch when at least this fraction of its pixels is
PROBE_MAX_REFERENCES = 16384  # normal patches the kNN probe compares against (a seeded sample beyond)


@torch.no_grad()
def prediction_metrics(model: CPC, images: torch.Tensor, negatives: str = "image", batch_size: int = 16,
                       device: torch.device | str = "cpu", seed: int = 0) -> dict:
    """CPC's loss and accuracy per step k on held-out images (see `CPC.loss`).

    negatives="image": every other patch of the same image, nothing else (chance: one in the
    number of distinct patch positions of an image). negatives="batch": the training objective,
    `num_negatives` drawn from the whole batch of `batch_size` images with a fixed seed.
    Returns {"loss_per_step": [K], "acc_per_step": [K], "chance_loss", "chance_accuracy"}.
    """
    device = torch.device(device)
    model.eval().to(device)
    g = torch.Generator().manual_seed(seed)
    loss = acc = 0
    for idx in _batches(len(images), batch_size, None):
        out = model.loss(to_float(images[idx].to(device)), g, negatives)
        loss = loss + out["loss_per_step"].float().cpu() * len(idx)
        acc = acc + out["acc_per_step"].float().cpu() * len(idx)
    candidates = (len(torch.unique(patch_positions(1, model.grid))) if negatives == "image"
                  else model.cfg.num_negatives + 1)
    return {"loss_per_step": (loss / len(images)).tolist(), "acc_per_step": (acc / len(images)).tolist(),
            "chance_loss": math.log(candidates), "chance_accuracy": 1 / candidates}


PROBE_DESCRIPTORS = ("z", "stats")


@torch.no_grad()
def patch_embeddings(encoder: nn.Module, images: torch.Tensor, grid: PatchGrid, batch_size: int = 32,
                     device: torch.device | str = "cpu", descriptor: str = "z") -> torch.Tensor:
    """Frozen features of every grid patch: (N, n_sub * G * G, F) float32, on the CPU.

    descriptor "z": the embedding CPC predicts (F = D); "stats": the stage statistics of
    `PatchEncoder.multiscale` (the mean and spatial spread of every channel of every stage),
    the descriptor the default detector (`knn_stats`) compares.
    """
    check_param("descriptor", descriptor, "str", choices=PROBE_DESCRIPTORS)
    return _patch_descriptors(encoder, images, grid, batch_size, device)[descriptor]


@torch.no_grad()
def _patch_descriptors(encoder: nn.Module, images: torch.Tensor, grid: PatchGrid, batch_size: int = 32,
                       device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every PROBE_DESCRIPTORS reading of every grid patch from one encoding pass:
    {"z" | "stats": (N, n_sub * G * G, F) float32, on the CPU}."""
    encoder.eval().to(device)
    out = {d: [] for d in PROBE_DESCRIPTORS}
    for x in images.split(batch_size):
        z, _, stats = encode_grid(encoder, to_float(x.to(device)), grid, multiscale=True)  # (b * n_sub, F, G, G)
        for d, t in (("z", z), ("stats", stats)):
            out[d].append(t.float().permute(0, 2, 3, 1).reshape(len(x), -1, t.shape[1]).cpu())
    return {d: torch.cat(v) for d, v in out.items()}


def pixel_patch_features(images: torch.Tensor, grid: PatchGrid, size: int = 4) -> torch.Tensor:
    """The raw-pixel reference: every grid patch average-pooled to size x size pixels,
    (N, n_sub * G * G, 3 * size * size)."""
    out = []
    for x in images.split(32):
        p = extract_patches(to_float(x), grid)                            # (b * n_sub, G, G, C, P, P)
        q = F.adaptive_avg_pool2d(p.reshape(-1, *p.shape[3:]), size)
        out.append(q.reshape(len(x), -1, q[0].numel()))
    return torch.cat(out)


def patch_defect_fraction(masks: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """The fraction of each grid patch's pixels inside the defect mask: (N, n_sub * G * G)."""
    return torch.cat([extract_patches(m.float(), grid).mean(dim=(3, 4, 5)).reshape(len(m), -1)
                      for m in masks.split(32)])


def patch_probes(fit: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                 normal: torch.Tensor, min_fraction: float = PROBE_MIN_FRACTION, seed: int = 0) -> dict:
    """Can these frozen patch features find defects? Two probes, scored by AUROC on test patches.

    * linear: a logistic regression on standardised features, fit to tell defect patches from
      normal ones in `fit` (synthetic anomalies pasted into held-out normals, never test/) and
      scored on `test`'s patches (the real defects): CPC's linear evaluation, per patch.
    * knn (no labels): each test patch's Euclidean distance, after standardising by the normal
      patches' mean and spread, to its nearest normal patch; AUROC over patches, and over
      images with each image's largest distance.
    A patch counts as a defect when at least `min_fraction` of its pixels are; patches with a
    smaller, non-zero share are neither clearly normal nor defective and are left out.

    Args:
        fit, test: (features (N, n, F), defect fraction (N, n)) as from `patch_embeddings` (or
            `pixel_patch_features`) and `patch_defect_fraction`.
        normal: (M, n, F) features of normal images (the training images), for the kNN.
    Returns {"linear_auroc", "knn_auroc", "knn_image_auroc"}.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def labelled(features, fraction):
        keep = ((fraction == 0) | (fraction >= min_fraction)).reshape(-1)
        return features.reshape(-1, features.shape[-1])[keep].numpy(), (fraction.reshape(-1)[keep] > 0).numpy(), keep

    x_fit, y_fit, _ = labelled(*fit)
    x_test, y_test, keep = labelled(*test)
    for what, y in (("fit", y_fit), ("test", y_test)):
        if y.all() or not y.any():
            raise ValueError(f"the {what} patches need both defect and normal patches (defect: at least "
                             f"{min_fraction:.0%} of the pixels); got {int(y.sum())} of {len(y)} defective")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, class_weight="balanced"))
    linear = roc_auc_score(y_test, clf.fit(x_fit, y_fit).decision_function(x_test))

    ref = normal.reshape(-1, normal.shape[-1])
    if len(ref) > PROBE_MAX_REFERENCES:
        ref = ref[torch.randperm(len(ref), generator=torch.Generator().manual_seed(seed))[:PROBE_MAX_REFERENCES]]
    mu, sd = ref.mean(0), ref.std(0) + 1e-6
    ref, query = (ref - mu) / sd, ((test[0] - mu) / sd).reshape(-1, ref.shape[-1])
    distance = torch.cat([torch.cdist(q, ref).min(1).values for q in query.split(4096)]).view(test[1].shape)
    image_labels = (test[1] > 0).any(1).numpy()
    return {"linear_auroc": float(linear),
            "knn_auroc": float(roc_auc_score(y_test, distance.reshape(-1)[keep].numpy())),
            "knn_image_auroc": float(roc_auc_score(image_labels, distance.max(1).values.numpy()))}


# name: what it is; "trained" (the CPC-trained encoder read as the default detector reads it) is the headline
PROBE_FEATURES = {"trained": "CPC-trained encoder, stage statistics", "random": "same encoder at random init, stage statistics",
                  "trained_z": "CPC-trained encoder, embedding z", "random_z": "same encoder at random init, embedding z",
                  "pixel": "raw pixels"}
PROBE_METRICS = {"knn_auroc": "kNN, patch AUROC", "knn_image_auroc": "kNN, image AUROC",
                 "linear_auroc": "linear probe, patch AUROC"}  # the first is notebook 01's headline


def probe_representations(trained: nn.Module, random: nn.Module, train: ImageSet, fit: ImageSet, test: ImageSet,
                          grid: PatchGrid, device: torch.device | str = "cpu", seed: int = 0) -> dict:
    """`patch_probes` of five representations (`PROBE_FEATURES`): the CPC-trained encoder and
    the same encoder at its random initialisation, each read as stage statistics (what the
    default detector compares; the headline) and as the embedding z, and raw pixels. fit:
    normals with synthetic anomalies (for the linear probe), train: the normal images the kNN
    compares against, test: real defects.
    Returns {name in PROBE_FEATURES: {"linear_auroc", "knn_auroc", "knn_image_auroc"}}."""
    sets = {"fit": fit, "test": test, "train": train}
    features = {"pixel": {k: pixel_patch_features(v.images, grid) for k, v in sets.items()}}
    for name, encoder in (("trained", trained), ("random", random)):  # one encoding pass per encoder and set
        both = {k: _patch_descriptors(encoder, v.images, grid, device=device) for k, v in sets.items()}
        features[name] = {k: d["stats"] for k, d in both.items()}
        features[f"{name}_z"] = {k: d["z"] for k, d in both.items()}
    fit_fraction, test_fraction = patch_defect_fraction(fit.masks, grid), patch_defect_fraction(test.masks, grid)
    return {name: patch_probes((features[name]["fit"], fit_fraction), (features[name]["test"], test_fraction),
                               features[name]["train"], seed=seed) for name in PROBE_FEATURES}


PROBE_MARGIN = 0.02  # AUROC the trained encoder must gain over its random init, on average and in every seed


def probe_verdict(runs: list[dict], metric: str = "knn_auroc", margin: float = PROBE_MARGIN,
                  against: str = "random") -> tuple[bool, list[float]]:
    """Does the trained encoder beat `against` (its random initialisation, or "pixel") on
    `metric`? Over the seeds' `probe_representations`: (mean gain >= margin and a gain in
    every seed, gain per seed)."""
    gains = [r["trained"][metric] - r[against][metric] for r in runs]
    return bool(np.mean(gains) >= margin and min(gains) > 0), gains


def _pm(values: Sequence[float], digits: int = 3) -> str:
    m, sd = _mean_std(list(values))
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def probe_table(runs: list[dict]) -> str:
    """Markdown: one row per representation, mean ± std over the seeds' `probe_representations`."""
    lines = ["| features | " + " | ".join(PROBE_METRICS.values()) + " |", "|---" * (len(PROBE_METRICS) + 1) + "|"]
    for f, name in PROBE_FEATURES.items():
        lines.append(f"| {name} | " + " | ".join(_pm([r[f][m] for r in runs]) for m in PROBE_METRICS) + " |")
    return "\n".join(lines)


def prediction_table(runs: list[dict]) -> str:
    """Markdown: CPC's loss and accuracy per step k, negatives from the batch and from the same
    image only, mean ± std over seeds. runs: [{"batch": prediction_metrics, "image": ...}]."""
    lines = ["| k | batch negatives: loss | accuracy | same-image negatives: loss | accuracy |", "|---" * 5 + "|"]
    for k in range(len(runs[0]["image"]["acc_per_step"])):
        lines.append(f"| {k + 1} | " + " | ".join(_pm([r[n][m][k] for r in runs]) for n in ("batch", "image")
                                                    for m in ("loss_per_step", "acc_per_step")) + " |")
    lines.append("| chance | " + " | ".join(f"{runs[0][n][c]:.3f}" for n in ("batch", "image")
                                              for c in ("chance_loss", "chance_accuracy")) + " |")
    return "\n".join(lines)


# ---- plots ---------------------------------------------------------------------------
# Each returns a matplotlib Figure, so notebooks show it and scripts save it.

def _figure(*args, **kw):
    import matplotlib.pyplot as plt
    return plt.subplots(*args, **kw)


HEATMAP_CMAP = "inferno"       # perceptual: brightness grows with the score
GROUND_TRUTH_COLOUR = "cyan"   # the defect outline, visible on inferno and on most photographs
NORMAL_COLOUR, ANOMALOUS_COLOUR = "C0", "C3"
STRIP_MAX_IMAGES = 200         # above this a strip plot of every image is a blur


def plot_training_curves(history: list[dict], title: str = "") -> "matplotlib.figure.Figure":
    """Is the model learning? Train and validation loss per epoch (and CPC's per-step accuracy)."""
    has_acc = "acc_per_step" in history[0]
    fig, axes = _figure(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5, 3.5), squeeze=False)
    epochs = [h["epoch"] for h in history]
    ax = axes[0, 0]
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    if "val_loss" in history[0]:
        ax.plot(epochs, [h["val_loss"] for h in history], "s-", label="validation")
    ax.set(xlabel="epoch", ylabel="InfoNCE loss", title=title or "training")
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


def _budget(row: dict):
    """The epochs a run was asked for (`epochs`), else the epochs it trained."""
    return row.get("epochs", row.get("epochs_trained"))


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


def check_one_detector(rows: list[dict]) -> tuple[str | None, str | None]:
    """The one (detector, image reduction) that every row was scored with; an error when rows
    mix them, since a table or chart that pools two detectors in one column compares methods,
    not encoders (filter the rows by `detector` and `image_reduce` first)."""
    kinds = sorted({(r.get("detector"), r.get("image_reduce")) for r in rows}, key=str)
    if len(kinds) > 1:
        found = "; ".join(f"{d or 'unnamed'} ({m or 'unnamed'}): "
                          f"{sum((r.get('detector'), r.get('image_reduce')) == (d, m) for r in rows)} rows"
                          for d, m in kinds)
        raise ValueError(f"the rows mix detectors or image reductions ({found}); compare one at a time: "
                         "filter the rows by their 'detector' and 'image_reduce'")
    return kinds[0] if kinds else (None, None)


def detector_groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """{(detector, image reduction): its rows}, the groups a table or chart may compare within."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((r.get("detector"), r.get("image_reduce")), []).append(r)
    return dict(sorted(out.items(), key=lambda kv: str(kv[0])))


def _group(rows: list[dict], metric: str, key: Callable[[dict], object]) -> dict:
    """{key(row): [row[metric], ...]} over the rows that have `metric`."""
    out: dict = {}
    for r in rows:
        if r.get(metric) is not None:
            out.setdefault(key(r), []).append(r[metric])
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for a single run)."""
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)


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
    fig.suptitle(f"{question}?\ntest AUROC by category and encoder{_run_description(shown)}", fontsize=11)
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
               "detector": sel[0].get("detector"), "image_reduce": sel[0].get("image_reduce")}
        for m in (*metrics, *(f"baseline_{m}" for m in metrics)):
            values = [r[m] for r in sel if r.get(m) is not None]
            row[m] = float(np.mean(values)) if len(values) == len(sel) else None
        out.append(row)
    return out


def _save_figure(fig, path: str | os.PathLike) -> None:
    """Write `fig` as PNG atomically and close it."""
    import matplotlib.pyplot as plt
    save_atomic(fig, path, lambda f, out: f.savefig(out, format="png", dpi=100))
    plt.close(fig)


# ---- results -------------------------------------------------------------------------
# One metrics.json per run at results/<run>/<category>/<encoder>/; one function turns a
# results tree into summary.md, summary.csv and the figures.

SUMMARY_COLUMNS = ("category", "half", "encoder", "seed", "epochs", "epochs_trained", "chosen_epoch", "learned",
                   "calibration", "detector",
                   "image_reduce",
                   "image_auroc", "pixel_auroc", "aupro", "baseline_image_auroc", "baseline_pixel_auroc",
                   "cpcad_image_auroc", "cpcad_pixel_auroc", "val_image_auroc", "val_pixel_auroc",
                   "image_f1_max", "train_seconds")
TEXT_COLUMNS = ("category", "half", "encoder", "seed", "epochs", "epochs_trained", "chosen_epoch", "learned",
                "calibration", "detector", "image_reduce")
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
    "detector": "the anomaly map scored (`cu.DETECTORS`): e.g. `cpcad` the CPC-AD loss alone, `knn_stats` (the "
                "default) the standardised distance of the patch's stage statistics, from the CPC-trained encoder, "
                "to the nearest normal patch's, `cpcad_knn_stats` the standardised loss plus that distance",
    "image_reduce": "how a patch map becomes an image score: `mean` (the paper's), `max`, or `top10` "
                    "(the mean of the highest 10% of patches)",
    "image_auroc": "test image AUROC of the detector, image score = `image_reduce` of its patch map",
    "pixel_auroc": "test pixel AUROC of the detector's pixel map against the ground-truth masks",
    "aupro": "area under the per-region-overlap curve up to 30% false positive rate, divided by 0.3 (MVTec AD)",
    "baseline_image_auroc": "the same as image_auroc for the raw-pixel baseline (each patch's distance to the "
                            "nearest train patch in downsampled pixels; nothing learned), same reduction",
    "baseline_pixel_auroc": "pixel AUROC of the raw-pixel baseline: a learned detector should beat it",
    "cpcad_image_auroc": "pure CPC-AD, the paper's detector: the loss map with the `mean` reduction",
    "cpcad_pixel_auroc": "pixel AUROC of pure CPC-AD",
    "val_image_auroc": "image AUROC on the validation set: held-out train/good images with synthetic anomalies "
                       "pasted in (never test images); choices are made on these numbers",
    "val_pixel_auroc": "pixel AUROC on the validation set",
    "image_f1_max": "test F1 at the best threshold of the image score (chosen on the test set: optimistic)",
    "train_seconds": "seconds of training, all epochs (also those before a resume)",
}
SUMMARY_HIDDEN_PARAMETERS = ("category", "encoder", "output_dir", "data_root")  # per row, or where, not how
HALVES = ("tuning", "confirmation", "")


def demo_half(category: str) -> str:
    """"tuning" or "confirmation" for a demo category (see DEMO_TUNING), "" for any other."""
    return "tuning" if category in DEMO_TUNING else "confirmation" if category in DEMO_CONFIRMATION else ""


def _half(row: dict) -> str:
    return row.get("half") or demo_half(row["category"])


def _half_rank(half: str) -> int:
    return HALVES.index(half) if half in HALVES else len(HALVES)


def _category_order(rows: list[dict]) -> list[str]:
    """Categories of `rows`: the tuning half, the confirmation half, then any other, each A-Z."""
    halves = {r["category"]: _half(r) for r in rows}
    return sorted(halves, key=lambda c: (_half_rank(halves[c]), c))


def _encoder_order(rows: list[dict]) -> list[str]:
    """Encoders of `rows`: registry order (`ENCODERS`), then any other A-Z."""
    present = {r["encoder"] for r in rows}
    return [e for e in ENCODERS if e in present] + sorted(present - set(ENCODERS))


def load_results(root: str | os.PathLike, skip: Iterable[str | os.PathLike] = ()) -> list[dict]:
    """Every metrics.json under `root`, flattened to one dict per run. `skip`: files left out
    because the caller reports them itself (scripts/sweep.py: unreadable ones, as failed pairs).

    Raises ValueError naming the file for one that is not valid JSON (e.g. truncated) or
    not a JSON object (a run's record is one object).
    """
    rows = []
    root, skip = Path(root), {Path(p).resolve() for p in skip}
    for path in sorted(root.rglob("metrics.json")):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue  # a staging folder (.<name>.partial) of a run not yet finished
        if path.resolve() in skip:
            continue
        try:
            row = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}): truncated or not a metrics.json; "
                             "run it again, or move it out of the results folder") from e
        if not isinstance(row, dict):
            kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(row), "number")
            raise ValueError(f"{path} holds a JSON {kind}, expected an object (one run's metrics, as notebook 02 "
                             "writes them)")
        rows.append(row)
    return rows


def _summary_row(row: dict) -> dict:
    """`row` with the derived columns: half, learned, calibration, seed (top-level or from
    config.parameters), chosen_epoch (from the history for a run that did not record it)."""
    chosen = row.get("chosen_epoch") or (chosen_epoch(row["history"]) if row.get("history") else None)
    return {**row, "half": _half(row), "learned": (row.get("learning") or {}).get("status", ""),
            "calibration": (row.get("calibration") or {}).get("status", ""),
            "seed": _seed(row), "chosen_epoch": chosen}


def summary_records(rows: list[dict]) -> list[dict]:
    """`rows` cut to the SUMMARY_COLUMNS (derived ones included): what summary.csv holds."""
    return [{c: r.get(c) for c in SUMMARY_COLUMNS} for r in map(_summary_row, rows)]


def _fmt(column: str, value) -> str:
    """Two decimals for scores (reruns move AUROCs by about 0.02), whole seconds; text as is."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.0f}" if column.endswith("seconds") else f"{value:.2f}"
    return str(value)


def summary_table(rows: list[dict], columns: Sequence[str] = SUMMARY_COLUMNS) -> str:
    """A markdown table of `rows`, one line per run, plus a mean line per (half, encoder).

    "half" is the demo half of the category (tuning / confirmation; empty for MVTec AD): the
    tuning half's test numbers are not independent of the choices the study made. Scores
    have two decimals, seconds none (summary.csv keeps full precision).
    """
    rows = [_summary_row(r) for r in rows]
    numeric = [c for c in columns if c not in TEXT_COLUMNS]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    order = {c: i for i, c in enumerate(_category_order(rows))}  # by half, then A-Z
    for r in sorted(rows, key=lambda r: (order[r["category"]], r["encoder"], _budget(r) or 0,
                                         r["seed"] if isinstance(r["seed"], int) else -1)):
        lines.append("| " + " | ".join(_fmt(c, r.get(c)) for c in columns) + " |")
    for half, enc in sorted({(r["half"], r["encoder"]) for r in rows}, key=lambda k: (_half_rank(k[0]), k)):
        sel = [r for r in rows if r["encoder"] == enc and r["half"] == half]
        mean = {c: float(np.mean([r[c] for r in sel])) for c in numeric
                if all(isinstance(r.get(c), (int, float)) for r in sel)}
        text = {"category": "**mean**", "half": half, "encoder": enc}
        lines.append("| " + " | ".join(text.get(c, "") if c in TEXT_COLUMNS else _fmt(c, mean.get(c))
                                       for c in columns) + " |")
    return "\n".join(lines) + "\n"


def comparison_table(rows: list[dict], metric: str | Sequence[str] = "image_auroc") -> str:
    """Markdown table Class | Epochs | resnet18v2 | resnet50v2 | densenet | baseline of `metric`.

    One line per (category, epochs asked for: `epochs`, else `epochs_trained`), categories by
    demo half (tuning, confirmation, then others), one column per encoder (registry order, as
    the command line spells them), a baseline column (the raw-pixel baseline, `baseline_<metric>`)
    when the rows have it, and after each half a mean line per epochs: the mean over categories
    of the per-cell means. With several metrics a cell reads "image / pixel". Runs that share a
    cell (seeds) show mean ± std (when they differ); missing runs show "-". Two decimals.
    Every row must come from one detector and image reduction (`check_one_detector`).
    """
    metrics = (metric,) if isinstance(metric, str) else tuple(metric)
    check_one_detector(rows)
    encoders = _encoder_order(rows)
    has_base = any(r.get(f"baseline_{m}") is not None for r in rows for m in metrics)
    columns = encoders + (["baseline"] if has_base else [])
    cell: dict[tuple, list[list[float]]] = {}  # (category, epochs, column) -> values per metric
    for r in rows:
        key = (r["category"], _budget(r))
        for col, prefix in ((r["encoder"], ""), ("baseline", "baseline_")):
            values = cell.setdefault(key + (col,), [[] for _ in metrics])
            for v, m in zip(values, metrics):
                v += [r[prefix + m]] if r.get(prefix + m) is not None else []

    def fmt(values: list[list[float]] | None, spread: bool = True) -> str:
        if not values or not any(values):
            return "-"
        parts = []
        for v in values:
            mean, std = _mean_std(v) if v else (None, 0.0)
            spread_text = f" ± {std:.2f}" if spread and len(set(v)) > 1 else ""
            parts.append("-" if mean is None else f"{mean:.2f}{spread_text}")
        return " / ".join(parts)

    order = {c: i for i, c in enumerate(_category_order(rows))}
    keys = sorted({k[:2] for k in cell}, key=lambda k: (order[k[0]], k[1] or 0))
    halves = {r["category"]: _half(r) for r in rows}
    lines = ["| Class | Epochs | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for half in sorted(set(halves.values()), key=_half_rank):
        mine = [k for k in keys if halves[k[0]] == half]
        lines += [f"| {c} | {n} | " + " | ".join(fmt(cell.get((c, n, e))) for e in columns) + " |" for c, n in mine]
        for n in sorted({k[1] for k in mine}, key=lambda n: n or 0):
            per_column = [[cell[c, n, e] for c, n2 in mine if n2 == n and (c, n, e) in cell] for e in columns]
            means = [[[float(np.mean(v[i])) for v in cells if v[i]] for i in range(len(metrics))]
                     for cells in per_column]
            label = f"**mean {half}**" if half else "**mean**"
            lines.append(f"| {label} | {n} | " + " | ".join(fmt(m, spread=False) for m in means) + " |")
    return "\n".join(lines) + "\n"


def _seed(row: dict):
    """A run's seed: top-level (the study's rows) or its notebook parameter."""
    return row.get("seed", ((row.get("config") or {}).get("parameters") or {}).get("seed"))


def _cell_stats(values: list[float], digits: int = 2, each: bool = False) -> str:
    """"0.84" for one run, "0.84 ± 0.02" for several that differ, "-" for none; with `each`,
    every run's value ("38, 40")."""
    if not values:
        return "-"
    if each:
        return ", ".join(f"{v:.{digits}f}" for v in values)
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if len(set(values)) > 1 else "")


def _floor(rows: list[dict], metric: str) -> list[float]:
    """The raw-pixel floor of `metric` per seed (`baseline_<metric>`, averaged over the seed's
    runs, which share it: it trains nothing and is computed on the same split and grid)."""
    per_seed = _group(rows, f"baseline_{metric}", _seed)
    return [float(np.mean(v)) for v in per_seed.values()]


def _one_grid(rows: list[dict]) -> None:
    """A like-for-like floor needs one score grid: rows of several (image or patch sizes) are
    refused; rows that record none (older runs) are not checked."""
    grids = {(r.get("score_grid"), r.get("baseline_grid")) for r in rows if r.get("score_grid") is not None}
    if len(grids) > 1:
        raise ValueError(f"the rows were scored on several grids ({', '.join(map(str, sorted(grids, key=str)))}: "
                         "(detector, baseline) G); compare runs of one geometry at a time")


def ladder_table(rows: list[dict], metric: str = "image_auroc", digits: int = 2, each: bool = False) -> str:
    """The study's table for one `metric`: Class | <encoder> e<N> ... | pixel floor.

    One line per category (tuning half, confirmation half, then others), one column per
    encoder (registry order) x epochs asked for (ascending), as an epoch ladder
    (scripts/sweep.py --epochs 20 40 60) or separate runs give them; then the raw-pixel
    floor (same grid and reduction; mean ± std over seeds). Runs that share a cell (seeds)
    show mean ± std; "-" marks a cell with no run. A mean line per half: the mean over its
    categories of the cell means. Rows must come from one detector, image reduction and
    score grid (`check_one_detector`), so no column pools two methods. `digits`: 2 for scores
    (reruns move them by about 0.02), 0 for e.g. `chosen_epoch`; `each`: a cell lists every
    run's value (in seed order) instead of their mean ± std.
    """
    check_one_detector(rows)
    _one_grid(rows)
    encoders = _encoder_order(rows)
    budgets = {e: sorted({_budget(r) for r in rows if r["encoder"] == e}, key=lambda b: b or 0) for e in encoders}
    columns = [(e, b) for e in encoders for b in budgets[e]]
    has_floor = any(r.get(f"baseline_{metric}") is not None for r in rows)
    by_seed = sorted(rows, key=lambda r: (str(type(_seed(r))), _seed(r) if _seed(r) is not None else 0))
    cells = _group(by_seed, metric, lambda r: (r["category"], r["encoder"], _budget(r)))
    head = [f"{e} e{b}" for e, b in columns] + (["pixel floor"] if has_floor else [])
    lines = ["| Class | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    categories = _category_order(rows)
    halves = {c: _half(next(r for r in rows if r["category"] == c)) for c in categories}
    floors = {c: _floor([r for r in rows if r["category"] == c], metric) for c in categories}
    for half in sorted(set(halves.values()), key=_half_rank):
        mine = [c for c in categories if halves[c] == half]
        for c in mine:
            values = [_cell_stats(cells.get((c, e, b), []), digits, each) for e, b in columns]
            floor = [_cell_stats(floors[c], digits)] if has_floor else []
            lines.append(f"| {c} | " + " | ".join(values + floor) + " |")
        means = [[float(np.mean(cells[c, e, b])) for c in mine if (c, e, b) in cells] for e, b in columns]
        means += [[float(np.mean(floors[c])) for c in mine if floors[c]]] if has_floor else []
        label = f"**mean {half}**" if half else "**mean**"
        lines.append(f"| {label} | " + " | ".join(f"{np.mean(m):.{digits}f}" if m else "-" for m in means) + " |")
    return "\n".join(lines) + "\n"


def encoder_verdicts(rows: list[dict], metric: str = "image_auroc") -> list[str]:
    """One sentence per category: which encoder scores best, and is its lead real?

    Encoders are compared at the longest training every one of them has in that category (the
    budget asked for, not the best-scoring epoch: picking that on test numbers would flatter
    the winner), by their mean over seeds. The lead over the runner-up counts as larger than
    the seed spread when it exceeds both encoders' standard deviation over seeds; with one
    seed the spread is unknown and the sentence says so. The best's distance from the raw-pixel
    floor closes it.
    """
    check_one_detector(rows)
    words = _metric_label(rows, metric)
    out = []
    for c in _category_order(rows):
        sel = [r for r in rows if r["category"] == c and r.get(metric) is not None]
        encoders = _encoder_order(sel)
        common = set.intersection(*({_budget(r) for r in sel if r["encoder"] == e} for e in encoders)) if sel else set()
        if len(encoders) < 2 or not common:
            out.append(f"{c}: only {encoders[0]} was run." if len(encoders) == 1 else f"{c}: no {metric} recorded."
                       if not encoders else f"{c}: the encoders share no training length, so none is compared.")
            continue
        at = max(common, key=lambda b: b or 0)
        stats = {e: _mean_std([r[metric] for r in sel if r["encoder"] == e and _budget(r) == at]) + (
                 sum(r["encoder"] == e and _budget(r) == at for r in sel),) for e in encoders}
        best, runner = sorted(encoders, key=lambda e: -stats[e][0])[:2]
        (m1, s1, n1), (m2, s2, n2) = stats[best], stats[runner]
        lead = m1 - m2
        text = f"{c}: {best} is best at {at} epochs: {words} {m1:.3f} against {runner}'s {m2:.3f}"
        if min(n1, n2) < 2:
            text += (f"; one seed, so whether its lead of {lead:.3f} is larger than the seed spread is unknown "
                     "(run more: scripts/sweep.py --seeds 0 1 2)")
        else:
            spread = max(s1, s2)
            text += (f"; its lead of {lead:.3f} is {'larger than' if lead > spread else 'within'} the seed spread "
                     f"(std up to {spread:.3f} over {min(n1, n2)} seeds)")
        floor = _floor(sel, metric)
        if floor:
            f = float(np.mean(floor))
            text += f"; against the raw-pixel floor ({f:.3f}) the best is {m1 - f:+.3f}"
        out.append(text + ".")
    return out


def cost_table(rows: list[dict]) -> str:
    """Markdown table of what each encoder costs: parameters (the encoder at the runs' width
    and at the standard width 64, the whole CPC-AD model, whose W_k grow as D^2), D, and
    seconds per training epoch and to score the test split (`score_seconds`: bank, references
    and test maps), measured by the runs themselves (mean ± std
    over runs; an epoch ladder's rungs share their epochs, so each chain counts once, by its
    longest rung). Seconds depend on the device and on what ran beside it."""
    longest: dict[tuple, dict] = {}
    for r in rows:
        key = (r["category"], r["encoder"], _seed(r))
        if key not in longest or len(r.get("history") or []) > len(longest[key].get("history") or []):
            longest[key] = r
    lines = ["| Encoder | Encoder parameters | at width 64 | CPC-AD parameters | D | s / epoch | s / test scoring | runs | device |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in _encoder_order(rows):
        sel = [r for r in rows if r["encoder"] == e]
        chains = [r for k, r in longest.items() if k[1] == e]
        epoch_s = [float(np.mean([h["seconds"] for h in r["history"]])) for r in chains if r.get("history")]
        models = sorted({(m["width"], m.get("norm", "layer"), m.get("stem", "imagenet"))
                         for m in (((r.get("config") or {}).get("model") or {}) for r in sel) if m.get("width")})
        widths = ", ".join(str(w) for w, _, _ in models)
        enc_params = ", ".join(f"{count_parameters(build_encoder(e, norm=n, width=w, stem=st)):,}"
                               for w, n, st in models) if e in ENCODERS else ""
        full = f"{count_parameters(build_encoder(e, width=64)):,}" if e in ENCODERS else ""
        cpcad = ", ".join(f"{n:,}" for n in sorted({r["num_parameters"] for r in sel if r.get("num_parameters")}))
        dims = ", ".join(str(d) for d in sorted({r["embedding_dim"] for r in sel if r.get("embedding_dim")}))
        score_s = [r["score_seconds"] for r in sel if r.get("score_seconds") is not None]
        devices = ", ".join(sorted({str(r["device"]) for r in sel if r.get("device")}))
        fmt = lambda v: "-" if not v else f"{_mean_std(v)[0]:.1f}" + (f" ± {_mean_std(v)[1]:.1f}" if len(v) > 1 else "")  # noqa: E731
        lines.append(f"| {e} | {enc_params}{f' (width {widths})' if widths else ''} | {full} | {cpcad} | {dims} | "
                     f"{fmt(epoch_s)} | {fmt(score_s)} | {len(sel)} | {devices} |")
    return "\n".join(lines) + "\n"


def _run_parameters(row: dict) -> dict:
    """The notebook parameters of a run (config.parameters), a None replaced by the value it
    resolved to (config.model / train / grid), minus those that differ by design."""
    cfg = row.get("config") or {}
    resolved = {k: v for part in ("grid", "train", "model") for k, v in (cfg.get(part) or {}).items()}
    return {k: resolved.get(k) if v is None else v for k, v in (cfg.get("parameters") or {}).items()
            if k not in SUMMARY_HIDDEN_PARAMETERS}


def _value_order(text: str) -> tuple:
    """Sort key of a JSON value: numbers by value, before any other value by its text."""
    value = json.loads(text)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (not number, value if number else 0, text)


def parameters_text(rows: list[dict]) -> str:
    """Markdown lines: the parameters shared by every run, then those that differ between runs."""
    params = [_run_parameters(r) for r in rows if (r.get("config") or {}).get("parameters")]
    if not params:
        return "The runs record no parameters (no `config.parameters` in their metrics.json).\n"
    names = sorted(set().union(*params))
    values = {k: sorted({json.dumps(p.get(k), default=str) for p in params}, key=_value_order) for k in names}
    shared = [k for k in names if len(values[k]) == 1 and all(k in p for p in params)]
    differ = [f"`{k}` ({', '.join('None' if v == 'null' else v for v in values[k])})" for k in names if k not in shared]
    text = "**Parameters** of every run (notebook 02's; a `None` is shown as the default it resolved to): " \
           + (", ".join(f"`{k}={params[0][k]}`" for k in shared) or "none shared") + ".\n"
    if differ:
        text += "\n**Parameters that differ between runs**: " + "; ".join(differ) + ".\n"
    if len(params) < len(rows):
        text += f"\n{len(rows) - len(params)} of {len(rows)} runs record no parameters.\n"
    return text


def _count(n: int, one: str, many: str = "") -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def summary_markdown(rows: list[dict], title: str, written: str = "", pairs: str = "") -> str:
    """summary.md: title, what was run, its parameters, `pairs` (the sweep's `pair_status_table`),
    the class x encoder table, the table of every run and a legend of its columns."""
    categories, encoders = _category_order(rows), _encoder_order(rows)
    per_half = {h: sum(_half(next(r for r in rows if r["category"] == c)) == h for c in categories) for h in HALVES}
    halves = ", ".join(f"{n} {h or 'other'}" for h, n in per_half.items() if n)
    groups = detector_groups(rows)
    tables = []
    for (detector, reduce), group in groups.items():  # never two detectors in one column
        how = f"detector {detector}, " if detector else ""
        how += f"image score: {reduce} of the patch map; " if reduce else ""
        tables += [f"### {detector or 'unnamed detector'} ({reduce or 'unnamed reduction'})\n" if len(groups) > 1 else "",
                   f"Cells: image AUROC / pixel AUROC ({how}baseline: the raw-pixel baseline on the same grid with "
                   "the same reduction); mean ± std where several runs share a cell; a mean line per demo half. Two "
                   "decimals: reruns move these by about 0.02 (summary.csv has every digit).\n",
                   comparison_table(group, ("image_auroc", "pixel_auroc")),
                   f"![test AUROC by category and encoder]({_comparison_png(detector, reduce, len(groups))})\n"]
    parts = [f"# Results of `{title}`\n",
             f"{_count(len(rows), 'run')} of notebook 02: {_count(len(categories), 'category', 'categories')} "
             f"({halves}: {', '.join(categories)}) x {_count(len(encoders), 'encoder')} ({', '.join(encoders)})."
             + (f" Summary written {written}." if written else "") + "\n",
             parameters_text(rows), pairs,
             "## Test AUROC by category and encoder\n", *tables,
             "## Every run\n", summary_table(rows), "\nColumns:\n",
             "\n".join(f"- `{c}`: {COLUMN_LEGEND[c]}" for c in SUMMARY_COLUMNS) + "\n"]
    return "\n".join(p for p in parts if p)


def _comparison_png(detector: str | None, reduce: str | None, n_groups: int) -> str:
    """comparison.png, or one file per detector when a results tree holds several."""
    return "comparison.png" if n_groups == 1 else f"comparison_{detector}_{reduce}.png"


def pair_status_table(status: dict[str, str], failures: dict | None = None, others: Sequence[str] = ()) -> str:
    """Markdown list of a sweep's pairs that did not finish: failed (with the error) or missing;
    `others`: finished pairs in the folder that the sweep did not ask for."""
    failures = failures or {}
    counts = {s: sum(v == s for v in status.values()) for s in ("finished", "failed", "missing")}
    lines = [f"\n**Pairs of the last sweep**: {counts['finished']} finished, {counts['failed']} failed, "
             f"{counts['missing']} missing (not run: the sweep stopped).\n"]
    for pair, state in status.items():
        if state != "finished":
            error = (failures.get(pair, {}).get("error") or "").splitlines()
            lines.append(f"- {pair}: {state}" + (f": {error[0]}" if error else ""))
    if others:
        lines.append(f"\nAlso in this folder, from earlier sweeps with their own parameters (see each "
                     f"metrics.json): {', '.join(sorted(others))}.")
    return "\n".join(lines) + "\n"


def write_summary(run_dir: str | os.PathLike, status: dict[str, str] | None = None,
                  failures: dict | None = None, skip: Iterable[str | os.PathLike] = ()) -> list[dict]:
    """Write summary.md, summary.csv, comparison.png (and epochs.png when some pair has several
    epoch budgets) for a results tree; return its rows.

    status ({"category/encoder[/seed<k>][/e<N>]": "finished" | "failed" | "missing", the runs'
    folders under `run_dir`, from scripts/sweep.py) and
    failures add the pairs that have no current result. The "learned" column flags runs whose
    loss stayed at chance or diverged (`learning_check`). skip: metrics files to leave out
    (`load_results`).
    """
    import csv
    import datetime
    import io
    run_dir = Path(run_dir)
    rows = load_results(run_dir, skip)
    if not rows:
        raise FileNotFoundError(f"no metrics.json under {run_dir}")
    others = {p.parent.relative_to(run_dir).as_posix() for p in run_dir.rglob("metrics.json")
              if not any(part.startswith(".") for part in p.relative_to(run_dir).parts)} - set(status or {})
    written = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = summary_markdown(rows, run_dir.name, written, pair_status_table(status, failures, others) if status else "")
    save_atomic(text.encode(), run_dir / "summary.md", lambda o, f: f.write(o))
    buf = io.StringIO()
    w = csv.DictWriter(buf, SUMMARY_COLUMNS)
    w.writeheader()
    w.writerows(summary_records(rows))
    save_atomic(buf.getvalue().encode(), run_dir / "summary.csv", lambda o, f: f.write(o))
    groups = detector_groups(rows)
    for (detector, reduce), group in groups.items():
        _save_figure(plot_comparison(group), run_dir / _comparison_png(detector, reduce, len(groups)))
    series = [g for g in groups.values() if has_epoch_series(g)]
    if series:
        _save_figure(plot_epochs(max(series, key=len)), run_dir / "epochs.png")
    else:
        (run_dir / "epochs.png").unlink(missing_ok=True)  # an earlier summary's, of runs no longer here
    return rows


# ---- model bundle --------------------------------------------------------------------
# A trained model as a tool: one file with everything scoring needs (weights, grid, negative
# bank, kNN references, calibration, thresholds); `python -m cpc_utils score` on new images.

BUNDLE_FORMAT = "cpc_utils.bundle"
BUNDLE_VERSION = 2  # raise it when a bundle's contents change meaning; load_bundle refuses others
IMAGE_HANDLING = ("8-bit RGB: grayscale replicated to 3 equal channels, 16-bit scaled to 8 bit (read_image); "
                  "resized bilinearly to image_size x image_size")
MASK_COLOUR = "lime"  # the predicted mask's outline on an overlay (cyan is the ground truth's)


def save_bundle(path: str | os.PathLike, model: CPCAD, scoring: dict, threshold: dict, pixel_threshold: dict,
                data: dict | None = None, precision: str = "fp32") -> Path:
    """Write a self-contained model bundle, all `load_bundle` needs to score new images.

    It holds the weights, the CPCADConfig and PatchGrid (as dicts), the negative bank, the kNN
    references the configured detector reads (only those), the score calibration, the image
    size and handling, the image and pixel thresholds with their rules (`normal_threshold`),
    the bundle format version, `code_version()` and the training data's fingerprint (`data`,
    e.g. `data_fingerprint(root, category)`). Tensors are moved to the CPU and everything is
    plain tensors and Python values, so a bundle trained on a GPU loads on any machine, with
    `torch.load(weights_only=True)`. Written atomically.

    Args:
        scoring: `prepare_scoring`'s {"bank", "references", "calibration"}.
        threshold, pixel_threshold: `normal_threshold` of the validation normals' image scores
            and pixel scores.
        precision: the precision the run trained and scored in, resolved (`resolve_precision`:
            bf16, fp16 or fp32); the bundle scores in it on a GPU, in fp32 elsewhere.
    """
    check_param("precision", precision, "str", choices=PRECISIONS[1:])  # resolved: what the run computed in
    kind = detector_references(model.cfg.detector)
    calibration = scoring["calibration"]
    bundle = {
        "format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "code_version": code_version(),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "config": dataclasses.asdict(model.cfg), "grid": dataclasses.asdict(model.grid),
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
    """A loaded model bundle (`load_bundle`): scores new images with its detector and reduce.

    threshold_rule / pixel_threshold_rule: `normal_threshold`'s dicts; info: format_version,
    code_version, created, data (the training data's fingerprint), image_handling, path.
    """
    model: CPCAD
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
                            precision)
        maps = detector_maps(raw, self.calibration, self.model.cfg.detector)  # (N, n_sub, G, G), score grid
        scores = image_scores(maps, self.model.cfg.reduce)
        return {"scores": scores, "anomalous": scores > self.threshold,
                "pixel_maps": patches_to_pixels(maps, self.model.score_grid), "patch_maps": maps}


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
        calibration = ScoreCalibration.from_dict(b["calibration"]) if b["calibration"] is not None else None
        info = {k: b.get(k) for k in ("format_version", "code_version", "created", "data", "image_handling",
                                      "precision")}
        bundle = Bundle(model.eval().to(device), b["bank"].to(device), {k: v.to(device) for k, v in b["references"].items()},
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


BUNDLE_CONTENTS = {"config": dict, "grid": dict, "state_dict": dict, "bank": torch.Tensor, "references": dict,
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
    detector = b["config"].get("detector")
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
    model, grid = bundle.model, bundle.model.score_grid
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



# ---- command line --------------------------------------------------------------------
# `python -m cpc_utils <command>`; the parser is built at the top of the file (`cli_parser`),
# so that --help answers before torch is imported.

def main(argv: Sequence[str] | None = None) -> None:
    args = _CLI_ARGS if argv is None and _CLI_ARGS is not None else cli_parser().parse_args(argv)
    try:
        _run_command(args)
    except (OSError, ValueError) as e:  # the user's input or disk (a path below a file, a full disk): one line, no traceback
        said = e.strerror if isinstance(e, OSError) and e.strerror and e.filename is None else e  # no "[Errno 20]"
        raise SystemExit(f"python -m cpc_utils {args.command}: {said}") from None


def _run_command(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    if args.command == "demo-data":
        root = make_demo_dataset(args.out, args.categories, seed=args.seed)
        print(f"demo dataset written to {root} ({', '.join(list_categories(root))}) "
              f"in {time.perf_counter() - t0:.1f} s")
    elif args.command == "summary":
        rows = write_summary(args.run_dir)
        print((Path(args.run_dir) / "summary.md").read_text())
        print(f"{len(rows)} runs summarised in {args.run_dir} (summary.md, summary.csv, comparison.png)")
    elif args.command == "score":
        resolve_device(args.device)  # a device this machine lacks: said now, not as a bundle that fails to load
        r = score_files(args.bundle, args.inputs, args.out, args.threshold, args.pixel_threshold, args.device,
                        args.batch_size)
        print(f"{r['scored']} of {r['images']} images scored in {r['seconds']:.1f} s, {r['anomalous']} anomalous "
              f"at threshold {r['threshold']:.4g}" + (f", {r['resized']} resized" if r["resized"] else "")
              + (f", {r['upsampled']} enlarged over {UPSAMPLE_WARNING:g} times (see the upsampled column)"
                 if r["upsampled"] else "") + f"; wrote {r['csv']}, heatmaps/ and masks/ in {args.out}")
        problems = [f"{r['failed']} of {r['images']} images could not be read"] * bool(r["failed"]) + [
            f"{r['nonfinite']} of {r['images']} images got a non-finite score"] * bool(r["nonfinite"])
        if problems:
            raise SystemExit(f"python -m cpc_utils score: {', '.join(problems)}; see the error column of {r['csv']}")


if __name__ == "__main__":
    main()
