"""MVTec AD layout: finding the dataset, reading images and masks, the train / calibration /
validation split. Images are decoded and resized once into uint8 tensors."""
from __future__ import annotations

import dataclasses
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch


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
        if _is_category_dir(path):  # the category's own folder, one level too deep: a common slip
            raise FileNotFoundError(
                f"{path} ({source}) is a category folder (it holds train/good), not the data root above it: "
                f"did you mean data_root={str(path.parent)!r} and category={path.name!r} (scripts/sweep.py "
                f"--data-root {path.parent} --categories {path.name}; scripts/train.py --data_root {path.parent} "
                f"--category {path.name})?")
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
    pixel_labels: whether `masks` are ground truth; False for a category without ground_truth/
    (image labels only: its masks are all False and no pixel metric can be computed on it).
    """
    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    defect_types: list[str]
    paths: list[str]
    substituted: dict[str, str] = field(default_factory=dict)
    pixel_labels: bool = True

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: Sequence[int] | torch.Tensor) -> "ImageSet":
        index = torch.as_tensor(index, dtype=torch.long)
        paths = [self.paths[i] for i in index.tolist()]
        kept = set(paths)
        return ImageSet(self.images[index], self.masks[index], self.labels[index],
                        [self.defect_types[i] for i in index.tolist()], paths,
                        {p: k for p, k in self.substituted.items() if p in kept}, self.pixel_labels)


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


LOSSY_FORMATS = ("JPEG", "MPO", "WEBP")  # masks saved so are read at half intensity (`read_mask`)
FULL_MASK = 0.9  # a defect mask covering more of its image than this is probably inverted: warned


def read_mask(path: str | os.PathLike, image_size: int,
              image: tuple[Path, tuple[int, int]] | None = None) -> torch.Tensor:
    """Decode a ground-truth mask to (1, S, S) bool, resized with nearest neighbour.

    A mask is read by what it encodes (`_mask_pixels`): grayscale of any depth by its raw values,
    every non-zero pixel defect (MVTec AD writes 0/255, other tools 0/1, which a `> 127`
    threshold would read as empty); a palette mask by its indices, index 0 the background (the
    convention of palette label maps, whatever colour index 0 is shown in); a mask with
    transparent pixels by its alpha, opaque being defect (RGB may be white everywhere); other
    colour masks by their colours, every non-black pixel defect (a dark colour still marks one).
    A lossily compressed mask (JPEG, WebP) is read at half intensity (> 127) instead of
    non-zero, since compression leaves faint non-zero values all over its background.
    `image` = (its image's path, (width, height)): a mask of another size is a ValueError
    naming both, since resizing both to S x S would silently misalign the defect region.
    """
    from PIL import Image
    try:
        im = Image.open(path)  # the header only, until the pixels are needed
    except Exception as e:
        raise ValueError(f"cannot read mask {path}: {e}") from e
    with im:
        level = 127 if im.format in LOSSY_FORMATS else 0  # read before turning: a turned copy has no format
        im = _upright(im)  # as its image is read (`_open_rgb`)
        if image and im.size != image[1]:
            raise ValueError(f"mask {path} is {im.size[0]}x{im.size[1]} px but its image {image[0]} is "
                             f"{image[1][0]}x{image[1][1]} px (width x height); they must match")
        try:
            m = _mask_pixels(im.resize((image_size, image_size), Image.NEAREST), path, level)  # (S, S)
        except Exception as e:
            raise ValueError(f"cannot read mask {path}: {e}") from e
    return torch.from_numpy(m)[None]


def _mask_pixels(im: "PIL.Image.Image", path: str | os.PathLike, level: int = 0) -> np.ndarray:
    """The defect pixels of a decoded mask (H, W) bool, by what its mode encodes (`read_mask`),
    a value counting when above `level`.

    A colour mask with no black or transparent pixel at all (a white or coloured background)
    would be all defect by the non-black rule; its most common colour is read as the background
    instead, with a warning naming it."""
    if im.mode in ("1", "L", "F") or im.mode.startswith("I"):
        return np.asarray(im) > level
    if im.mode == "P":  # indices; a palette with transparency goes by its alpha like any other
        index = np.asarray(im)
        if "transparency" not in im.info and (index == 0).any():
            return index != 0
    rgba = np.asarray(im.convert("RGBA"))  # (H, W, 4)
    alpha, rgb = rgba[..., 3], rgba[..., :3]
    if (alpha <= level).any() and (alpha > level).any():  # drawn on a transparent background
        return alpha > level
    defect = (rgb > level).any(-1)
    if defect.all() and defect.size:
        colours, counts = np.unique(rgb.reshape(-1, 3), axis=0, return_counts=True)
        background = colours[counts.argmax()]
        if len(colours) > 1:
            warnings.warn(f"mask {path} has no black or transparent pixel: its most common colour "
                          f"{tuple(int(c) for c in background)} is read as the background, the others as defect",
                          stacklevel=4)
            return (rgb != background).any(-1)
    return defect


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
    A category with no ground_truth/ folder at all (custom data labelled per image) is read
    with image labels only: its test set's `pixel_labels` is False; a ground_truth/ that lacks
    some masks is still an error naming the first one missing.
    macOS metadata (._* files, __MACOSX folders) is skipped with one warning; masks that mark
    nearly the whole image as defect (an inverted mask?) are named in one warning.
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
    pixel_labels = (cat_dir / "ground_truth").is_dir()  # none at all: labelled per image, not per pixel
    for f, defect, mask in test_items:
        if defect != "good" and defect.casefold() == "good":  # else read as a defect type, or its masks missing
            raise ValueError(f"{test_dir / defect}: the normal test images' folder must be named test/good "
                             "(lower case); any other name is a defect type")
        if defect != "good" and mask is None and pixel_labels:
            raise FileNotFoundError(f"defect image {f} has no mask: expected "
                                    f"{cat_dir / 'ground_truth' / defect / (f.stem + '_mask.png')} (a category "
                                    "without a ground_truth/ folder is evaluated on image labels only)")
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
    masks = [(mask, m) for (_, defect, mask), (_, m, _, _) in zip(test_items, test) if mask is not None]
    empty = [mask for mask, m in masks if not m.any()]
    full = [(mask, m.float().mean().item()) for mask, m in masks if m.float().mean() > FULL_MASK]
    if full:
        warnings.warn(f"{len(full)} defect masks mark more than {FULL_MASK:.0%} of their image as defect (first: "
                      f"{full[0][0]}, {full[0][1]:.0%}): is the mask inverted (a white background with the defect "
                      "drawn dark), or not a mask? Pixel metrics read it as it is", stacklevel=2)
    if empty:
        warnings.warn(f"{len(empty)} defect images have no defect pixel at {image_size}x{image_size} px (first: "
                      f"{empty[0]}): an empty mask, or a defect too small for this size; they count as anomalous "
                      "images but add no pixel to the pixel metrics", stacklevel=2)
    return {"train": _stack(train), "test": dataclasses.replace(_stack(test), pixel_labels=pixel_labels)}


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
                    [p for s in sets for p in s.paths], {p: k for s in sets for p, k in s.substituted.items()},
                    all(s.pixel_labels for s in sets))
