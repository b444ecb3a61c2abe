"""Patch grids: an image (or each sub-image) cut into overlapping patches, and patch values
spread back onto pixels (CPC v2, Henaff et al. 2019, arXiv:1905.09272: 64 px patches at stride
32 on 256 px give 7x7; CPC-AD cuts larger images into overlapping 256 px sub-images first)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checks import check_param


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
