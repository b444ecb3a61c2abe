"""What CPC learned (notebook 01): patch features, defect fractions, the linear and kNN
probes against features whose answer is known, the three-representation report, its tables
and figures."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import cpc_utils as cu

GRID = cu.PatchGrid(32, 16, 8)  # 3x3 patches


def test_patch_defect_fraction_counts_mask_pixels_per_patch():
    masks = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
    masks[1, :, :8, :8] = True                      # the top-left 8x8: a quarter of patch (0, 0)
    f = cu.patch_defect_fraction(masks, GRID)
    assert f.shape == (2, 9)
    assert f[0].eq(0).all()
    assert f[1].tolist() == pytest.approx([0.25] + [0.0] * 8)


def test_pixel_patch_features_pool_each_patch():
    x = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    x[0, 0, 16:, 16:] = 255                         # red bottom-right quarter
    f = cu.pixel_patch_features(x, GRID, size=1)    # mean colour per patch, in to_float's [-1, 1]
    assert f.shape == (1, 9, 3)
    red = f[0, :, 0].view(3, 3)
    assert red[2, 2] == pytest.approx(1.0) and red[0, 0] == -1 and red[1, 1] == pytest.approx(-0.5)
    assert cu.pixel_patch_features(x, GRID).shape == (1, 9, 48)


def test_patch_embeddings_read_z_or_the_stage_statistics():
    """"z" is the encoder's output per grid patch; "stats" the same pass's stage statistics,
    the descriptor the knn_stats detector compares; anything else is refused by name."""
    encoder = cu.build_encoder("resnet18v2", width=8).eval()
    x = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    z = cu.patch_embeddings(encoder, x, GRID)
    stats = cu.patch_embeddings(encoder, x, GRID, descriptor="stats")
    assert z.shape == (2, 9, encoder.out_dim) and stats.shape[:2] == (2, 9) and stats.shape[2] > encoder.out_dim
    patch = cu.to_float(x[1:, :, 8:24, 8:24])       # grid patch (1, 1) of the second image
    with torch.no_grad():
        z_ref, _, stats_ref = encoder.multiscale(patch)
    assert torch.allclose(z[1, 4], z_ref[0], atol=1e-5) and torch.allclose(stats[1, 4], stats_ref[0], atol=1e-5)
    with pytest.raises(ValueError, match="descriptor"):
        cu.patch_embeddings(encoder, x, GRID, descriptor="pixels")


def test_probe_verdict_against_random_or_pixels():
    runs = [{"trained": {"knn_auroc": 0.9}, "random": {"knn_auroc": 0.85}, "pixel": {"knn_auroc": a}}
            for a in (0.88, 0.91)]
    assert cu.probe_verdict(runs)[0]                                  # +0.05 in both seeds
    beats, gains = cu.probe_verdict(runs, margin=0.0, against="pixel")
    assert not beats and gains == pytest.approx([0.02, -0.01])        # not in every seed


def _features(fraction: torch.Tensor, informative: bool, seed: int) -> torch.Tensor:
    """(N, n, 8) noise; with `informative`, feature 0 is the defect fraction plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(*fraction.shape, 8, generator=g)
    if informative:
        f[..., 0] = 5 * fraction + 0.1 * f[..., 0]
    return f


def _fractions(n_images: int, seed: int) -> torch.Tensor:
    """Half the images have defects covering some patches (fraction 0.5), the rest are normal."""
    g = torch.Generator().manual_seed(seed)
    f = (torch.rand(n_images, 9, generator=g) < 0.3).float() * 0.5
    f[: n_images // 2] = 0
    return f


@pytest.mark.parametrize("informative", [True, False])
def test_patch_probes_find_what_the_features_hold(informative):
    fit_f, test_f = _fractions(40, 0), _fractions(40, 1)
    normal = _features(torch.zeros(40, 9), informative, 2)
    res = cu.patch_probes((_features(fit_f, informative, 3), fit_f), (_features(test_f, informative, 4), test_f),
                          normal)
    assert set(res) == {"linear_auroc", "knn_auroc", "knn_image_auroc"}
    if informative:  # the defect is one linear direction, and far from every normal patch
        assert res["linear_auroc"] > 0.95 and res["knn_auroc"] > 0.9 and res["knn_image_auroc"] > 0.9
    else:            # pure noise: chance
        assert all(abs(v - 0.5) < 0.15 for v in res.values()), res


def test_patch_probes_leave_out_patches_barely_touched():
    """A patch with 5% defect pixels is neither normal nor a defect: left out, not mislabelled."""
    fit_f, test_f = _fractions(40, 0), _fractions(40, 1)
    test_f[0, 0] = 0.05
    features = _features(test_f, True, 4)
    features[0, 0, 0] = 100.0                      # it would be the most anomalous patch of all
    base = cu.patch_probes((_features(fit_f, True, 3), fit_f), (_features(test_f, True, 4), test_f),
                           _features(torch.zeros(40, 9), True, 2))
    res = cu.patch_probes((_features(fit_f, True, 3), fit_f), (features, test_f), _features(torch.zeros(40, 9), True, 2))
    assert res["linear_auroc"] == pytest.approx(base["linear_auroc"])


def test_patch_probes_need_both_kinds_of_patch():
    f = torch.zeros(4, 9)
    with pytest.raises(ValueError, match="fit patches need both"):
        cu.patch_probes((torch.randn(4, 9, 8), f), (torch.randn(4, 9, 8), _fractions(4, 0)), torch.randn(4, 9, 8))


def _image_set(n: int, defective: bool, seed: int) -> cu.ImageSet:
    """n random 32 px images; when defective, each with a 12x12 defect square at a seeded place."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, 1, 32, 32, dtype=torch.bool)
    if defective:
        for m, (r, c) in zip(masks, torch.randint(0, 20, (n, 2), generator=g).tolist()):
            m[:, r:r + 12, c:c + 12] = True
    return cu.ImageSet((torch.rand(n, 3, 32, 32, generator=g) * 255).to(torch.uint8), masks,
                       torch.full((n,), int(defective)), ["square" if defective else "good"] * n, [""] * n)


def test_probe_representations_rows_and_random_reference():
    """Five rows; an encoder identical to its random init gets the same numbers as it, read either way."""
    train = _image_set(6, False, 0)
    fit, test = (cu.concat_sets([_image_set(4, False, s), _image_set(4, True, s + 1)]) for s in (1, 3))
    encoder = cu.build_encoder("resnet18v2", width=8)
    res = cu.probe_representations(encoder, encoder, train, fit, test, GRID)
    assert set(res) == set(cu.PROBE_FEATURES)
    assert res["trained"] == res["random"] and res["trained_z"] == res["random_z"]
    assert res["trained"] != res["trained_z"]  # two descriptors of one encoder: not the same features
    assert all(0 <= v <= 1 for row in res.values() for v in row.values())


def test_tables_show_mean_and_std_over_seeds():
    runs = [{f: {m: 0.5 + 0.1 * i for m in cu.PROBE_METRICS} for f in cu.PROBE_FEATURES} for i in range(3)]
    table = cu.probe_table(runs)
    assert table.count("\n") == len(cu.PROBE_FEATURES) + 1 and "0.600 ± 0.100" in table and "raw pixels" in table
    pm = {"loss_per_step": [1.0, 2.0], "acc_per_step": [0.5, 0.25], "chance_loss": math.log(49),
          "chance_accuracy": 1 / 49}
    table = cu.prediction_table([{"batch": pm, "image": pm}] * 2)
    assert table.splitlines()[2] == "| 1 | 1.000 ± 0.000 | 0.500 ± 0.000 | 1.000 ± 0.000 | 0.500 ± 0.000 |"
    assert table.splitlines()[-1].startswith("| chance | 3.892 | 0.020")


def test_probe_and_prediction_figures():
    runs = [{f: {m: 0.5 + 0.1 * i for m in cu.PROBE_METRICS} for f in cu.PROBE_FEATURES} for i in range(2)]
    fig = cu.plot_probes(runs)
    bars = [p.get_height() for p in fig.axes[0].patches]
    assert len(bars) == len(cu.PROBE_METRICS) * len(cu.PROBE_FEATURES) and bars[0] == pytest.approx(0.55)
    pm = {"loss_per_step": [1.0, 2.0], "acc_per_step": [0.5, 0.25], "chance_loss": 3.0, "chance_accuracy": 0.02}
    fig = cu.plot_prediction_accuracy([{"batch": pm, "image": pm}] * 3)
    assert np.allclose(fig.axes[0].lines[0].get_ydata(), [0.5, 0.25])
