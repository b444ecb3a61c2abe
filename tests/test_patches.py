"""Patches section: grid geometry, cutting images into (sub-images of) patches, and
spreading per-patch values back onto pixels."""
from __future__ import annotations

import pytest
import torch

import cpc_utils as cu


def brute_force_pixels(values: torch.Tensor, grid: cu.PatchGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """Average of every patch value covering each pixel, by looping: (B, n_sub, G, G) ->
    (B, 1, H, W) map and the (H, W) count of covering patches."""
    B = values.shape[0]
    S, G, P, st = grid.num_subimages, grid.grid, grid.patch_size, grid.stride
    sst = grid.subimage_stride or grid.subimage_size or 0
    total = torch.zeros(B, 1, grid.image_size, grid.image_size, dtype=torch.float64)
    count = torch.zeros(grid.image_size, grid.image_size, dtype=torch.float64)
    for si in range(S):
        for sj in range(S):
            for i in range(G):
                for j in range(G):
                    y, x = si * sst + i * st, sj * sst + j * st
                    total[:, 0, y:y + P, x:x + P] += values[:, si * S + sj, i, j, None, None].double()
                    count[y:y + P, x:x + P] += 1
    return total / count, count


# ---- geometry ------------------------------------------------------------------------

def test_cpc_v2_grid():
    g = cu.PatchGrid()
    assert (g.grid, g.num_subimages, g.overlap_steps) == (7, 1, 1)


def test_cpc_ad_paper_layout():
    g = cu.PatchGrid(768, 64, 32, 256, 128)
    assert g.grid == 7 and g.num_subimages == 5
    p = cu.extract_patches(torch.zeros(1, 3, 768, 768), g)
    assert p.shape == (25, 7, 7, 3, 64, 64)
    assert g.num_subimages ** 2 * g.grid ** 2 == 1225


@pytest.mark.parametrize("patch, stride, overlap", [(64, 32, 1), (16, 8, 1), (16, 16, 0), (24, 8, 2), (16, 12, 1)])
def test_overlap_steps(patch, stride, overlap):
    size = patch + 2 * stride
    assert cu.PatchGrid(size, patch, stride).overlap_steps == overlap


@pytest.mark.parametrize("kw", [
    dict(image_size=32, patch_size=16, stride=5),                          # patches do not tile
    dict(image_size=16, patch_size=32, stride=8),                          # patch larger than image
    dict(image_size=40, patch_size=16, stride=24),                         # gaps between patches
    dict(image_size=32, patch_size=16, stride=0),
    dict(image_size=96, patch_size=16, stride=8, subimage_size=64, subimage_stride=48),  # sub-images do not tile
    dict(image_size=64, patch_size=16, stride=8, subimage_size=96, subimage_stride=32),  # sub-image larger than image
    dict(image_size=160, patch_size=16, stride=8, subimage_size=64, subimage_stride=96),  # gaps between sub-images
    dict(image_size=96, patch_size=16, stride=8, subimage_size=12, subimage_stride=12),  # patch larger than sub-image
])
def test_invalid_geometry_raises(kw):
    with pytest.raises(ValueError):
        cu.PatchGrid(**kw)


# ---- cutting -------------------------------------------------------------------------

def test_extract_patches_matches_slicing():
    grid = cu.PatchGrid(32, 16, 8)
    x = torch.randn(2, 3, 32, 32)
    p = cu.extract_patches(x, grid)
    assert p.shape == (2, 3, 3, 3, 16, 16)
    for b in range(2):
        for i in range(3):
            for j in range(3):
                assert torch.equal(p[b, i, j], x[b, :, i * 8:i * 8 + 16, j * 8:j * 8 + 16])


def test_extract_patches_with_subimages_matches_slicing():
    grid = cu.PatchGrid(48, 16, 8, subimage_size=32, subimage_stride=16)  # 2x2 sub-images of 3x3 patches
    x = torch.randn(2, 3, 48, 48)
    p = cu.extract_patches(x, grid)
    assert p.shape == (2 * 4, 3, 3, 3, 16, 16)
    for b in range(2):
        for si in range(2):
            for sj in range(2):
                for i in range(3):
                    for j in range(3):
                        y, xx = si * 16 + i * 8, sj * 16 + j * 8
                        assert torch.equal(p[b * 4 + si * 2 + sj, i, j], x[b, :, y:y + 16, xx:xx + 16])


def test_to_subimages():
    x = torch.randn(2, 3, 48, 48)
    assert cu.to_subimages(x, cu.PatchGrid(48, 16, 8)) is x
    s = cu.to_subimages(x, cu.PatchGrid(48, 16, 8, 32, 16))
    assert s.shape == (8, 3, 32, 32)
    assert torch.equal(s[1 * 4 + 1 * 2 + 0], x[1, :, 16:48, 0:32])


def test_to_float_range_and_layout():
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4).contiguous()
    f = cu.to_float(x)
    assert f.dtype == torch.float32 and f.is_contiguous(memory_format=torch.channels_last)
    assert f[0, :, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 51 / 127.5 - 1])


# ---- back to pixels ------------------------------------------------------------------

@pytest.mark.parametrize("grid", [cu.PatchGrid(32, 16, 8), cu.PatchGrid(64, 16, 16),
                                  cu.PatchGrid(96, 16, 8, subimage_size=64, subimage_stride=32)])
def test_patches_to_pixels_constant(grid):
    v = torch.full((2, grid.num_subimages ** 2, grid.grid, grid.grid), 3.25)
    out = cu.patches_to_pixels(v, grid)
    assert out.shape == (2, 1, grid.image_size, grid.image_size)
    assert torch.allclose(out, torch.full_like(out, 3.25))


def test_single_patch_spreads_with_averaging_weights():
    grid = cu.PatchGrid(32, 16, 8)  # 3x3 patches; pixel rows 0-7 see 1 patch row, 8-23 two, 24-31 one
    v = torch.zeros(1, 1, 3, 3)
    v[0, 0, 0, 0] = 8.0
    out = cu.patches_to_pixels(v, grid)[0, 0]
    assert out[3, 3] == 8.0          # covered by patch (0, 0) only
    assert out[3, 12] == 4.0         # by (0, 0) and (0, 1)
    assert out[12, 12] == 2.0        # by (0, 0), (0, 1), (1, 0), (1, 1)
    assert out[16:, :].abs().sum() == 0 and out[:, 16:].abs().sum() == 0  # outside the patch
    expected = torch.zeros(32, 32)
    expected[:16, :16] = 8.0 / torch.tensor([1.0, 2.0, 2.0, 4.0]).view(2, 2).repeat_interleave(8, 0).repeat_interleave(8, 1)
    assert torch.equal(out, expected)


def test_patches_to_pixels_matches_brute_force_without_subimages():
    grid = cu.PatchGrid(32, 16, 8)
    v = torch.randn(2, 1, 3, 3)
    expected, count = brute_force_pixels(v, grid)
    assert (count > 0).all()
    assert torch.allclose(cu.patches_to_pixels(v, grid).double(), expected, atol=1e-6)


@pytest.mark.parametrize("grid", [cu.PatchGrid(96, 16, 8, subimage_size=64, subimage_stride=32),
                                  cu.PatchGrid(48, 16, 8, subimage_size=32, subimage_stride=16),
                                  cu.PatchGrid(64, 16, 8, subimage_size=32, subimage_stride=32)])
def test_subimage_layout_covers_every_pixel_and_matches_brute_force(grid):
    v = torch.randn(2, grid.num_subimages ** 2, grid.grid, grid.grid)
    expected, count = brute_force_pixels(v, grid)
    assert (count > 0).all()
    out = cu.patches_to_pixels(v, grid)
    assert out.shape == (2, 1, grid.image_size, grid.image_size) and torch.isfinite(out).all()
    assert torch.allclose(out.double(), expected, atol=1e-6)

