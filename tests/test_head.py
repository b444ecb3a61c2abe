"""The discriminative defect head (issue 30, lever 3): it learns to find training-only defects on
frozen features, repeats for a seed, scores through `raw_scores` as the kind "head", and travels
in a model bundle."""
from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

import cpc_utils as cu

GRID = cu.PatchGrid(64, 16, 8)


@pytest.fixture(scope="module")
def brick(tmp_path_factory):
    root = cu.make_demo_dataset(tmp_path_factory.mktemp("data"), ["brick"], n_train=12, n_test_good=2,
                                n_per_defect=1, image_size=64)
    return cu.load_category(root, "brick", 64)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return cu.CPCAD(cu.cpcad_config("fast", GRID, width=8), GRID).eval()


def test_head_learns_training_defects_and_finds_them_on_images_it_never_saw(brick, model):
    train, held = brick["train"].images[:8], brick["train"].images[8:]
    head = cu.fit_head(model, train, GRID, seed=0, n_images=64, steps=300)
    log = head.fit_log
    assert 0 < log["positives"] < 0.5
    assert log["last_bce"] < 0.8 * log["chance_bce"], log   # below predicting the base rate everywhere
    g = torch.Generator().manual_seed(123)                  # other images, other defects
    x = cu.to_float(held.repeat(4, 1, 1, 1))
    bad, _ = cu.corrupt(x, g)
    labels = cu.changed_patches(x, bad, GRID)
    with torch.no_grad():
        logits = head(cu.head_features(model.encoders, bad, GRID)).reshape(-1)
    assert labels.any() and not labels.all()
    assert roc_auc_score(labels.numpy(), logits.numpy()) > 0.75


def test_head_repeats_for_a_seed_and_leaves_the_global_rng_alone(brick, model):
    train = brick["train"].images[:4]
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    a = cu.fit_head(model, train, GRID, seed=3, n_images=8, steps=5)
    after = torch.rand(1)
    b = cu.fit_head(model, train, GRID, seed=3, n_images=8, steps=5)
    c = cu.fit_head(model, train, GRID, seed=4, n_images=8, steps=5)
    assert torch.equal(before, after)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.net[0].weight, c.net[0].weight)
    assert torch.equal(cu.DefectHead.from_state(a.state_dict()).net[0].weight, a.net[0].weight)


def test_head_is_a_score_kind_its_detectors_read(brick, model, monkeypatch):
    monkeypatch.setattr("cpc_ad.head.HEAD_IMAGES", 8)
    monkeypatch.setattr("cpc_ad.head.HEAD_STEPS", 5)
    sc = cu.ScoringConfig(detector="knn_stats_head", reduce="max", test_negatives=32, knn_bank=128)
    assert sc.kinds == ("knn_stats", "head") and cu.score_kinds(["head"]) == ("head",)
    train = brick["train"].images
    scoring = cu.prepare_scoring(model, train[:8], train[8:], sc, device="cpu")
    assert isinstance(scoring["head"], cu.DefectHead) and "head" in scoring["calibration"].mean
    raw = cu.raw_scores(model, brick["test"].images, scoring, 16, "cpu")
    G = scoring["grid"].grid
    assert raw["head"].shape == (len(brick["test"]), 1, G, G)
    maps = cu.detector_maps(raw, scoring["calibration"], "knn_stats_head")
    cal = scoring["calibration"]({"knn_stats": raw["knn_stats"], "head": raw["head"]})
    assert torch.allclose(maps, cal["knn_stats"] + cal["head"])
    none = cu.prepare_scoring(model, train[:8], train[8:], cu.ScoringConfig(detector="knn_stats", reduce="max",
                                                                            test_negatives=32, knn_bank=128))
    assert none["head"] is None and "head" not in cu.raw_scores(model, brick["test"].images, none, 16, "cpu")


def test_bundle_carries_the_head_and_refuses_one_without_it(brick, model, monkeypatch, tmp_path):
    monkeypatch.setattr("cpc_ad.head.HEAD_IMAGES", 8)
    monkeypatch.setattr("cpc_ad.head.HEAD_STEPS", 5)
    sc = cu.ScoringConfig(detector="head", reduce="top10", test_negatives=32, knn_bank=128)
    train = brick["train"].images
    scoring = cu.prepare_scoring(model, train[:8], train[8:], sc, device="cpu")
    raw = cu.raw_scores(model, brick["test"].images, scoring, 16, "cpu")
    want = cu.image_scores(cu.detector_maps(raw, scoring["calibration"], "head"), "top10")
    rule = {"value": 0.0, "rule": "test"}
    path = cu.save_bundle(tmp_path / "model.pt", model, scoring, rule, rule)
    bundle = cu.load_bundle(path)
    assert bundle.head is not None and bundle.info["format_version"] == cu.BUNDLE_VERSION
    assert torch.allclose(bundle.score(brick["test"].images)["scores"], want, atol=1e-5)
    b = torch.load(path, weights_only=True)
    b["head"] = None
    torch.save(b, tmp_path / "headless.pt")
    with pytest.raises(ValueError, match=r"headless.pt has no defect head weights, which its detector 'head' reads"):
        cu.load_bundle(tmp_path / "headless.pt")
    with pytest.raises(ValueError, match="reads the defect head"):
        cu.save_bundle(tmp_path / "x.pt", model, {**scoring, "head": None}, rule, rule)
