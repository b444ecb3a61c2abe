"""Learning happens: short CPU runs on one demo category get the loss below chance and
detect the synthetic defects well above 0.5 AUROC. The thresholds leave a margin under
the values measured when they were set (noted beside each), so a regression that stops
the models from learning fails here, while seed-to-seed noise does not."""
import math

import pytest
import torch

import cpc_utils as cu

GRID = cu.PatchGrid(64, 16, 8)  # 7x7 patches of 16 px on 64 px images: the demo geometry, halved


@pytest.fixture(scope="module")
def brick(tmp_path_factory):
    root = cu.make_demo_dataset(tmp_path_factory.mktemp("demo"), ["brick"], n_train=48,
                                n_test_good=8, n_per_defect=4, image_size=128)
    data = cu.load_category(root, "brick", GRID.image_size)
    train, val = cu.split_train_val(data["train"], 0.15, seed=0)
    return train, val, data["test"]


def test_cpcad_learns_and_detects(brick):
    train, val, test = brick
    torch.manual_seed(0)
    cfg = cu.CPCADConfig(width=16, num_negatives=31, test_negatives=512)
    model = cu.CPCAD(cfg, GRID)
    history = cu.train_model(model, train, val, cu.TrainConfig(epochs=15, batch_size=8, lr=2e-4, seed=0,
                             patience=15), progress=False)
    chance = math.log(cfg.num_negatives + 1)                                     # 3.47
    assert history[-1]["val_loss"] < chance - 1.0, (history[-1], chance)       # measured: 1.88
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    maps = cu.score_images(model, test.images, model.build_bank(train.images), device="cpu")
    metrics = cu.evaluate_maps(maps, test, GRID, ("max", "mean"))["metrics"]
    assert metrics["image_auroc"] > 0.8, metrics                                # measured: 0.96 (max)
    assert metrics["pixel_auroc"] > 0.8, metrics                                # measured: 0.92


def test_cpc_learns(brick):
    train, val, _ = brick
    torch.manual_seed(0)
    cfg = cu.CPCConfig(width=16, pred_steps=2, num_negatives=15, context_dim=64, context_layers=2)
    model = cu.CPC(cfg, GRID)
    history = cu.train_model(model, train, val, cu.TrainConfig(epochs=15, batch_size=8, lr=2e-4, seed=0,
                             patience=15), progress=False)
    chance = math.log(cfg.num_negatives + 1)                                     # 2.77
    assert history[-1]["val_loss"] < chance - 0.6, (history[-1], chance)       # measured: 1.66
    accuracy = history[-1]["acc_per_step"][0]
    assert accuracy > 4 / (cfg.num_negatives + 1), history[-1]                  # measured: 0.50 (chance 0.06)
