"""Training-only defects (`cpc_ad/corruption.py`) and the anomaly-aware negatives they give
CPC-AD's training (`CPCADConfig.defect_negatives`)."""
import pytest
import torch

import cpc_utils as cu
from cpc_ad.corruption import AREA, CHANGED, CORRUPTION_KINDS, _fill, changed_patches, corrupt, noise_masks

GRID = cu.PatchGrid(64, 16, 8)


def _images(B=6, H=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, H, H, generator=g) * 2 - 1


def test_masks_cover_the_drawn_area_as_one_region_mostly():
    m = noise_masks(16, 64, torch.Generator().manual_seed(0), torch.device("cpu"))
    area = m.mean((1, 2, 3))
    assert m.shape == (16, 1, 64, 64) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert (area >= AREA[0] - 1 / 64 ** 2).all() and (area <= AREA[1] + 1 / 64 ** 2).all(), area


def test_corrupt_changes_only_the_mask_and_repeats_with_the_seed():
    x = _images()
    bad, mask = corrupt(x, torch.Generator().manual_seed(3))
    again, _ = corrupt(x, torch.Generator().manual_seed(3))
    assert torch.equal(bad, again)
    assert torch.equal(bad * (1 - mask), x * (1 - mask))          # outside the mask: the image itself
    assert ((bad - x).abs() * mask).sum() > 0.1 * mask.sum()       # inside: mostly changed


@pytest.mark.parametrize("kind", CORRUPTION_KINDS)
def test_every_kind_fills_with_other_content_of_the_same_size(kind):
    x = _images()
    fill = _fill(kind, x, torch.Generator().manual_seed(0))
    assert fill.shape == x.shape
    assert (fill - x).abs().mean() > 0.1, kind
    with pytest.raises(ValueError, match="unknown corruption"):
        _fill("blur", x, None)


def test_tile_shuffle_keeps_the_pixels_and_only_moves_them():
    x = _images(B=2)
    fill = _fill("tile_shuffle", x, torch.Generator().manual_seed(0))
    assert torch.allclose(fill.flatten(1).sort(1).values, x.flatten(1).sort(1).values)


def test_changed_patches_are_those_the_defect_moved():
    x = _images(B=2)
    assert not changed_patches(x, x.clone(), GRID).any()            # background on background: no negative
    bad = x.clone()
    bad[1, :, 40:56, 40:56] += 1.0                                  # one patch of image 1, at grid (5, 5)
    hit = changed_patches(x, bad, GRID).view(2, GRID.grid, GRID.grid)
    assert not hit[0].any() and hit[1, 5, 5]
    assert hit[1].sum() <= 9 and CHANGED < 1.0                      # only the overlapping neighbours too


def test_corrupt_refuses_non_square_images():
    with pytest.raises(ValueError, match="square"):
        corrupt(torch.zeros(1, 3, 32, 48))


def test_info_nce_hard_negative_counts_only_where_valid():
    g = torch.Generator().manual_seed(0)
    pred, pos, cand = (torch.randn(n, 8, generator=g) for n in (5, 5, 20))
    plain, _ = cu.info_nce(pred, pos, cand, None)
    off, _ = cu.info_nce(pred, pos, cand, None, hard=torch.randn(5, 8), hard_valid=torch.zeros(5, dtype=torch.bool))
    assert torch.allclose(plain, off)
    same, _ = cu.info_nce(pred, pos, cand, None, hard=pos, hard_valid=torch.ones(5, dtype=torch.bool))
    assert (same > plain).all()                                     # a copy of the positive splits its mass
    assert torch.allclose(same, plain + torch.log1p(torch.exp(-plain)), atol=1e-5)  # -log(p / (1 + p))
    exposed, _ = cu.info_nce(pred, pos, cand, None, hard=pos, hard_valid=torch.ones(5, dtype=torch.bool), outlier=True)
    p_def = torch.softmax(torch.cat([(pred * pos).sum(1, keepdim=True), pred @ cand.T], 1), 1)[:, 0]
    assert torch.allclose(exposed, same - torch.log1p(-p_def), atol=1e-5)  # + -log(1 - p) among the negatives
    none, _ = cu.info_nce(pred, pos, cand, None, hard=pos, hard_valid=torch.zeros(5, dtype=torch.bool), outlier=True)
    assert torch.allclose(none, plain)


@pytest.mark.parametrize("mode", ["negative", "outlier"])
def test_defect_negatives_add_a_negative_in_training_only(mode):
    torch.manual_seed(0)
    cfg = cu.CPCADConfig(width=8, num_negatives=15, defect_negatives=mode)
    model = cu.CPCAD(cfg, GRID)
    x = _images(B=4)
    defects, hit = model.defective_targets(x, torch.Generator().manual_seed(0))
    assert len(defects) == 1 and defects[0].shape == (4 * GRID.grid ** 2, model.encoders[0].out_dim)
    assert hit.any() and (defects[0][~hit] == 0).all() and (defects[0][hit].abs().sum(1) > 0).all()
    model.eval()  # the validation loss is plain InfoNCE whatever the lever: comparable across settings
    evaluated = model.loss(x, torch.Generator().manual_seed(1))["loss"]
    plain = cu.CPCAD(cu.CPCADConfig(width=8, num_negatives=15), GRID)
    plain.load_state_dict(model.state_dict())
    plain.eval()
    assert torch.equal(evaluated, plain.loss(x, torch.Generator().manual_seed(1))["loss"])
    model.train()
    loss = model.loss(x, torch.Generator().manual_seed(1))["loss"]
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


def test_defect_negatives_with_four_independent_encoders_and_subimages():
    grid = cu.PatchGrid(64, 16, 8, subimage_size=48, subimage_stride=16)
    cfg = cu.cpcad_config("paper", grid, width=8, num_negatives=15, defect_negatives="outlier")
    model = cu.CPCAD(cfg, grid).train()
    x = _images(B=2)
    defects, hit = model.defective_targets(x, torch.Generator().manual_seed(0))
    assert len(defects) == 4 and len(hit) == 2 * grid.num_subimages ** 2 * grid.grid ** 2
    assert torch.isfinite(model.loss(x, torch.Generator().manual_seed(0))["loss"])


def test_the_lever_is_a_notebook_parameter():
    assert "defect_negatives" in cu.RunParameters.__dataclass_fields__
    for bad in ("yes", True):
        with pytest.raises(cu.ParameterError, match="defect_negatives"):
            cu.CPCADConfig(defect_negatives=bad)
