"""Synthetic anomalies for a validation set that never looks at test/: each kind edits one
random region of a normal image, and its mask is exactly the changed pixels."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from .data import ImageSet, concat_sets


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
