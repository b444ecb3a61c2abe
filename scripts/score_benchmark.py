"""Throughput of `python -m cpc_utils score` and the size of a model bundle, on this machine.

For each grid (the demo's: 128 px images, 16 px patches at stride 8, width 16; the paper's:
256 px images, 64 px patches at stride 32, width 64), resnet18v2 at the module's defaults
(test_negatives 1024, knn_bank 16384, detector knn_stats): writes a bundle, writes
`--images` random PNGs, and times the command twice, in a fresh process (Python and torch
start-up included) and in-process (`cu.score_files`: bundle loading, reading, scoring and
writing the CSV, overlays and masks). The weights are untrained and the negative bank, kNN
references and calibration are random tensors of the real shapes: neither the time nor the
size depends on their values, and filling a 16,384-patch bank for real costs minutes of CPU.

    python scripts/score_benchmark.py                  # both grids, on cpu
    python scripts/score_benchmark.py --images 8 --grids demo
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import cpc_utils as cu  # noqa: E402

GRIDS = {"demo": (cu.PatchGrid(128, 16, 8), 16), "paper": (cu.PatchGrid(256, 64, 32), 64)}


def random_bundle(path: Path, grid: cu.PatchGrid, width: int) -> cu.PatchGrid:
    """A bundle of the real shapes with untrained weights and random bank, references and calibration;
    returns its score grid."""
    model = cu.CPCAD(cu.cpcad_config("fast", grid, encoder="resnet18v2", width=width), grid).eval()
    with torch.no_grad():
        patch = torch.zeros(1, 3, grid.patch_size, grid.patch_size)
        sc = cu.ScoringConfig(detector="knn_stats", reduce="top10")  # a learned detector, as a class may choose
        kind = cu.detector_references(sc.detector)  # the references it reads
        z, *descriptors = model.encoders[0].multiscale(patch)  # z, then one descriptor per reference kind
        D, D_ref = z.shape[-1], (z, *descriptors)[cu.REFERENCE_KINDS.index(kind)].shape[-1]
    G = sc.score_grid(grid).grid  # the calibration's maps are on the score grid
    n_enc, shape = len(model.encoders), (grid.num_subimages ** 2, G, G)
    scoring = {"bank": torch.randn(n_enc, sc.test_negatives, D), "config": sc,
               "references": {kind: torch.randn(n_enc, sc.knn_bank, D_ref)},
               "calibration": cu.ScoreCalibration({k: torch.zeros(shape) for k in ("loss", kind)},
                                                  {"loss": 1.0, kind: 1.0})}
    rule = cu.normal_threshold(np.zeros(8), 0.01)
    cu.save_bundle(path, model, scoring, rule, rule)
    return sc.score_grid(grid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grids", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    for name in args.grids:
        grid, width = GRIDS[name]
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            bundle = tmp / "model.pt"
            G = random_bundle(bundle, grid, width).grid
            rng = np.random.default_rng(0)
            (tmp / "images").mkdir()
            for i in range(args.images):
                pixels = rng.integers(0, 256, (grid.image_size, grid.image_size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp / "images" / f"{i:03d}.png")
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "cpc_utils", "score", str(bundle), str(tmp / "images"), "--out",
                            str(tmp / "out1"), "--device", args.device], check=True, capture_output=True,
                           cwd=Path(cu.__file__).parent)
            fresh = time.perf_counter() - t0
            r = cu.score_files(bundle, [tmp / "images"], tmp / "out2", device=args.device, progress=False)
            print(f"{name} grid ({grid.image_size} px, {grid.patch_size} px patches at stride {grid.stride}, "
                  f"width {width}, {grid.grid}x{grid.grid} patches, maps {G}x{G}): bundle {bundle.stat().st_size / 2**20:.1f} MiB; "
                  f"{args.images} images: {args.images / fresh:.2f} images/s in a fresh process ({fresh:.1f} s), "
                  f"{args.images / r['seconds']:.2f} images/s in-process ({r['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
