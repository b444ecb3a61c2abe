"""Scoring and metrics section: image scores, AUROC / F1-max against sklearn and brute force,
AUPRO on cases whose curve is known by hand, per-defect AUROC and the pixel baseline."""
from __future__ import annotations

import dataclasses
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

import cpc_utils as cu
import cpc_ad.scoring
from conftest import random_images


# ---- image scores --------------------------------------------------------------------

def test_image_scores():
    maps = torch.arange(2 * 4 * 3 * 3, dtype=torch.float32).view(2, 4, 3, 3)
    assert cu.image_scores(maps, "mean").tolist() == [17.5, 53.5]
    assert cu.image_scores(maps, "max").tolist() == [35.0, 71.0]
    assert cu.image_scores(maps, "top10").tolist() == [34.0, 70.0]  # top 3 of 36 patches: 35, 34, 33
    one = torch.tensor([[[[0.0, 1.0], [2.0, 9.0]]]])                    # 4 patches: top10 is the max
    assert cu.image_scores(one, "top10").tolist() == [9.0]
    with pytest.raises(ValueError, match="top10"):
        cu.image_scores(maps, "median")


# ---- calibration and detectors -------------------------------------------------------

def test_score_calibration_standardises_per_position():
    g = torch.Generator().manual_seed(0)
    offset = torch.arange(9.0).view(1, 1, 3, 3)                     # a fixed per-position bias
    normals = offset + 0.5 * torch.randn(50, 1, 3, 3, generator=g)
    cal = cu.ScoreCalibration.fit({"loss": normals})
    assert torch.allclose(cal.mean["loss"], offset[0], atol=0.25)
    assert abs(cal.std["loss"] - 0.5) < 0.1
    z = cal({"loss": offset.expand(2, 1, 3, 3) + torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)})["loss"]
    assert z[0].abs().max() < 0.5 and (z[1] - 2).abs().max() < 0.6  # the bias is gone, 1.0 is 2 std
    with pytest.raises(ValueError, match="at least 2"):
        cu.ScoreCalibration.fit({"loss": normals[:1]})


def test_detector_maps():
    raw = {"loss": torch.full((2, 1, 3, 3), 2.0), "knn": torch.full((2, 1, 3, 3), 0.5)}
    raw["loss"][1, 0, 1, 1], raw["knn"][0, 0, 0, 0] = 0.0, 1.5     # too predictable; untypical
    cal = cu.ScoreCalibration({"loss": torch.full((1, 3, 3), 2.0), "knn": torch.full((1, 3, 3), 0.5)},
                              {"loss": 1.0, "knn": 0.5})
    assert torch.equal(cu.detector_maps(raw, None, "cpcad"), raw["loss"])
    assert cu.detector_maps(raw, cal, "cpcad_cal")[1, 0, 1, 1] == -2.0
    assert cu.detector_maps(raw, cal, "cpcad_2sided")[1, 0, 1, 1] == 2.0  # low loss counts as anomalous
    assert cu.detector_maps(raw, cal, "knn")[0, 0, 0, 0] == 2.0
    both = cu.detector_maps(raw, cal, "cpcad_knn")
    assert both[0, 0, 0, 0] == 2.0 and both[1, 0, 1, 1] == -2.0 and both[0, 0, 2, 2] == 0.0
    with pytest.raises(ValueError, match="needs a ScoreCalibration"):
        cu.detector_maps(raw, None, "cpcad_knn")
    with pytest.raises(ValueError, match="pass references"):
        cu.detector_maps({"loss": raw["loss"]}, cal, "knn")
    with pytest.raises(ValueError, match="needs knn_ms scores"):
        cu.detector_maps(raw, cal, "cpcad_knn_ms")
    with pytest.raises(ValueError, match="unknown detector"):
        cu.detector_maps(raw, cal, "magic")


def tiny_model(grid: cu.PatchGrid, **kw) -> cu.CPCAD:
    return cu.CPCAD(cu.CPCADConfig(width=8, num_negatives=8, **kw), grid).eval()


SC = cu.ScoringConfig(test_negatives=32)  # dense scoring: the training grid at half its stride


@pytest.mark.parametrize("shared", [True, False])
def test_score_patches_knn_is_the_nearest_reference_distance(shared):
    grid = cu.PatchGrid(32, 16, 8)
    model = tiny_model(grid, shared_encoder=shared)
    train, test = random_images(3, 32, seed=1), random_images(2, 32, seed=2)
    scoring = cu.prepare_scoring(model, train, None, SC, knn_size=10_000, kinds=cu.REFERENCE_KINDS, device="cpu")
    refs, sg = scoring["references"], scoring["grid"]                          # 5x5: the dense score grid
    assert scoring["calibration"] is None and set(refs) == set(cu.REFERENCE_KINDS)
    assert refs["knn"].shape[1] == refs["knn_ms"].shape[1] == refs["knn_stats"].shape[1] == 3 * 25  # all
    raw = cu.score_patches(model, test, scoring["bank"], refs, batch_size=1, device="cpu", grid=sg)
    assert set(raw) == {"loss", *cu.REFERENCE_KINDS}
    assert all(v.shape == (2, 1, 5, 5) for v in raw.values())
    assert torch.equal(raw["loss"], cu.score_images(model, test, scoring["bank"], device="cpu", grid=sg))
    with torch.no_grad():  # brute force, averaged over the encoders
        for i, kind in enumerate(cu.REFERENCE_KINDS):
            dists = []
            for e, enc in enumerate(model.encoders):
                f = cu.encode_grid(enc, cu.to_float(test), sg, multiscale=True)[i].permute(0, 2, 3, 1).double()
                ref = refs[kind][e].double()
                if kind == "knn_stats":  # Euclidean, every dimension standardised by the references
                    mu, sd = ref.mean(0), ref.std(0)
                    d = (((f - mu) / sd)[..., None, :] - ((ref - mu) / sd)).norm(dim=-1).min(-1).values
                else:                    # 1 - the best cosine similarity
                    d = 1 - torch.einsum("bijd,md->bijm", F.normalize(f, dim=-1), F.normalize(ref, dim=-1)).max(-1).values
                dists.append(d.float())
            assert torch.allclose(raw[kind][:, 0], torch.stack(dists).mean(0), atol=1e-3, rtol=1e-4), kind
    train_raw = cu.score_patches(model, train, scoring["bank"], refs, device="cpu", grid=sg)
    typical = torch.stack([raw[k] for k in cu.REFERENCE_KINDS]).mean((1, 2, 3, 4))  # of other images' patches
    for k, t in zip(cu.REFERENCE_KINDS, typical):  # a train patch is its own neighbour (cdist rounds a little)
        assert train_raw[k].abs().max() < 1e-3 * t, k


@pytest.mark.parametrize("name", list(cu.ENCODERS))
def test_multiscale_descriptor(name):
    enc = cu.build_encoder(name, width=8).eval()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        z, ms, stats = enc.multiscale(x)
        assert torch.allclose(z, enc(x), atol=1e-5)                   # the same z as forward
        stem = enc.stem(x)                                             # 4x4 on 16 px: mean and spread
        c = stem.shape[1]
        assert torch.allclose(stats[:, :c], stem.mean((2, 3)), atol=1e-5)
        assert torch.allclose(stats[:, c:2 * c], stem.std((2, 3), unbiased=False), atol=1e-5)
        final = enc.final_norm(enc.stages(stem))
        if final.shape[-1] == 1:                                       # a 1x1 map has no spread: its mean only
            assert torch.allclose(stats[:, -z.shape[1]:], z, atol=1e-5)
    assert torch.allclose(ms.norm(dim=-1), torch.ones(5), atol=1e-5)  # unit length, 3 equal parts
    assert ms.shape[1] > z.shape[1] and stats.shape[1] > ms.shape[1]


def test_stats_distance_is_standardised_and_survives_a_constant_dimension():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(500, 3, generator=g) * torch.tensor([1.0, 100.0, 0.0])  # dim 2 never varies
    prepared = cpc_ad.scoring._prepare_references("knn_stats", ref)
    query = torch.tensor([[3.0, 0.0, 0.0], [0.0, 300.0, 0.0], [0.0, 0.0, 1e-7], [0.0, 0.0, 1.0]])
    d = cpc_ad.scoring._nearest_distance("knn_stats", query, prepared)
    assert torch.isfinite(d).all()
    assert abs(d[0] - d[1]) < 0.5      # 3 spreads out in dim 0 is as far as 3 spreads out in dim 1
    assert d[2] < 0.5 < 10 < d[3]      # float noise in the dead dimension is nothing; a real change is large


def test_stage_statistics_see_a_flat_fill_that_looks_typical_on_average():
    """A flat fill of a noisy texture's mean colour: its mean features are the texture's, its
    spread is not. knn_stats ranks it first among all patches of the image; it is also far
    above every normal image's patches on the same (calibrated) scale."""
    grid = cu.PatchGrid(64, 16, 8)
    torch.manual_seed(0)
    model = tiny_model(grid)
    train, calib = random_images(8, 64, seed=1), random_images(4, 64, seed=2)
    test = random_images(2, 64, seed=3)
    test[1, :, 24:40, 24:40] = 128                                     # the fill covers one patch exactly
    scoring = cu.prepare_scoring(model, train, calib, SC, device="cpu")
    raw = cu.score_patches(model, test, scoring["bank"], scoring["references"], device="cpu", grid=scoring["grid"])
    maps = cu.detector_maps(raw, scoring["calibration"], "knn_stats")
    G, c = scoring["grid"].grid, 24 // scoring["grid"].stride         # that patch on the dense score grid
    assert maps[1].flatten().argmax() == c * G + c
    assert maps[1, 0, c, c] > 3 * maps[0].max()


@pytest.mark.parametrize("grid", [cu.PatchGrid(64, 16, 8), cu.PatchGrid(96, 32, 16, 64, 32)], ids=["plain", "subimages"])
def test_dense_scoring_halves_the_stride_and_keeps_the_training_grids_loss(grid):
    """Maps on the grid of half the training stride: every other patch of it is a training
    grid patch with exactly the training grid's loss (interpolated halfway between), and the
    kNN distances are measured on every patch, against references drawn from the dense grid;
    the negatives stay on the training grid. An odd stride, or dense_scoring=False, keeps it."""
    torch.manual_seed(0)
    model, off = tiny_model(grid), dataclasses.replace(SC, dense_scoring=False)
    dense_grid = SC.score_grid(grid)
    assert dense_grid == dataclasses.replace(grid, stride=grid.stride // 2) and off.score_grid(grid) == grid
    assert SC.score_grid(cu.PatchGrid(40, 16, 3)) == cu.PatchGrid(40, 16, 3)
    G, Gd, n_sub = grid.grid, dense_grid.grid, grid.num_subimages ** 2
    assert Gd == 2 * G - 1
    train, test = random_images(3, grid.image_size, seed=1), random_images(2, grid.image_size, seed=2)
    s = cu.prepare_scoring(model, train, None, SC, knn_size=10_000, kinds=cu.REFERENCE_KINDS, device="cpu")
    assert s["grid"] == dense_grid and s["references"]["knn"].shape[1] == 3 * n_sub * Gd ** 2  # every dense patch
    assert torch.equal(s["bank"], model.build_bank(train, SC.test_negatives))      # negatives: training grid
    raw = cu.score_patches(model, test, s["bank"], s["references"], device="cpu", grid=dense_grid)
    assert all(v.shape == (2, n_sub, Gd, Gd) for v in raw.values())
    loss = cu.score_images(model, test, s["bank"], device="cpu")                   # (2, n_sub, G, G)
    assert torch.allclose(raw["loss"][..., ::2, ::2], loss, atol=1e-5)
    assert torch.allclose(raw["loss"][..., 1::2, ::2], (loss[..., :-1, :] + loss[..., 1:, :]) / 2, atol=1e-5)
    assert torch.allclose(cu.score_images(model, test, s["bank"], device="cpu", grid=dense_grid), raw["loss"], atol=1e-5)
    on_coarse = cu.score_patches(model, test, s["bank"], s["references"], device="cpu")
    for kind in cu.REFERENCE_KINDS:  # the training grid's patches, same references: the same distances
        assert torch.allclose(raw[kind][..., ::2, ::2], on_coarse[kind], atol=1e-4), kind
        assert not torch.allclose(raw[kind][..., 1::2, 1::2], raw[kind][..., :-1:2, :-1:2], atol=1e-3), kind
    assert cu.patches_to_pixels(raw["loss"], dense_grid).shape == (2, 1, grid.image_size, grid.image_size)


def test_prepare_scoring_fits_calibration_on_held_out_normals():
    grid = cu.PatchGrid(32, 16, 8)
    model = tiny_model(grid)
    train, calib = random_images(3, 32, seed=1), random_images(4, 32, seed=3)
    scoring = cu.prepare_scoring(model, train, calib, SC, kinds=cu.REFERENCE_KINDS, device="cpu")
    raw = cu.score_patches(model, calib, scoring["bank"], scoring["references"], device="cpu", grid=scoring["grid"])
    cal = scoring["calibration"](raw)
    for kind in ("loss", *cu.REFERENCE_KINDS):  # on its own images the calibration gives zero mean per position
        assert cal[kind].mean(0).abs().max() < 1e-4


def test_scoring_follows_the_runs_precision(monkeypatch):
    """A model trained in fp32 is scored in fp32: every autocast of prepare_scoring and
    score_patches gets the run's precision, not "auto" (bf16/fp16 on a GPU)."""
    seen = []
    real = cu.autocast
    monkeypatch.setattr(cpc_ad.scoring, "autocast", lambda device, precision="auto": seen.append(precision) or real(device, precision))
    grid = cu.PatchGrid(32, 16, 8)
    model = tiny_model(grid)
    scoring = cu.prepare_scoring(model, random_images(3, 32, seed=1), random_images(2, 32, seed=3), device="cpu",
                                 precision="fp32")
    cu.score_patches(model, random_images(2, 32), scoring["bank"], scoring["references"], device="cpu",
                     precision="fp32")
    cu.score_images(model, random_images(2, 32), scoring["bank"], device="cpu", precision="fp32")
    assert seen and set(seen) == {"fp32"}


def test_identical_training_images_flag_a_degenerate_calibration():
    """All training images alike: the calibration normals' scores have no spread, the floored
    spread would blow test scores up a million-fold, so the calibration says it is degenerate
    (and survives the bundle's round trip); normals that differ calibrate fine."""
    grid = cu.PatchGrid(32, 16, 8)
    model = tiny_model(grid)
    same = random_images(1, 32, seed=1).expand(6, -1, -1, -1).contiguous()
    cal = cu.prepare_scoring(model, same[:3], same[3:], device="cpu")["calibration"]
    check = cal.check()
    assert check["status"] == "degenerate" and "no spread" in check["message"] and "loss" in cal.degenerate
    assert cu.ScoreCalibration.from_dict(cal.to_dict()).check() == check
    fine = cu.prepare_scoring(model, random_images(3, 32, seed=1), random_images(4, 32, seed=3), device="cpu")
    assert fine["calibration"].check()["status"] == "ok" and fine["calibration"].degenerate == []


# ---- image metrics -------------------------------------------------------------------

def brute_force_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp, fp, fn = np.sum(pred & (labels == 1)), np.sum(pred & (labels == 0)), np.sum(~pred & (labels == 1))
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_auroc_and_f1_max(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 40)
    scores = np.round(rng.random(40) + 0.3 * labels, 1)  # rounded: ties included
    m = cu.compute_metrics(torch.from_numpy(labels), torch.from_numpy(scores))
    assert m["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert m["image_f1_max"] == pytest.approx(brute_force_f1_max(labels, scores), abs=1e-9)
    assert cu.f1_max(labels, scores) == m["image_f1_max"]


def test_f1_max_by_hand():
    # thresholds 0.9: P=1, R=1/3 -> 0.5; 0.7: P=1, R=2/3 -> 0.8; 0.5: P=2/3, R=2/3; 0.3: P=3/4, R=1 -> 6/7
    labels, scores = np.array([1, 1, 0, 1, 0]), np.array([0.9, 0.7, 0.5, 0.3, 0.1])
    assert cu.f1_max(labels, scores) == pytest.approx(6 / 7)


def test_compute_metrics_with_pixels():
    rng = np.random.default_rng(0)
    labels = np.array([0, 0, 1, 1])
    masks = np.zeros((4, 1, 16, 16), bool)
    masks[2, 0, 2:6, 2:6] = True
    masks[3, 0, 8:14, 9:12] = True
    maps = rng.random((4, 1, 16, 16)) + masks
    m = cu.compute_metrics(labels, np.array([0.1, 0.2, 0.3, 0.4]), torch.from_numpy(masks), torch.from_numpy(maps))
    assert m["image_auroc"] == 1.0 and m["image_f1_max"] == 1.0
    assert m["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-6)
    assert m["aupro"] == pytest.approx(cu.aupro(masks[:, 0], maps[:, 0].astype(np.float32)), abs=1e-9)
    assert set(m) == {"image_auroc", "image_f1_max", "pixel_auroc", "aupro"}


def test_compute_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        cu.compute_metrics([0, 1], [0.5, float("nan")])
    with pytest.raises(ValueError, match="both normal and anomalous"):
        cu.compute_metrics([0, 0], [0.1, 0.2])


def test_per_defect_auroc_by_hand():
    defects = ["good", "a", "good", "b", "a", "good", "b"]
    scores = torch.tensor([0.1, 0.8, 0.4, 0.2, 0.9, 0.35, 0.3])
    # a beats every good image; b beats good 0.1 twice out of 3 x 2 pairs
    assert cu.per_defect_auroc(defects, scores) == {"a": 1.0, "b": pytest.approx(2 / 6)}


# ---- AUPRO ---------------------------------------------------------------------------

def two_region_image(size: int = 120):
    """One image with a 3x3 region A and a 20x20 region B, and distinct normal scores in [0, 1)."""
    mask = np.zeros((1, size, size), bool)
    mask[0, 10:13, 10:13] = True      # A: 9 px
    mask[0, 50:70, 50:70] = True      # B: 400 px
    n = (~mask).sum()
    maps = np.zeros(mask.shape)
    maps[~mask] = np.random.default_rng(0).permutation(n) / n
    return mask, maps, np.sort(maps[~mask])


def test_aupro_step_curve_by_hand():
    """A is found at every threshold, B only once the FPR reaches f0 = 0.1. The mean over the
    two regions (not over pixels) gives PRO 0.5 up to f0, then 1, so
    AUPRO = (0.5 * f0 + 1 * (0.3 - f0)) / 0.3 = 5/6."""
    mask, maps, normal = two_region_image()
    f0_count = int(0.1 * len(normal))
    v_b = (normal[-f0_count - 1] + normal[-f0_count]) / 2  # exactly f0_count normal pixels above it
    maps[0, 10:13, 10:13] = 2.0
    maps[0, 50:70, 50:70] = v_b
    f0 = f0_count / len(normal)
    expected = (0.5 * f0 + (0.3 - f0)) / 0.3
    assert expected == pytest.approx(5 / 6, abs=1e-3)
    assert cu.aupro(mask, maps) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("max_fpr", [0.3, 1.0])
def test_aupro_linear_curve_by_hand(max_fpr):
    """B's scores follow the normal scores, so its overlap at FPR f is f; with A found always,
    PRO(f) = (1 + f) / 2 and AUPRO = (max_fpr + max_fpr ** 2 / 2) / 2 / max_fpr."""
    mask, maps, normal = two_region_image()
    maps[0, 10:13, 10:13] = 2.0
    maps[0, 50:70, 50:70] = np.quantile(normal, (np.arange(400) + 0.5) / 400).reshape(20, 20)
    expected = (1 + max_fpr / 2) / 2
    assert cu.aupro(mask, maps, max_fpr=max_fpr) == pytest.approx(expected, abs=2e-3)


def test_aupro_regions_across_images():
    """Region 1 (image 0) always found, region 2 (image 1) never: PRO = 0.5 everywhere."""
    rng = np.random.default_rng(0)
    masks = np.zeros((2, 20, 20), bool)
    masks[0, 3:6, 3:6] = True
    masks[1, 10:18, 10:18] = True
    maps = rng.random((2, 20, 20))
    maps[0][masks[0]] = 5.0
    maps[1][masks[1]] = -5.0
    assert cu.aupro(masks, maps) == pytest.approx(0.5, abs=1e-9)


def test_aupro_regions_are_eight_connected():
    """Two squares touching at a corner are one region: 4 of its 13 pixels found -> 4/13."""
    mask = np.zeros((1, 20, 20), bool)
    mask[0, 2:4, 2:4] = True          # 4 px, found
    mask[0, 4:7, 4:7] = True          # 9 px, touches the first diagonally, never found
    maps = np.random.default_rng(0).random((1, 20, 20))
    maps[0, 2:4, 2:4] = 5.0
    maps[0, 4:7, 4:7] = -5.0
    assert cu.aupro(mask, maps) == pytest.approx(4 / 13, abs=1e-9)


@pytest.mark.parametrize("binary", [False, True], ids=["continuous", "binary"])
def test_aupro_perfect_and_inverted_maps(binary):
    mask, maps, _ = two_region_image(40)
    if binary:
        perfect, inverted = mask.astype(float), (~mask).astype(float)
    else:
        perfect, inverted = maps + 2 * mask, maps - 2 * mask
    assert cu.aupro(mask, perfect) == pytest.approx(1.0, abs=1e-9)
    assert cu.aupro(mask, inverted) == pytest.approx(0.0, abs=1e-9)


def test_aupro_without_np_trapezoid(monkeypatch):
    """NumPy < 2 has np.trapz and no np.trapezoid (requirements allow numpy>=1.24). Where this
    NumPy has no np.trapz either (removed in 2.4), a stand-in for it checks the fallback is taken."""
    mask, maps, normal = two_region_image()
    maps[0, 50:70, 50:70] = np.quantile(normal, (np.arange(400) + 0.5) / 400).reshape(20, 20)  # PRO(f) = f / 2
    expected = cu.aupro(mask, maps)
    integrate = getattr(np, "trapezoid", None) or np.trapz
    calls = []

    def trapz(y, x):
        calls.append(len(y))
        return integrate(y, x)

    monkeypatch.delattr(np, "trapezoid", raising=False)
    monkeypatch.setattr(np, "trapz", trapz, raising=False)
    assert cu.aupro(mask, maps) == expected
    assert calls and 0 < expected < 1


def test_aupro_needs_regions():
    with pytest.raises(ValueError, match="defect region"):
        cu.aupro(np.zeros((1, 8, 8), bool), np.random.rand(1, 8, 8))


# ---- evaluation of maps --------------------------------------------------------------

def test_evaluate_maps(fake_widget):
    test = fake_widget["test"]
    grid = cu.PatchGrid(32, 16, 8)
    torch.manual_seed(0)
    patch_maps = torch.rand(len(test), 1, 3, 3) + 2 * test.labels.view(-1, 1, 1, 1)  # anomalous images score higher
    result = cu.evaluate_maps(patch_maps, test, grid)
    assert result["pixel_maps"].shape == (len(test), 1, 32, 32)
    assert torch.allclose(result["scores"]["mean"], patch_maps.flatten(1).mean(1))
    metrics = result["metrics"]
    assert metrics["image_auroc"] == metrics["image_auroc_mean"] == 1.0
    assert metrics["image_auroc_max"] == 1.0
    assert 0 <= metrics["pixel_auroc"] <= 1 and 0 <= metrics["aupro"] <= 1
    max_first = cu.evaluate_maps(patch_maps, test, grid, reduces=("max", "mean"))
    assert torch.equal(max_first["scores"]["max"], patch_maps.flatten(1).max(1).values)


# ---- pixel baseline ------------------------------------------------------------------

def test_pixel_baseline_finds_the_changed_patch():
    grid = cu.PatchGrid(32, 16, 8)
    train = random_images(3, 32)
    test = train[:2].clone()
    test[1, :, 0:8, 0:8] = 255 - test[1, :, 0:8, 0:8]   # only patch (0, 0) covers these pixels
    dist = cu.pixel_baseline(train, test, grid, resolution=4, device="cpu")
    assert dist.shape == (2, 1, 3, 3)
    assert dist[0].abs().max() < 1e-2                  # a train image is its own nearest neighbour
    assert dist[1, 0, 0, 0] > 0.5
    others = dist[1, 0].flatten()[1:]
    assert others.abs().max() < 1e-2


def test_pixel_baseline_with_subimages():
    grid = cu.PatchGrid(48, 16, 8, subimage_size=32, subimage_stride=16)
    dist = cu.pixel_baseline(random_images(2, 48), random_images(3, 48, seed=1), grid, device="cpu")
    assert dist.shape == (3, 4, 3, 3) and (dist > 0).all()


def aligned_objects(n: int, imprint: bool = True, seed: int = 0) -> torch.Tensor:
    """(n, 3, 64, 64) uint8: a grey object with a dark imprint always at the same place, and blank
    grey elsewhere, faint noise; `imprint=False` leaves the imprint out (a blank where it belongs)."""
    g = torch.Generator().manual_seed(seed)
    x = 128 + torch.randint(-3, 4, (n, 3, 64, 64), generator=g)
    if imprint:
        x[:, :, 8:24, 8:24] = 30
    return x.clamp(0, 255).to(torch.uint8)


def test_the_pixel_detectors_are_the_baseline_and_its_position_aware_twin():
    """"pixel" is `pixel_baseline`, map for map; "pixel_pos" compares with train patches near
    the patch's own place, so a missing imprint, a blank that matches blanks elsewhere on the
    object, stands out there and nowhere else; its distances never fall below "pixel"'s."""
    grid = cu.PatchGrid(64, 16, 4)
    train, missing = aligned_objects(6), aligned_objects(2, imprint=False, seed=1)
    refs = cu.PixelReferences.build(train, grid)
    d = refs.distances(missing)
    assert torch.equal(d["pixel"], cu.pixel_baseline(train, missing, grid, device="cpu"))
    assert (d["pixel_pos"] >= d["pixel"] - 1e-3).all()
    at_imprint, elsewhere = d["pixel_pos"][:, 0, 2, 2], d["pixel_pos"][:, 0, 10, 10]  # patch (2, 2) covers 8-24 px
    assert (at_imprint > 10 * elsewhere.clamp_min(1e-3)).all() and (d["pixel"][:, 0, 2, 2] < at_imprint / 10).all()
    # brute force: the nearest train patch within one grid step, same sub-image
    f, q = refs.features, cu.pixel_features(missing, grid)
    i, j = 2, 3
    near = f[:, 0, i - 1:i + 2, j - 1:j + 2].reshape(-1, f.shape[-1])
    torch.testing.assert_close(d["pixel_pos"][0, 0, i, j], torch.cdist(q[0, 0, i, j][None], near).min(),
                               atol=2e-3, rtol=1e-4)


def test_a_pixel_detector_needs_its_references_and_no_calibration():
    grid = cu.PatchGrid(64, 16, 8)
    train = aligned_objects(4)
    raw = cu.PixelReferences.build(train, grid).distances(aligned_objects(2, seed=2))
    assert torch.equal(cu.detector_maps(raw, None, "pixel_pos"), raw["pixel_pos"])
    with pytest.raises(ValueError, match="needs a ScoreCalibration"):
        cu.detector_maps(raw, None, "knn_stats_pixel")
    with pytest.raises(ValueError, match="needs pixel_pos scores"):
        cu.detector_maps({"pixel": raw["pixel"]}, None, "pixel_pos")
    assert cu.score_kinds(["knn_stats_pixel_pos", "cpcad"]) == ("knn_stats", "pixel_pos")
    assert cu.ScoringConfig().kinds == ("knn_stats", "head", "pixel", "pixel_pos") and cu.ScoringConfig().choosing
    assert not cu.scoring_config("paper").choosing and cu.scoring_config("paper").detectors == ("cpcad",)
