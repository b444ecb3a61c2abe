"""Synthetic anomalies for a validation set that never looks at test/: each kind edits one
random region of a normal image, and its mask is exactly the changed pixels.

The validation set chooses the detector per class, so it must rank detectors as the real
test split would. Besides the first six kinds (LEGACY_KINDS, the earlier design), four
imitate what that set lacked: defects that keep a texture's local statistics and break its
structure (rotated_block), lose its fine detail (smoothed_region), or take a piece of an
object away (missing_part) or add one where it does not belong (extra_part). Drawn
natively (`make_validation_set(native=True)`), a defect is painted on the image file at its
own resolution and then resized with the image, as a real defect is, instead of drawn as
hard full-contrast pixels at the working size, which flatters thin lines.
"""
from __future__ import annotations

from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np
import torch

from .data import ImageSet, _open_rgb, _resized_tensor, concat_sets


# Synthetic anomalies: a validation set for model selection that never looks at test/.
# Each kind edits one random region of a normal image; its mask is exactly the changed pixels.
# New kinds go at the end: a kind's draws are seeded by its index (`_visible_defect`).

LEGACY_KINDS = ("flat_fill", "smooth_blob", "thin_line", "shifted_block", "colour_shift", "foreign_patch")
SYNTHETIC_KINDS = LEGACY_KINDS + ("rotated_block", "smoothed_region", "missing_part", "extra_part")
NATIVE_MAX_SIDE = 1024  # px: a larger file is drawn on downscaled to this long side (`_native_canvas`)


def _box(mask: np.ndarray, pad: int = 0) -> tuple[slice, slice]:
    """The bounding box of the True pixels of `mask` (H, W), grown by `pad` px within the image."""
    ys, xs = np.nonzero(mask)
    H, W = mask.shape
    return (slice(max(ys.min() - pad, 0), min(ys.max() + pad + 1, H)),
            slice(max(xs.min() - pad, 0), min(xs.max() + pad + 1, W)))


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


def _grid(shape: tuple[int, int], lo: np.ndarray, hi: np.ndarray) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """The box of pixels from `lo` to `hi` (row, col; clipped to the image) and its pixel
    coordinates y, x (h, w) float32: what a shape is evaluated on instead of the whole image,
    which at 1024 px would cost more than everything else in a draw."""
    y0, x0 = np.clip(np.floor(lo), 0, shape).astype(int)
    y1, x1 = np.clip(np.ceil(hi) + 1, 0, shape).astype(int)  # exclusive
    y, x = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    return (slice(y0, y1), slice(x0, x1)), y, x


def _polyline(shape: tuple[int, int], rng: np.random.Generator, width: float,
              centre: tuple[float, float] | None = None) -> np.ndarray:
    """A thin random polyline, `width` px wide (a crack or scratch), as bool (H, W)."""
    H, W = shape
    s = H / 256
    pts = [np.array(centre if centre is not None else rng.uniform(0.2, 0.8, 2) * (H, W))]
    angle = rng.uniform(0, 2 * np.pi)
    for _ in range(int(rng.integers(2, 5))):
        angle += rng.uniform(-0.7, 0.7)
        pts.append(pts[-1] + rng.uniform(12, 30) * s * np.array([np.sin(angle), np.cos(angle)]))
    half = max(width, 1.0) / 2
    box, y, x = _grid(shape, np.min(pts, 0) - half - 1, np.max(pts, 0) + half + 1)
    dist = np.full(y.shape, np.inf, np.float32)  # (h, w)
    for a, b in zip(pts[:-1], pts[1:]):  # distance of every pixel to the segment a-b
        d = b - a
        t = np.clip(((y - a[0]) * d[0] + (x - a[1]) * d[1]) / max(d @ d, 1e-6), 0, 1)
        dist = np.minimum(dist, np.hypot(y - a[0] - t * d[0], x - a[1] - t * d[1]))
    line = np.zeros(shape, bool)
    line[box] = dist <= half
    return line


def _bump(shape: tuple[int, int], rng: np.random.Generator, radius: tuple[float, float],
          centre: tuple[float, float] | None = None) -> tuple[tuple[slice, slice], np.ndarray]:
    """A smooth bump (1 - r^2)^2 on a random ellipse, exactly 0 outside: a Gaussian-like profile
    with compact support, so the changed pixels form one solid blob. Returns the ellipse's
    box and the bump on it, (h, w) in [0, 1]."""
    H, W = shape
    s = H / 256
    cy, cx = centre if centre is not None else rng.uniform(0.2, 0.8, 2) * (H, W)
    ry, rx = np.maximum(rng.uniform(*radius, 2) * s, 1.5)
    t = rng.uniform(0, np.pi)
    r = max(ry, rx)  # the rotated ellipse lies within this circle
    box, y, x = _grid(shape, np.array([cy - r - 1, cx - r - 1]), np.array([cy + r + 1, cx + r + 1]))
    y, x = y - cy, x - cx
    r2 = ((np.cos(t) * y + np.sin(t) * x) / ry) ** 2 + ((-np.sin(t) * y + np.cos(t) * x) / rx) ** 2
    return box, np.clip(1 - r2, 0, 1) ** 2


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


def _background(img: np.ndarray) -> np.ndarray:
    """The image's background colour (C,): the median of a border strip 1/32 of its size wide.
    MVTec objects lie centred on a plain background that fills the border; on a texture this is
    the texture's median colour."""
    b = max(1, round(min(img.shape[:2]) / 32))
    strip = np.concatenate([img[:b].reshape(-1, img.shape[2]), img[-b:].reshape(-1, img.shape[2]),
                            img[:, :b].reshape(-1, img.shape[2]), img[:, -b:].reshape(-1, img.shape[2])])
    return np.median(strip, axis=0).astype(np.float32)


def _on_object(img: np.ndarray, bg: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """A random pixel (row, col) of the central 70% of `img` whose colour is at least 0.1 from
    the background `bg`: somewhere on the object, or anywhere on a texture; uniform in the
    central 60% when no pixel is."""
    H, W = img.shape[:2]
    step = max(1, H // 128)  # a coarse look is enough to find the object, and cheap at 1024 px
    far = np.abs(img[::step, ::step] - bg).max(-1) > 0.1  # (h, w)
    h, w = far.shape
    inner = np.zeros_like(far)
    inner[int(0.15 * h):int(np.ceil(0.85 * h)), int(0.15 * w):int(np.ceil(0.85 * w))] = True
    ys, xs = np.nonzero(far & inner)
    if len(ys) == 0:
        return tuple(rng.uniform(0.2, 0.8, 2) * (H, W))
    i = rng.integers(len(ys))
    return float(ys[i] * step), float(xs[i] * step)


def _soft(region: np.ndarray, width: float) -> tuple[tuple[slice, slice], np.ndarray]:
    """A soft-edged version of `region`: its box grown by 3 * width and, on it, the region blurred
    by a Gaussian of sigma `width`, (h, w) float32 in [0, 1]. A real missing or extra piece
    has no cut-out's hard edge."""
    from scipy.ndimage import gaussian_filter
    box = _box(region, int(np.ceil(3 * width)) + 1)
    return box, gaussian_filter(region[box].astype(np.float32), width, mode="nearest")


def _blurred(img: np.ndarray, region: np.ndarray, sigma: float) -> tuple[tuple[slice, slice], np.ndarray]:
    """The region's box grown by 3 sigma and, on it, img blurred by a Gaussian of `sigma` px,
    (h, w, C): the box holds every pixel the blur of the region reads."""
    from scipy.ndimage import gaussian_filter
    box = _box(region, int(np.ceil(3 * sigma)) + 1)
    return box, gaussian_filter(img[box], (sigma, sigma, 0), mode="reflect")


def _rotated(img: np.ndarray, region: np.ndarray, angle: float) -> np.ndarray:
    """What the region's pixels show when img is turned by `angle` (radians) about the region's
    centre, (n, C) in the order of np.nonzero(region); bilinear, the border repeated outside.
    The centre is a whole pixel, so quarter turns move whole pixels (no blur)."""
    H, W = region.shape
    ys, xs = np.nonzero(region)
    cy, cx = round((ys.min() + ys.max()) / 2), round((xs.min() + xs.max()) / 2)
    dy, dx = ys - cy, xs - cx
    sy = np.clip(cy + np.cos(angle) * dy - np.sin(angle) * dx, 0, H - 1)  # (n,) where each pixel reads from
    sx = np.clip(cx + np.sin(angle) * dy + np.cos(angle) * dx, 0, W - 1)
    y0, x0 = np.floor(sy).astype(int), np.floor(sx).astype(int)
    y1, x1 = np.minimum(y0 + 1, H - 1), np.minimum(x0 + 1, W - 1)
    wy, wx = (sy - y0)[:, None], (sx - x0)[:, None]  # (n, 1)
    return ((1 - wy) * ((1 - wx) * img[y0, x0] + wx * img[y0, x1])
            + wy * ((1 - wx) * img[y1, x0] + wx * img[y1, x1])).astype(np.float32)


def _shifted_copy(img: np.ndarray, box: tuple[slice, slice], dy: int, dx: int) -> np.ndarray:
    """What the pixels of `box` show when img is moved by (dy, dx): img[y - dy, x - dx], (h, w, C),
    the border repeated where that falls outside."""
    H, W = img.shape[:2]
    ys = np.clip(np.arange(box[0].start, box[0].stop) - dy, 0, H - 1)
    xs = np.clip(np.arange(box[1].start, box[1].stop) - dx, 0, W - 1)
    return img[ys[:, None], xs[None, :]]


def _extra_part(img: np.ndarray, rng: np.random.Generator, subtle: bool,
                centre: tuple[float, float] | None) -> np.ndarray:
    """A piece of the object (or texture) copied, unflipped, 10-30% of the image size away
    (to `centre` if given), with a soft edge: material where there should be none."""
    H, W = img.shape[:2]
    src = np.array(_on_object(img, _background(img), rng))
    if centre is None:
        angle = rng.uniform(0, 2 * np.pi)
        step = rng.uniform(0.1, 0.3) * np.array([np.sin(angle) * H, np.cos(angle) * W])
        inside = np.abs(src + step - 0.5 * np.array([H, W])) <= 0.4 * np.array([H, W])
        centre = tuple(src + np.where(inside, step, -step))  # turned back from the border, same distance
    region = _region((H, W), rng, (6, 14) if subtle else (10, 22), centre)
    dy, dx = np.round(np.array(centre) - src).astype(int)
    box, alpha = _soft(region, max(H / 256, 0.5))
    alpha = (rng.uniform(0.6, 0.85) if subtle else 1.0) * alpha[..., None]  # (h, w, 1)
    out = img.copy()
    out[box] = (1 - alpha) * img[box] + alpha * _shifted_copy(img, box, dy, dx)
    return out


def _edit(kind: str, img: np.ndarray, rng: np.random.Generator, subtle: bool,
          centre: tuple[float, float] | None = None, source: np.ndarray | None = None) -> np.ndarray:
    """One synthetic defect of `kind` on img (H, W, C) float32 in [0, 1]; returns the edited copy.

    Predictable kinds (flat_fill, smooth_blob, thin_line, shifted_block) are easy for a
    predictor to continue from the context; unpredictable ones (colour_shift, foreign_patch)
    are not. The last four keep the image's own colours: rotated_block and smoothed_region
    keep a texture's local statistics (its orientation or its fine detail is what breaks),
    missing_part and extra_part remove or add a piece of the object. Sizes are in px of a
    256 px image, scaled with H. `subtle` draws a faint or small variant; `source` is the
    image a foreign patch comes from (default: another place in `img` itself).
    """
    shape, out = img.shape[:2], img.copy()
    s = shape[0] / 256
    u = rng.uniform
    if kind == "flat_fill":  # the region becomes (almost) the image's mean colour
        region = _region(shape, rng, (6, 14) if subtle else (10, 22), centre)
        a = u(0.5, 0.75) if subtle else 1.0
        out[region] = (1 - a) * img[region] + a * img.reshape(-1, img.shape[2]).mean(0)
    elif kind == "smooth_blob":  # a brighter or darker smooth blob
        box, bump = _bump(shape, rng, (8, 16) if subtle else (12, 26), centre)
        amp = u(0.08, 0.15) if subtle else u(0.25, 0.45)
        out[box] = img[box] + rng.choice([-1.0, 1.0]) * amp * bump[..., None]
    elif kind == "thin_line":  # a dark or bright crack, 1-3 px wide
        line = _polyline(shape, rng, u(1, 3) * max(s, 0.5), centre)
        a = u(0.3, 0.5) if subtle else u(0.8, 1.0)
        out[line] = (1 - a) * img[line] + a * (0.05 if rng.random() < 0.5 else 0.95)
    elif kind == "shifted_block":  # the region shows the image shifted by 8-24 px
        region = _region(shape, rng, (6, 14) if subtle else (10, 22), centre)
        step, angle = (u(8, 14) if subtle else u(14, 24)) * max(s, 0.5), rng.uniform(0, 2 * np.pi)
        dy, dx = int(round(step * np.sin(angle))), int(round(step * np.cos(angle)))
        ys, xs = np.nonzero(region)
        out[ys, xs] = img[(ys - dy) % shape[0], (xs - dx) % shape[1]]  # as np.roll, without a copy of img
    elif kind == "colour_shift":  # a stain: intensity or colour offset of a blotchy region
        region = _region(shape, rng, (6, 16) if subtle else (10, 24), centre)
        out[region] = img[region] + _colour_delta(img, rng, u(0.05, 0.1) if subtle else u(0.15, 0.3))
    elif kind == "foreign_patch":  # texture from elsewhere (or from another photograph)
        region = _region(shape, rng, (6, 14) if subtle else (10, 22), centre)
        src = _source_patch(img, region, rng) if source is None else source
        a = u(0.4, 0.6) if subtle else u(0.9, 1.0)
        out[region] = (1 - a) * img[region] + a * src[region]
    elif kind == "rotated_block":  # the region shows the image turned about the region's centre
        region = _region(shape, rng, (6, 14) if subtle else (10, 22), centre)
        if subtle:
            degrees = u(15, 45) * rng.choice([-1.0, 1.0])
        else:
            degrees = rng.choice([90.0, 180.0, 270.0]) if rng.random() < 0.5 else u(45, 315)
        out[region] = _rotated(img, region, np.deg2rad(degrees))
    elif kind == "smoothed_region":  # the texture's fine detail blurred away, its mean colour kept
        region = _region(shape, rng, (8, 16) if subtle else (12, 26), centre)
        box, blurred = _blurred(img, region, (u(1.5, 3) if subtle else u(3, 6)) * max(s, 0.5))
        out[box][region[box]] = blurred[region[box]]
    elif kind == "missing_part":  # a piece of the object shows the background (a hole in a texture)
        bg = _background(img)
        region = _region(shape, rng, (6, 14) if subtle else (10, 24),
                         centre if centre is not None else _on_object(img, bg, rng))
        box, alpha = _soft(region, max(s, 0.5))
        alpha = (u(0.6, 0.85) if subtle else 1.0) * alpha[..., None]  # (h, w, 1)
        out[box] = (1 - alpha) * img[box] + alpha * bg
    elif kind == "extra_part":  # a piece of the object copied where it does not belong
        out = _extra_part(img, rng, subtle, centre)
    else:
        raise ValueError(f"unknown synthetic anomaly kind {kind!r}; known: {SYNTHETIC_KINDS}")
    return np.clip(out, 0, 1).astype(np.float32)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    # float32 first: an unchanged pixel that went through float64 must round the same way
    x = np.clip(np.asarray(img, np.float32), 0, 1)
    x *= 255  # in place: at 1024 px each full-image temporary costs as much as the edit
    return np.rint(x, out=x).astype(np.uint8)


def _changed(draw: Callable[[], np.ndarray], clean: np.ndarray, what: str,
             tries: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """`_visible`'s (uint8 image, mask), or ValueError naming `what` when no draw shows."""
    found = _visible(draw, clean, tries)
    if found is None:
        raise ValueError(f"{what}: {tries} random draws changed no pixel visibly (is the image uniform?)")
    return found


def _visible(draw: Callable[[], np.ndarray], clean: np.ndarray, tries: int = 50,
             view: Callable[[np.ndarray], np.ndarray] = _to_uint8) -> tuple[np.ndarray, np.ndarray] | None:
    """Call `draw()` (a float image) until, as `view` shows it (uint8 (H, W, C); default the
    same image as uint8), it visibly differs from `clean` (uint8 (H, W, C)); return (uint8
    image, mask of exactly the changed pixels (H, W) bool), or None after `tries` draws.

    A draw that changes (almost) nothing is redrawn: a block shifted by one period of a
    texture, a flat fill of a flat region, a patch of noisy background pasted on background,
    a line drawn at 1024 px that fades away at 128. "Visibly": at least (H/64)^2 pixels
    changed, by 3 grey levels on average.
    """
    min_pixels = max(1, round((clean.shape[0] / 64) ** 2))
    for _ in range(tries):
        out = view(draw())
        diff = np.abs(out.astype(np.int16) - clean).max(-1)  # (H, W)
        mask = diff > 0
        if mask.sum() >= min_pixels and diff[mask].mean() >= 3:
            return out, mask
    return None


class _Canvas(NamedTuple):
    """One normal image to draw on: `img` (h, w, C) float32 in [0, 1], the resolution defects
    are drawn at; `clean` (H, W, C) uint8, the image as the validation set holds it; `view`,
    what a drawn `img` becomes there, (H, W, C) uint8."""
    img: np.ndarray
    clean: np.ndarray
    view: Callable[[np.ndarray], np.ndarray]


def _visible_defect(kind: str, kinds: Sequence[str], canvas: _Canvas, seed: int,
                    i: int) -> tuple[str, np.ndarray, np.ndarray]:
    """A visible synthetic defect for the slot (kind, image i) on `canvas`: (the kind drawn,
    uint8 image (H, W, C), changed-pixel mask (H, W)).

    Some kinds cannot show on some images: a flat fill of the mean colour on a weave so fine
    that it averages to that colour at this size. One such image must not abort a run, so the
    slot then takes the first other kind of `kinds`, in an order seeded by (seed, kind, i), that
    shows. ValueError only when none does.
    """
    img, clean, view = canvas
    rng = np.random.default_rng([seed, SYNTHETIC_KINDS.index(kind), i])
    found = _visible(lambda: _edit(kind, img, rng, subtle=rng.random() < 0.5), clean, view=view)
    if found is not None:
        return (kind, *found)
    rng = np.random.default_rng([seed, SYNTHETIC_KINDS.index(kind), i, 1])  # not the other slots' draws
    others = [k for k in kinds if k != kind]
    for other in [others[j] for j in rng.permutation(len(others))]:
        found = _visible(lambda: _edit(other, img, rng, subtle=rng.random() < 0.5), clean, view=view)
        if found is not None:
            return (other, *found)
    raise ValueError(f"{kind} on image {i}: 50 random draws changed no pixel visibly"
                     + (f", nor did those of {', '.join(others)}" if others else "") + " (is the image uniform?)")


def _check_kinds(kinds: Sequence[str]) -> None:
    unknown = [k for k in kinds if k not in SYNTHETIC_KINDS]
    if unknown:
        raise ValueError(f"unknown synthetic anomaly kinds {unknown}; known: {SYNTHETIC_KINDS}")


def _anomalies(canvases: Iterable[_Canvas], kinds: Sequence[str], seed: int, paths: Sequence[str] | None) -> ImageSet:
    """Every kind on every canvas (`_visible_defect`), as an ImageSet kind by kind. Canvases are
    taken one at a time, so a native image is in memory only while its defects are drawn."""
    drawn, n = {}, 0
    for canvas in canvases:
        for kind in kinds:
            drawn[kind, n] = _visible_defect(kind, kinds, canvas, seed, n)
        n += 1
    out, masks, used_kinds, names, substituted = [], [], [], [], {}
    for kind in kinds:
        for i in range(n):
            used, y, m = drawn[kind, i]
            name = f"{paths[i]}#{kind}" if paths is not None else f"{kind}/{i}"
            if used != kind:
                name = f"{name} drawn as {used}"
                substituted[name] = kind
            out.append(y)
            masks.append(m)
            used_kinds.append(used)
            names.append(name)
    M = len(out)
    return ImageSet(torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous(),  # (M, 3, H, W)
                    torch.from_numpy(np.stack(masks))[:, None],                      # (M, 1, H, W)
                    torch.ones(M, dtype=torch.long), used_kinds, names, substituted)


def synthetic_anomalies(images: torch.Tensor, seed: int = 0, kinds: Sequence[str] = SYNTHETIC_KINDS,
                        paths: Sequence[str] | None = None) -> ImageSet:
    """One synthetic anomaly of every kind on every image, with exact masks.

    Model selection (hyperparameters, the best epoch, image aggregation, calibration) needs
    anomalies, and test/ must stay unseen until the end; these are made from held-out normal
    images instead. The kinds include *predictable* defects (flat_fill, smooth_blob,
    thin_line, shifted_block), which the context predicts well: CPC-AD's loss measures
    unpredictability, not unusualness, and a choice made on these shows where it fails.
    The last four are the defects real test splits have and the first six (LEGACY_KINDS)
    lacked: texture that keeps its statistics but not its orientation (rotated_block) or its
    fine detail (smoothed_region), and a piece of the object missing (missing_part: the
    background colour, the median of the image's border, with a soft edge) or extra
    (extra_part: an unflipped copy of another piece, 10-30% of the image size away).
    About half of the draws are subtle (faint or small), half obvious. A kind that cannot be
    made visible on an image (a flat fill on a fine weave) is replaced there by another kind
    of `kinds` that can (`_visible_defect`), and recorded. Defects are drawn at the images'
    size here; `make_validation_set(native=True)` draws them on the image files instead.

    Args:
        images: (N, 3, H, W) uint8, e.g. `ImageSet.images` of the validation split; grayscale
            images (three equal channels) stay grayscale.
        seed: the draws for image i and kind k depend only on (seed, k, i) (a replacement's
            also on `kinds`), so the LEGACY_KINDS draws are those of the earlier design.
        kinds: names from SYNTHETIC_KINDS.
        paths: names of the N source images; anomaly paths become f"{path}#{kind}"
            (default f"{kind}/{i}"), a replacement's f"{path}#{kind} drawn as {other}".
    Returns:
        ImageSet of N * len(kinds) anomalies, kind by kind: labels 1, defect_types the kind
        drawn, masks (M, 1, H, W) exactly the changed pixels (never empty), `substituted`
        the replacements (path -> the kind they replace).
    """
    _check_kinds(kinds)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    if paths is not None and len(paths) != len(images):
        raise ValueError(f"{len(paths)} paths for {len(images)} images")
    clean = images.permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    return _anomalies((_Canvas(x.astype(np.float32) / 255, x, _to_uint8) for x in clean), kinds, seed, paths)


def _working(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 (h, w, 3) resized as `load_category` resizes an image file, (size, size, 3)."""
    from PIL import Image
    return _resized_tensor(Image.fromarray(img), size).permute(1, 2, 0).numpy()


def _native_canvas(path: str, image: torch.Tensor) -> _Canvas:
    """The canvas of a validation image (3, S, S) uint8 at its file's own resolution (the long
    side at most NATIVE_MAX_SIDE px), its view the drawn image resized to S as it was loaded.

    ValueError naming the file when it cannot be read, or when, resized, it is not `image`
    (changed on disk since it was loaded, or loaded otherwise): the masks would be wrong.
    Above NATIVE_MAX_SIDE the canvas is a downscaled copy, whose resize differs from `image`
    by rounding; there the view keeps `image`'s pixels wherever the defect changed nothing.
    """
    from PIL import Image
    size = image.shape[-1]
    if image.shape[-2] != size:
        raise ValueError(f"native drawing needs square images (as load_category makes), got {tuple(image.shape)}")
    try:
        im = _open_rgb(path)
    except Exception as e:  # PIL raises many types; the user needs the file name
        raise ValueError(f"cannot read validation image {path} to draw on: {e}") from e
    if not torch.equal(_resized_tensor(im, size), image):
        raise ValueError(f"validation image {path}, resized to {size} px, is not the image loaded from it: "
                         "has the file changed since it was loaded?")
    clean = image.permute(1, 2, 0).numpy()  # (S, S, 3)
    if max(im.size) <= NATIVE_MAX_SIDE:
        return _Canvas(np.asarray(im, np.float32) / 255, clean, lambda drawn: _working(_to_uint8(drawn), size))
    f = NATIVE_MAX_SIDE / max(im.size)
    im = im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.BILINEAR)
    reference = _working(np.asarray(im), size)  # (S, S, 3): the unedited canvas at S

    def view(drawn: np.ndarray) -> np.ndarray:
        out = _working(_to_uint8(drawn), size)
        return np.where((out != reference).any(-1, keepdims=True), out, clean)
    return _Canvas(np.asarray(im, np.float32) / 255, clean, view)


def make_validation_set(val: ImageSet, seed: int = 0, kinds: Sequence[str] = SYNTHETIC_KINDS,
                        native: bool = False) -> ImageSet:
    """The validation normals (label 0) followed by their synthetic anomalies (label 1).

    This is the set on which the detector's choices are made and estimated without touching
    test/: hyperparameters, the best epoch, image aggregation and the decision threshold.
    Every anomaly's path is its source image's path plus "#<kind>"; `substituted` lists the
    anomalies drawn as another kind, theirs could not be made visible on that image.

    Args:
        val: normal images only (labels 0), e.g. the validation normals of `split_held_out`.
        seed, kinds: as in `synthetic_anomalies`; `kinds=LEGACY_KINDS` is the earlier design.
        native: draw each defect on the image file `val.paths[i]` at its own resolution (the
            long side capped at NATIVE_MAX_SIDE px) and resize the result as the image was
            loaded. A real 1-px scratch on a 1024 px photo is a faint blur at 128 px; drawn at
            128 px it would be a hard full-contrast line that flatters every detector of thin
            lines. Radii and line widths scale with the native size; the mask is the pixels
            that differ from `val.images[i]` after the resize, and a defect that fades away
            there is redrawn or replaced as usual. ValueError naming the file if one cannot be
            read or no longer resizes to its `val` image.
    """
    if val.labels.any():
        raise ValueError("make_validation_set expects normal images only (train/good), "
                         f"got {int(val.labels.sum())} anomalous")
    if not native:
        return concat_sets([val, synthetic_anomalies(val.images, seed, kinds, paths=val.paths)])
    _check_kinds(kinds)
    canvases = (_native_canvas(path, image) for path, image in zip(val.paths, val.images))
    return concat_sets([val, _anomalies(canvases, kinds, seed, val.paths)])
