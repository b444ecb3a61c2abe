"""Screen (one seed, seed 0): notebook 01's kNN and linear patch probes on the test split for
the five representations, at notebook 01's defaults (128 px, 32 px patches at stride 16,
width 16, 15 epochs). Output: nb01_probe.log. Run from anywhere:
    python results/study/screens/nb01_probe.py [category ...]
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
for c in sys.argv[1:] or list(cu.DEMO_TUNING + cu.DEMO_CONFIRMATION):
    t0, s = time.time(), 0
    d = cu.load_category(ROOT / "data" / "demo", c, 128)
    train, cal, normals = cu.split_held_out(d["train"], 0.2, s)
    fit = cu.make_validation_set(normals, s)
    cu.seed_everything(s)
    model = cu.CPC(cfg, grid)
    initial = copy.deepcopy(model).eval()
    cu.train_model(model, train, cal, cu.make_config(cu.TrainConfig, epochs=15, seed=s, device="cpu"), progress=False)
    pr = cu.probe_representations(model.encoder, initial.encoder, train, fit, d["test"], grid, "cpu", s)
    print(c, f"{time.time() - t0:.0f}s", {k: round(v["knn_auroc"], 3) for k, v in pr.items()},
          "lin", {k: round(v["linear_auroc"], 3) for k, v in pr.items()}, flush=True)
