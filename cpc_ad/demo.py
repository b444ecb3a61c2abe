"""The embedded demo dataset: 8 categories in the MVTec AD layout, cut from or shaded with real
photographs shipped in scikit-image, with defects drawn by the synthetic edits and pixel masks."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .files import save_atomic, save_json, written_here
from .data import _configured_root, _is_category_dir, find_mvtec_root
from .synthetic import _changed, _edit, _region, _to_uint8


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
    manifest existed is taken over). A linked folder inside `d` is FileExistsError too: nothing
    is written or deleted through it. Checked before anything is written.
    """
    if d.exists() and not d.is_dir():
        raise FileExistsError(f"{d} is a file: expected a folder for the demo category")
    try:
        previous = written_here(d, DEMO_MANIFEST)
    except ValueError as e:
        raise ValueError(f"{e}; or choose another folder") from None
    linked = sorted({d / q for f in previous | set(files) for q in Path(f).parents if q != Path(".")
                     and (d / q).is_symlink()})
    if linked:  # writing or deleting through it would reach a folder of the user's, elsewhere
        raise FileExistsError(f"{linked[0]} is a link to another folder: demo-data writes only into folders of its "
                              "own; choose another folder, or remove the link")
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
