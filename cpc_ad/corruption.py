"""Training-only synthetic defects: the hard negatives of anomaly-aware CPC-AD training.

CPC-AD scores a patch by how badly the clean context predicts it among normal patches, but
plain InfoNCE never shows the predictor a defective continuation, so nothing teaches it to
rank one below the true patch (FINDINGS.md: cracks and flat fills were *easier* to predict
than the texture). With `CPCADConfig.defect_negatives`, each prediction whose target patch a
defect from here covers gets that defective target as one more negative (`CPCAD.loss`).

The kinds are disjoint from the validation set's (`synthetic.SYNTHETIC_KINDS`) and from the
demo's test edits (`demo.DEMO_EDITS`), so validation still measures defects the model never
trained against. Each fills a Perlin-like mask (smooth noise thresholded, centred on a random
point), not the rectangles and discs of `synthetic`:
- "noise_paste": another image's content from another place (DRAEM-style, from the batch);
- "tile_shuffle": the image's own small tiles permuted (local statistics kept, structure lost);
- "rescaled": the image itself zoomed in or out about the mask's centre.
Everything is batched torch on the images' device, drawn from one host generator.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .patches import PatchGrid, extract_patches

CORRUPTION_KINDS = ("noise_paste", "tile_shuffle", "rescaled")
AREA = (0.02, 0.12)          # fraction of the image a mask covers, drawn uniformly per image
CHANGED = 0.05               # a defective target: its pixels moved by this much on average (images in [-1, 1])


def _uniform(size: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(size, generator=generator).to(device)


def noise_masks(B: int, H: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """(B, 1, H, H) float {0, 1}: smooth three-octave noise under a Gaussian bump at a random centre,
    thresholded at the quantile that leaves a random area in `AREA` (irregular, mostly one blob)."""
    noise = sum(F.interpolate(_uniform((B, 1, r, r), generator, device), size=(H, H), mode="bicubic",
                              align_corners=False) * w for r, w in ((4, 1.0), (8, 0.6), (16, 0.4)))  # (B, 1, H, H)
    centre = _uniform((B, 2, 1, 1), generator, device) * 0.8 + 0.1
    axis = (torch.arange(H, device=device) + 0.5) / H
    d2 = (axis.view(1, 1, H, 1) - centre[:, :1]) ** 2 + (axis.view(1, 1, 1, H) - centre[:, 1:]) ** 2
    field = noise * torch.exp(-d2 / (2 * 0.15 ** 2))
    area = _uniform((B,), generator, device) * (AREA[1] - AREA[0]) + AREA[0]
    top = field.flatten(1).sort(dim=1, descending=True).values                                # (B, H*H)
    cut = top.gather(1, (area * H * H).long().clamp(min=1)[:, None] - 1)                      # (B, 1)
    return (field >= cut.view(B, 1, 1, 1)).float()


def _sample_grid(B: int, H: int, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """affine_grid for x -> scale * x + shift per image (normalised coordinates): (B, H, H, 2)."""
    theta = torch.zeros(B, 2, 3, device=scale.device)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    return F.affine_grid(theta, (B, 1, H, H), align_corners=False)


def _fill(kind: str, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """What a mask of `kind` shows: (B, C, H, W) images of the same size as x."""
    B, C, H, W = x.shape
    dev = x.device
    if kind == "noise_paste":  # another image of the batch, shifted by a random offset
        other = (torch.arange(B, device=dev) + 1) % B if B > 1 else torch.zeros(1, dtype=torch.long, device=dev)
        dy, dx = (int(v) for v in torch.randint(H // 4, 3 * H // 4, (2,), generator=generator))
        return x[other].roll((dy, dx), dims=(2, 3))
    if kind == "tile_shuffle":  # tiles of H/16 px, permuted within each image
        t = max(H // 16, 2)
        n = H // t
        tiles = x[:, :, :n * t, :n * t].unfold(2, t, t).unfold(3, t, t).reshape(B, C, n * n, t, t)
        perm = torch.argsort(torch.rand(B, n * n, generator=generator), dim=1).to(dev)
        tiles = tiles.gather(2, perm.view(B, 1, n * n, 1, 1).expand(B, C, n * n, t, t))
        out = x.clone()
        out[:, :, :n * t, :n * t] = tiles.view(B, C, n, n, t, t).permute(0, 1, 2, 4, 3, 5).reshape(B, C, n * t, n * t)
        return out
    if kind == "rescaled":  # zoomed in (x0.5) or out (x2) about a random point
        scale = torch.where(torch.rand(B, generator=generator) < 0.5, 0.5, 2.0).to(dev)
        shift = (torch.rand(B, 2, generator=generator).to(dev) * 2 - 1) * 0.5
        return F.grid_sample(x, _sample_grid(B, H, scale, shift), mode="bilinear", padding_mode="reflection",
                             align_corners=False)
    raise ValueError(f"unknown corruption kind {kind!r}; known: {CORRUPTION_KINDS}")


def corrupt(x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One training-only defect on every image of a batch, its kind drawn per image.

    Args:
        x: (B, C, H, W) float images (square).
    Returns:
        the defective copy (B, C, H, W) and its mask (B, 1, H, W) in {0, 1}.
    """
    B, _, H, W = x.shape
    if H != W:
        raise ValueError(f"corrupt needs square images, got {H}x{W}")
    mask = noise_masks(B, H, generator, x.device)
    kind = torch.randint(0, len(CORRUPTION_KINDS), (B,), generator=generator).to(x.device)
    fill = x.clone()
    for k, name in enumerate(CORRUPTION_KINDS):
        pick = kind == k
        if pick.any():
            fill[pick] = _fill(name, x[pick], generator).to(x.dtype)
    return x + mask.to(x.dtype) * (fill - x), mask


def changed_patches(x: torch.Tensor, bad: torch.Tensor, grid: PatchGrid, changed: float = CHANGED) -> torch.Tensor:
    """Which grid patches the defect changed by at least `changed` mean absolute difference:
    (B * n_sub * G * G,) bool, in `encode_grid`'s order (b' * G * G + i * G + j). A masked patch
    that looks the same (background pasted on background) is no negative: it is the positive."""
    p = extract_patches((bad - x).abs().float().mean(1, keepdim=True), grid)   # (B', G, G, 1, P, P)
    return p.mean((-3, -2, -1)).reshape(-1) >= changed
