"""Screen (tuning half, seed 0; validation only): notebook 01's kNN patch probe on the stage
statistics after 15 and after 40 epochs, scored on the synthetic-anomaly validation set (never
the test split), beside the random init and raw pixels. Output: nb01_epochs.log.
    python results/study/screens/nb01_epochs.py
"""
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
import cpc_utils as cu  # noqa: E402

torch.set_num_threads(1)
grid = cu.PatchGrid(128, 32, 16)
cfg = cu.make_config(cu.CPCConfig, encoder="resnet18v2", width=16)
for s in (0,):
    for c in cu.DEMO_TUNING:
        d = cu.load_category(ROOT / "data" / "demo", c, 128)
        train, cal, normals = cu.split_held_out(d["train"], 0.2, s)
        fit = cu.make_validation_set(normals, s)
        frac = cu.patch_defect_fraction(fit.masks, grid)
        for ep in (15, 40):
            t0 = time.time()
            cu.seed_everything(s)
            model = cu.CPC(cfg, grid)
            initial = copy.deepcopy(model).eval()
            h = cu.train_model(model, train, cal, cu.make_config(cu.TrainConfig, epochs=ep, seed=s, device="cpu",
                                                                  patience=100), progress=False)
            feats = {"trained": lambda x: cu.patch_embeddings(model.encoder, x.images, grid, descriptor="stats"),
                     "random": lambda x: cu.patch_embeddings(initial.encoder, x.images, grid, descriptor="stats"),
                     "pixel": lambda x: cu.pixel_patch_features(x.images, grid)}
            out = {k: cu.patch_probes((f(fit), frac), (f(fit), frac), f(train))["knn_auroc"] for k, f in feats.items()}
            print(f"seed {s} {c} epochs {ep} ({len(h)} trained, val loss {h[-1]['val_loss']:.2f}) "
                  f"{time.time() - t0:.0f}s VAL knn", {k: round(v, 3) for k, v in out.items()}, flush=True)
