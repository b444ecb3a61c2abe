"""Shared fixtures: a tiny fake MVTec AD tree (anomalib style), a small demo dataset,
tiny patch geometries and a seeded RNG for every test.

Every fixture that writes files either is session-scoped and treated as read-only, or
builds a fresh tree in the test's own tmp_path, so no test depends on another's order.
"""
from __future__ import annotations

import random
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before anything imports pyplot: no display in CI

import numpy as np
import pytest
import torch
from PIL import Image

import cpc_utils as cu

# Tiny tensors gain nothing from intra-op threads, and on a shared 2-core machine the
# threads' spin-waiting makes each training step several times slower.
torch.set_num_threads(1)

FAKE_SIZE = 32            # px of every image in the fake tree
FAKE_TRAIN = 6            # train/good images per category
FAKE_TEST_GOOD = 2
FAKE_DEFECTS = {"crack": 2, "dent": 1}  # defect -> images; each defect is a bright square


def fake_defect_box(i: int) -> tuple[slice, slice]:
    """Where the i-th defect of a type sits (rows, cols): a 6x6 square moving with i."""
    return slice(4 + 4 * i, 10 + 4 * i), slice(8, 14)


def make_fake_mvtec(root: Path, categories: dict[str, str] | None = None, seed: int = 0) -> Path:
    """Write a tiny MVTec AD tree and return its root.

    categories: name -> PIL mode of its images ("RGB" like bottle, "L" like grid/screw).
    Images are seeded noise; each defect image has a white 6x6 square and an exact mask.
    """
    categories = categories or {"widget": "RGB", "gadget": "L"}
    rng = np.random.default_rng(seed)

    def noise(mode: str) -> np.ndarray:
        shape = (FAKE_SIZE, FAKE_SIZE) + ((3,) if mode == "RGB" else ())
        return rng.integers(0, 200, shape, dtype=np.uint8)

    def save(arr: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path)

    for cat, mode in categories.items():
        d = root / cat
        for i in range(FAKE_TRAIN):
            save(noise(mode), d / "train" / "good" / f"{i:03d}.png")
        for i in range(FAKE_TEST_GOOD):
            save(noise(mode), d / "test" / "good" / f"{i:03d}.png")
        for defect, n in FAKE_DEFECTS.items():
            for i in range(n):
                img, mask = noise(mode), np.zeros((FAKE_SIZE, FAKE_SIZE), np.uint8)
                img[fake_defect_box(i)] = 255
                mask[fake_defect_box(i)] = 255
                save(img, d / "test" / defect / f"{i:03d}.png")
                save(mask, d / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state, whatever ran before it."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
    import matplotlib.pyplot as plt
    plt.close("all")


@pytest.fixture(scope="session")
def fake_mvtec(tmp_path_factory) -> Path:
    """A read-only fake MVTec AD root with an RGB ("widget") and a grayscale ("gadget") category."""
    return make_fake_mvtec(tmp_path_factory.mktemp("mvtec"))


@pytest.fixture
def fresh_mvtec(tmp_path) -> Path:
    """A fake MVTec AD root of this test's own, free to break."""
    return make_fake_mvtec(tmp_path / "mvtec")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """A small demo dataset: every demo category x (4 train, 2 good + 1 image per defect type)."""
    return cu.make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=4, n_test_good=2, n_per_defect=1)


@pytest.fixture(scope="session")
def fake_widget(fake_mvtec) -> dict[str, cu.ImageSet]:
    """The "widget" category of the fake tree, decoded at its own 32 px."""
    return cu.load_category(fake_mvtec, "widget", image_size=FAKE_SIZE, num_threads=2)


def image_set(images: torch.Tensor) -> cu.ImageSet:
    """Wrap uint8 images (N, 3, H, W) as an all-normal ImageSet."""
    N, _, H, W = images.shape
    return cu.ImageSet(images, torch.zeros(N, 1, H, W, dtype=torch.bool), torch.zeros(N, dtype=torch.long),
                       ["good"] * N, [f"img{i}" for i in range(N)])


def random_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) uint8 noise, seeded."""
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def metrics_record(**fields) -> dict:
    """A complete metrics.json record of the current schema (`cu.MetricsRecord`), plausible
    values, with `fields` replacing some; a top-level `seed` goes where notebook 02 records it
    (config.parameters). For tests that write results trees `cu.load_results` must read."""
    seed = fields.pop("seed", 0)
    fields.setdefault("epochs", fields.get("epochs_trained", 2))  # asked for what it trained
    metrics = {k: 0.5 for k in cu.METRIC_KEYS}
    record = cu.MetricsRecord(
        category="brick", encoder="resnet18v2", preset="fast", detector="knn_stats", image_reduce="top10",
        score_grid=29, baseline_grid=29, epochs=2, epochs_trained=2, chosen_epoch=2, test=dict(metrics),
        per_defect_auroc={"crack": 0.5}, cpcad=dict(metrics), baseline=dict(metrics),
        baseline_per_defect_auroc={"crack": 0.5}, val=dict(metrics), val_per_kind_auroc={"flat_fill": 0.5},
        val_baseline=dict(metrics), threshold=1.0, threshold_rule={"value": 1.0}, val_fpr_at_threshold=0.0,
        val_recall_at_threshold=0.5, test_precision_at_threshold=0.5, test_recall_at_threshold=0.5,
        test_fpr_at_threshold=0.1, pixel_threshold=1.0, pixel_threshold_rule={"value": 1.0},
        test_pixel_precision_at_threshold=0.5, test_pixel_recall_at_threshold=0.5, test_pixel_fpr_at_threshold=0.1,
        final_train_loss=1.0, final_val_loss=1.0, best_val_loss=1.0, chance_loss=4.16, train_seconds=12.0,
        train_wall_seconds=12.0, score_seconds=1.0, num_parameters=1000, embedding_dim=64, device="cpu",
        data_root="/data", learning={"status": "ok"}, calibration={"status": "ok"}, fingerprint={},
        history=[{"epoch": 1, "train_loss": 1.0, "val_loss": 1.0}, {"epoch": 2, "train_loss": 1.0, "val_loss": 1.0}],
        config={"parameters": {"seed": seed}}, fixed=dict(metrics),
        selection={"mode": "fixed", "detector": "knn_stats", "reduce": "top10", "why": "a test record",
                   "candidates": []})
    out = record.to_dict()
    config = fields.pop("config", None)
    out.update(fields)
    if config is not None:
        out["config"] = {**config, "parameters": {"seed": seed, **config.get("parameters", {})}}
    return out
