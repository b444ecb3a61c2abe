"""Throughput benchmark of the encoders and CPC-AD: `make bench`.

Measures, in one process, on whatever device is there (cuda, else cpu):
  1. the ceiling: the device's dense matrix-multiply rate (fp32; and bf16 on a GPU);
  2. per encoder, at the paper's patch grid (64 px patches, 7x7) and the demo grid (32 px, 7x7):
     training-step throughput, FLOPs per patch (torch.utils.flop_counter), achieved FLOP/s as a
     fraction of the ceiling, scoring throughput and one-image latency, and peak memory; plus a
     plain torchvision ResNet-18 trunk, the reference of what the machine can do;
  3. CPC-AD end to end on one demo category: four independent direction models against one
     shared encoder with four sets of predictors (epoch time and image AUROC);
  4. scaling: epoch time and peak memory at 25, 50 and 100 training images;
  5. on a GPU only, the paper-resolution epoch (768 px images, 1,225 patches each) for a
     250-image class, extrapolated from a few steps.
Writes results/bench/<device>.json and results/bench/<device>.md (the project's own, for
comparison: results/reference/bench/); the first table of the
markdown states each target with its measured value and pass/fail.

    python scripts/benchmark.py                 # everything, about 5 minutes on 2 CPU cores
    python scripts/benchmark.py --quick         # tiny settings: checks that it runs (tests)
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import math
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # cpc_utils.py without pip install -e
import cpc_utils as cu  # noqa: E402

PAPER_GRID = cu.PatchGrid(256, 64, 32)              # CPC v2 / CPC-AD: 64 px patches, 7x7
DEMO_GRID = cu.PatchGrid(128, 32, 16)               # the demo notebooks: 32 px patches, 7x7
PAPER_RES_GRID = cu.PatchGrid(768, 64, 32, subimage_size=256, subimage_stride=128)  # 25 x 49 patches
MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated() minus memory_allocated() at the start of the block "
            "(tensors held by torch's caching allocator; model and data already on the device)",
    "cpu": "the largest rise of the process's resident set size (psutil, sampled every 5 ms by a "
           "thread) above its value at the start of the block, after gc and glibc malloc_trim(0) "
           "hand freed memory back first; torch's CPU allocator is plain malloc, so RSS is what it "
           "holds (tracemalloc and ru_maxrss cannot see it). Peaks shorter than 5 ms are missed; "
           "glibc arenas can keep some freed memory",
}


@dataclass
class BenchConfig:
    """What to measure and how often. `default_for(device)` and `tiny()` give the two presets."""
    device: str = "auto"
    width: int = 64
    encoders: tuple[str, ...] = tuple(cu.ENCODERS)
    grids: dict[str, cu.PatchGrid] = field(default_factory=lambda: {"paper": PAPER_GRID, "demo": DEMO_GRID})
    batch_images: dict[str, int] = field(default_factory=lambda: {"paper": 2, "demo": 8})
    warmup: int = 1                  # untimed steps before the timed ones
    steps: int = 3                   # timed training steps per row (the fastest is reported)
    score_count: int = 8             # images scored for the scoring throughput
    latency_reps: int = 3            # one-image scoring runs for the latency (the fastest)
    bank_size: int = cu.ScoringConfig.test_negatives
    matmul_size: int = 4096
    matmul_reps: int = 3
    data_root: str = "data/demo"
    category: str = "brick"
    cpcad_grid: str = "demo"         # grid (key of `grids`) for sections 3 and 4
    cpcad_epochs: int = 4
    train_batch: int = cu.TrainConfig.batch_size
    scaling_sizes: tuple[int, ...] = (25, 50, 100)
    paper_res_grid: cu.PatchGrid = field(default_factory=lambda: PAPER_RES_GRID)  # GPU only
    paper_res_images: int = 250      # GPU only: the class size the epoch is extrapolated to
    paper_res_batch: int = cu.TrainConfig.batch_size
    quick: bool = False
    out_dir: str = "results/bench"
    sections: tuple[str, ...] = ("ceiling", "encoders", "cpcad", "scaling", "paper_resolution")

    @classmethod
    def default_for(cls, target: torch.device, **kw) -> "BenchConfig":
        """A GPU gets the training batch size (16 images) everywhere and bigger matrices."""
        if target.type == "cuda":
            kw = {"batch_images": {"paper": 16, "demo": 16}, "warmup": 2, "steps": 5, "score_count": 64,
                  "matmul_size": 8192, "matmul_reps": 10, "cpcad_epochs": 10, **kw}
        return cls(**kw)

    @classmethod
    def tiny(cls, **kw) -> "BenchConfig":
        """Tiny settings that run every code path in seconds (width 8, 16 px patches on 32 px)."""
        tiny = {"paper": cu.PatchGrid(32, 16, 4), "demo": cu.PatchGrid(40, 16, 8)}
        return cls(**{"width": 8, "grids": tiny, "batch_images": {"paper": 2, "demo": 2}, "warmup": 0, "steps": 1,
                      "score_count": 2, "latency_reps": 1, "bank_size": 64, "matmul_size": 256, "matmul_reps": 1,
                      "cpcad_epochs": 2, "train_batch": 4, "scaling_sizes": (4, 8),
                      "paper_res_grid": cu.PatchGrid(48, 16, 8, 40, 8), "paper_res_images": 4,
                      "paper_res_batch": 1, "quick": True, **kw})


# ---- measuring -----------------------------------------------------------------------
# Clocks that wait for the device, a FLOP counter, and peak memory on CPU and CUDA.

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], warmup: int, reps: int, device: torch.device) -> list[float]:
    """Wall seconds of `reps` calls of `fn` after `warmup` untimed ones, waiting for the device."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call (matmuls and convolutions, forward and backward; 2 per multiply-add)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _malloc_trim() -> bool:
    """Hand glibc's freed heap memory back to the OS, so RSS starts from what is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):  # not glibc (macOS, musl): recorded in the JSON's meta
        return False


class PeakMemory:
    """Peak memory of a `with` block above what was in use when it began: `.peak` bytes.

    How it is measured on each device type is MEMORY_METHOD; on other devices `.peak` is None.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.005):
        self.device, self.interval_s, self.peak = device, interval_s, None

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.device.type == "cpu":
            import psutil  # a dependency of ipykernel, hence of requirements.txt
            _malloc_trim()
            self._proc = psutil.Process()
            self._base = self._max = self._proc.memory_info().rss
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._max = max(self._max, self._proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self.device.type == "cpu":
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, self._proc.memory_info().rss) - self._base


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> dict:
    """Dense (n x n) @ (n x n) rate in FLOP/s: the fastest of `reps` products after one warm-up."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = time_calls(lambda: a @ b, 1, reps, device)
    return {"flops_per_s": 2 * n ** 3 / min(times), "n": n, "times_s": times}


# ---- the training step ---------------------------------------------------------------
# The body of cu.train_model's loop, for timing single steps: bf16 autocast on CUDA only,
# Adam, and the loss read back every step (a device sync on a GPU, as in train_model).

def train_step(model: nn.Module, opt: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor],
               device: torch.device) -> float:
    with cu.autocast(device):
        loss = loss_fn()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def forward_backward(model: nn.Module, loss_fn: Callable[[], torch.Tensor], device: torch.device) -> None:
    """One step without the optimizer: what the FLOP counter sees."""
    with cu.autocast(device):
        loss = loss_fn()
    loss.backward()
    model.zero_grad(set_to_none=True)


def random_images(n: int, size: int, device: torch.device | str = "cpu", seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) uint8 noise: the content does not change the work of a step."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g).to(device)


def measure_step(model: nn.Module, loss_fn: Callable[[], torch.Tensor], patches: int, cfg: BenchConfig,
                 device: torch.device, ceiling: dict) -> dict:
    """Time `cfg.steps` training steps, count their FLOPs and peak memory: one table row."""
    opt = torch.optim.Adam(model.parameters(), lr=cu.TrainConfig.lr)
    with PeakMemory(device) as mem:
        times = time_calls(lambda: train_step(model, opt, loss_fn, device), cfg.warmup, cfg.steps, device)
    flops = count_flops(lambda: forward_backward(model, loss_fn, device))
    step_s = min(times)
    dtype = "bf16" if device.type == "cuda" else "fp32"
    row = {"patches_per_step": patches, "step_s": step_s, "step_times_s": times,
           "patches_per_s": patches / step_s, "flops_per_patch": flops / patches,
           "achieved_flops_per_s": flops / step_s, "ceiling_dtype": dtype,
           "fraction_of_ceiling": flops / step_s / ceiling[dtype]["flops_per_s"] if dtype in ceiling else None,
           "peak_train_bytes": mem.peak}
    del opt
    return row


# ---- sections ------------------------------------------------------------------------

def bench_ceiling(cfg: BenchConfig, device: torch.device) -> dict:
    """fp32 everywhere; bf16 too on a GPU (matmul precision left at torch's default)."""
    out = {"fp32": matmul_rate(device, torch.float32, cfg.matmul_size, cfg.matmul_reps)}
    if device.type == "cuda":
        out["fp32"]["float32_matmul_precision"] = torch.get_float32_matmul_precision()  # "highest": no TF32
        out["bf16"] = matmul_rate(device, torch.bfloat16, cfg.matmul_size, cfg.matmul_reps)
    return out


def reference_trunk() -> nn.Module:
    """torchvision's ResNet-18 cut after its third stage (BatchNorm, as shipped), channels_last."""
    import torchvision
    r = torchvision.models.resnet18()
    trunk = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3)
    return trunk.to(memory_format=torch.channels_last)


def bench_reference(grid_name: str, cfg: BenchConfig, device: torch.device, ceiling: dict) -> dict:
    grid, B = cfg.grids[grid_name], cfg.batch_images[grid_name]
    n = B * grid.num_subimages ** 2 * grid.grid ** 2
    torch.manual_seed(0)
    model = reference_trunk().to(device)
    x = torch.randn(n, 3, grid.patch_size, grid.patch_size, device=device).contiguous(memory_format=torch.channels_last)
    row = {"model": "torchvision resnet18 trunk (BatchNorm)", "grid": grid_name, "patch_size": grid.patch_size,
           "batch_images": B, **measure_step(model, lambda: model(x).float().mean(), n, cfg, device, ceiling)}
    return row


def bench_encoder(name: str, grid_name: str, cfg: BenchConfig, device: torch.device, ceiling: dict) -> dict:
    """One CPC-AD model (shared encoder, default config): training step, scoring, memory."""
    grid, B = cfg.grids[grid_name], cfg.batch_images[grid_name]
    torch.manual_seed(0)
    model = cu.CPCAD(cu.CPCADConfig(encoder=name, width=cfg.width), grid).to(device)
    images = random_images(B, grid.image_size, device)
    g = torch.Generator().manual_seed(0)
    patches = B * grid.num_subimages ** 2 * grid.grid ** 2
    model.train()
    row = {"encoder": name, "grid": grid_name, "patch_size": grid.patch_size, "batch_images": B,
           "params": cu.count_parameters(model),
           **measure_step(model, lambda: model.loss(cu.to_float(images), g)["loss"], patches, cfg, device, ceiling)}
    row.update(bench_scoring(model, grid, cfg, device))
    return row


def bench_scoring(model: cu.CPCAD, grid: cu.PatchGrid, cfg: BenchConfig, device: torch.device) -> dict:
    """Bank of train patches, then cu.score_images: images/s over a batch, and one image alone."""
    train = random_images(max(4, cfg.bank_size // (grid.grid ** 2 * grid.num_subimages ** 2) + 1), grid.image_size)
    test = random_images(cfg.score_count, grid.image_size, seed=1)
    model.eval()
    t0 = time.perf_counter()
    bank = model.build_bank(train, cfg.bank_size)
    sync(device)
    bank_s = time.perf_counter() - t0
    score_grid = cu.ScoringConfig().score_grid(grid)  # the default's dense maps
    one = lambda: cu.score_images(model, test[:1], bank, device=device, grid=score_grid)
    latency = time_calls(one, 1, cfg.latency_reps, device)
    with PeakMemory(device) as mem:
        batch = time_calls(lambda: cu.score_images(model, test, bank, device=device, grid=score_grid), 0, 1, device)
    return {"bank_s": bank_s, "bank_size": bank.shape[1], "score_latency_s": min(latency),
            "score_latency_times_s": latency, "score_images": cfg.score_count,
            "score_images_per_s": cfg.score_count / batch[0], "peak_score_bytes": mem.peak}


def load_demo(cfg: BenchConfig) -> dict[str, cu.ImageSet]:
    """The demo category at the CPC-AD grid's image size (written first if it is missing)."""
    root = Path(cfg.data_root)
    if not (root / cfg.category / "train" / "good").is_dir():
        print(f"==> writing the demo data to {root} (it was not there)")
        cu.make_demo_dataset(root)
    return cu.load_category(root, cfg.category, image_size=cfg.grids[cfg.cpcad_grid].image_size)


def train_and_time(model: cu.CPCAD, train: cu.ImageSet, epochs: int, cfg: BenchConfig,
                   device: torch.device) -> tuple[list[dict], int | None]:
    """cu.train_model without validation; returns its history and the peak memory of the run."""
    tcfg = cu.TrainConfig(epochs=epochs, batch_size=cfg.train_batch, device=str(device), seed=0)
    with PeakMemory(device) as mem:
        history = cu.train_model(model, train, None, tcfg, progress=False)
    return history, mem.peak


def epoch_seconds(history: list[dict]) -> float:
    """The fastest epoch after the first (which pays for first-call allocations and autotuning)."""
    secs = [h["seconds"] for h in history]
    return min(secs[1:] if len(secs) > 1 else secs)


def bench_cpcad(data: dict[str, cu.ImageSet], cfg: BenchConfig, device: torch.device) -> dict:
    """Four independent direction models against one shared encoder: epoch time and AUROC, each
    a run of notebook 02's pipeline (`cu.run_cpcad`) scored as pure CPC-AD (the paper's loss map,
    mean reduction), with early stopping off (patience = epochs)."""
    import contextlib
    import io
    import tempfile
    grid = cfg.grids[cfg.cpcad_grid]
    runs = {}
    n_dir = len(cu.CPCADConfig().directions)
    # the third run gives the shared encoder as many epochs as fit in the independent models' time
    for label, shared, epochs in (("independent", False, cfg.cpcad_epochs), ("shared", True, cfg.cpcad_epochs),
                                  ("shared, same time", True, n_dir * cfg.cpcad_epochs)):
        with tempfile.TemporaryDirectory() as tmp, PeakMemory(device) as mem, \
                contextlib.redirect_stdout(io.StringIO()):
            r = cu.run_cpcad(data_root=cfg.data_root, category=cfg.category, image_size=grid.image_size,
                             patch_size=grid.patch_size, stride=grid.stride, subimage_size=grid.subimage_size,
                             subimage_stride=grid.subimage_stride, width=cfg.width, shared_encoder=shared,
                             epochs=epochs, patience=epochs, batch_size=cfg.train_batch, device=str(device),
                             detector="cpcad", reduce="mean", test_negatives=cfg.bank_size, num_heatmaps=1,
                             output_dir=str(Path(tmp) / "run"), progress=False)
        m, history, sizes = r.record, r.history, (len(r.data.train), len(r.data.calib), len(r.data.test))
        runs[label] = {"encoders": len(r.model.encoders), "params": m.num_parameters, "epochs": epochs,
                       "epoch_s": epoch_seconds(history), "epoch_times_s": [h["seconds"] for h in history],
                       "train_loss": [h["train_loss"] for h in history], "train_s": m.train_wall_seconds,
                       "bank_and_score_s": m.score_seconds, "peak_run_bytes": mem.peak,
                       "image_auroc": m.test["image_auroc"], "pixel_auroc": m.test["pixel_auroc"]}
        print(f"    {label}: {runs[label]['epoch_s']:.2f} s/epoch, image AUROC {m.test['image_auroc']:.3f}")
    ind, sh = runs["independent"], runs["shared"]
    return {"category": cfg.category, "grid": cfg.cpcad_grid, "epochs": cfg.cpcad_epochs,
            "batch_size": cfg.train_batch, "train_images": sizes[0], "calibration_images": sizes[1],
            "test_images": sizes[2],
            "runs": runs, "speedup": ind["epoch_s"] / sh["epoch_s"],
            "auroc_drop": ind["image_auroc"] - sh["image_auroc"]}


def bench_scaling(data: dict[str, cu.ImageSet], cfg: BenchConfig, device: torch.device) -> dict:
    """Epoch time and peak memory of the shared model at each training-set size (3 epochs, the
    fastest after the first timed). Sizes above the category's train set repeat its images in order."""
    grid, train = cfg.grids[cfg.cpcad_grid], data["train"]
    rows = []
    for n in cfg.scaling_sizes:
        cu.seed_everything(0)
        model = cu.CPCAD(cu.CPCADConfig(width=cfg.width), grid)
        subset = train.subset(torch.arange(n) % len(train))
        history, peak = train_and_time(model, subset, 3, cfg, device)
        rows.append({"train_images": n, "steps_per_epoch": math.ceil(n / cfg.train_batch),
                     "epoch_s": epoch_seconds(history), "epoch_times_s": [h["seconds"] for h in history],
                     "s_per_image": epoch_seconds(history) / n, "peak_train_bytes": peak})
        print(f"    {n} images: {rows[-1]['epoch_s']:.2f} s/epoch")
    per_image = [r["s_per_image"] for r in rows]
    peaks = [r["peak_train_bytes"] for r in rows]
    return {"grid": cfg.cpcad_grid, "category": cfg.category, "repeats_images": max(cfg.scaling_sizes) > len(train),
            "rows": rows, "time_per_image_spread": max(per_image) / min(per_image),
            "memory_growth": peaks[-1] / peaks[0] if peaks[0] else None}


def bench_paper_resolution(cfg: BenchConfig, device: torch.device, ceiling: dict) -> list[dict]:
    """GPU: a few training steps at 768 px (1,225 patches per image), extrapolated to an epoch
    of `paper_res_images` images as images / (measured images per second). A batch that does
    not fit is halved until one does; the table names the batches that ran out of memory."""
    grid = cfg.paper_res_grid
    per_image = grid.num_subimages ** 2 * grid.grid ** 2
    rows = []
    for name in cfg.encoders:
        row, B = {"encoder": name, "patches_per_image": per_image, "oom_batches": []}, cfg.paper_res_batch
        while B >= 1 and "step_s" not in row:
            try:
                row.update(_paper_resolution_step(name, grid, B, cfg, device, ceiling))
            except torch.cuda.OutOfMemoryError:
                row["oom_batches"].append(B)
                B //= 2
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if "step_s" in row:
            row["epoch_s_extrapolated"] = cfg.paper_res_images * row["step_s"] / row["batch_images"]
            print(f"    {name}: {row['epoch_s_extrapolated']:.1f} s/epoch (extrapolated from batch {B})")
        else:
            row["error"] = "out of memory even at one image per step"
            print(f"    {name}: {row['error']}")
        rows.append(row)
    return rows


def _paper_resolution_step(name: str, grid: cu.PatchGrid, B: int, cfg: BenchConfig, device: torch.device,
                           ceiling: dict) -> dict:
    torch.manual_seed(0)
    model = cu.CPCAD(cu.CPCADConfig(encoder=name, width=cfg.width), grid).to(device).train()
    images = random_images(B, grid.image_size, device)
    g = torch.Generator().manual_seed(0)
    patches = B * grid.num_subimages ** 2 * grid.grid ** 2
    loss_fn = lambda: model.loss(cu.to_float(images), g)["loss"]
    return {"batch_images": B, **measure_step(model, loss_fn, patches, cfg, device, ceiling)}


# ---- targets and report --------------------------------------------------------------

def _find(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def targets(res: dict, device: torch.device) -> list[dict]:
    """The issue's targets: name, threshold, measured value, pass (None when not measured)."""
    out = []

    def add(name, target, measured, passed, fmt="{:.3g}"):
        out.append({"name": name, "target": target, "measured": measured,
                    "measured_text": "not measured" if measured is None else fmt.format(measured),
                    "passed": None if measured is None else bool(passed)})

    enc = res.get("encoders", [])
    if device.type == "cuda":
        r = _find(res.get("paper_resolution") or [], encoder="resnet18v2")
        f = r.get("fraction_of_ceiling") if r else None
        add("resnet18v2 training step at paper resolution, fraction of the bf16 matmul rate", ">= 0.30",
            f, f is not None and f >= 0.30, "{:.0%}")
    else:
        r = _find(enc, encoder="resnet18v2", grid="paper")
        f = r.get("fraction_of_ceiling") if r else None
        add("resnet18v2 training step at 64 px patches, fraction of the fp32 matmul rate", ">= 0.60",
            f, f is not None and f >= 0.60, "{:.0%}")
    c = res.get("cpcad")
    s = c["speedup"] if c else None
    add("CPC-AD epoch: four independent models / shared encoder", ">= 3x", s, s is not None and s >= 3, "{:.2f}x")
    d = c["auroc_drop"] if c else None
    add("image AUROC: independent minus shared", "<= 0.02", d, d is not None and d <= 0.02, "{:+.3f}")
    r = _find(enc, encoder="resnet18v2", grid="paper")
    lat = r.get("score_latency_s") if r else None
    add("scoring one 256 px image (resnet18v2, 49 patches, four directions)", "<= 0.25 s", lat,
        lat is not None and lat <= 0.25, "{:.3f} s")
    sc = res.get("scaling")
    sp = sc["time_per_image_spread"] if sc else None
    add("scaling: epoch time linear in images (max/min seconds per image)", "<= 1.25", sp,
        sp is not None and sp <= 1.25, "{:.2f}")
    mg = sc["memory_growth"] if sc else None
    add("scaling: peak memory flat (largest / smallest training set)", "<= 1.25", mg,
        mg is not None and mg <= 1.25, "{:.2f}")
    return out


def _mb(b) -> str:
    return "" if b is None else f"{b / 2 ** 20:.0f}"


def _g(x, fmt="{:.3g}") -> str:
    return "" if x is None else fmt.format(x)


def _list(xs: list) -> str:
    return ", ".join(map(str, xs))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(res: dict) -> str:
    m = res["meta"]
    dtype = "bf16" if m["device"] == "cuda" else "fp32"
    lines = [f"# Benchmark on {m['device_name']} ({m['device']})", "",
             f"torch {m['torch']}, {m['threads']} threads, commit {m['commit']}, {m['date']}, "
             f"{m['seconds']:.0f} s in all" + (" (**--quick: tiny settings, numbers mean nothing**)" if m["quick"] else "")
             + f". Load average (1 min) {_g(m['load_start'], '{:.1f}')} at the start, {_g(m['load_end'], '{:.1f}')} "
             "at the end: other work on the machine slows every number here, so compare it with the thread "
             "count and re-run `make bench` on a quiet machine. Each timing is the fastest of its timed "
             "repetitions after warm-up (the one least disturbed by other work).", "", "## Targets", ""]
    lines += _table(["target", "threshold", "measured", "pass"],
                    [[t["name"], t["target"], t["measured_text"],
                      "n/a" if t["passed"] is None else ("pass" if t["passed"] else "**FAIL**")] for t in res["targets"]])
    if "ceiling" in res:
        lines += ["", "## Ceiling: dense matrix multiply", ""]
        lines += _table(["dtype", "size", "TFLOP/s"], [[k, f"{v['n']}^3", f"{v['flops_per_s'] / 1e12:.3f}"]
                                                       for k, v in res["ceiling"].items()])
    if res.get("encoders"):
        lines += ["", f"## Encoders: training step and scoring (width {m['config']['width']})", "",
                  "One CPC-AD model (shared encoder, default CPCADConfig) per row: a training step is "
                  "cu.train_model's (forward, InfoNCE in four directions, backward, Adam). FLOPs are "
                  "torch.utils.flop_counter's (matmuls and convolutions, forward + backward; norms and "
                  f"elementwise ops not counted), and the fraction is of the {dtype} matmul ceiling. "
                  "Scoring is cu.score_images against a bank of "
                  f"{res['encoders'][0]['bank_size']} train patches (bank build time separate). "
                  "The reference rows are torchvision's ResNet-18 cut after stage 3 (BatchNorm) on the "
                  "same number of patches.", ""]
        rows = []
        for r in res["encoders"] + res.get("reference", []):
            rows.append([r.get("encoder", r.get("model")), f"{r['grid']} ({r['patch_size']} px)",
                         str(r["patches_per_step"]), f"{r['step_s']:.3f}", f"{r['patches_per_s']:.0f}",
                         f"{r['flops_per_patch'] / 1e9:.3f}", f"{r['achieved_flops_per_s'] / 1e9:.1f}",
                         _g(r["fraction_of_ceiling"], "{:.0%}"), _mb(r["peak_train_bytes"]),
                         _g(r.get("score_images_per_s"), "{:.1f}"), _g(r.get("score_latency_s"), "{:.3f}"),
                         _g(r.get("bank_s"), "{:.2f}"), _mb(r.get("peak_score_bytes"))])
        lines += _table(["model", "grid", "patches/step", "step s", "patches/s", "GFLOP/patch", "GFLOP/s",
                         f"of {dtype} ceiling", "train peak MB", "score img/s", "1-image score s", "bank s",
                         "score peak MB"], rows)
    c = res.get("cpcad")
    if c:
        lines += ["", f"## CPC-AD end to end: {c['category']}, {c['grid']} grid", "",
                  f"Notebook 02's pipeline (cu.run_cpcad) for {c['epochs']} epochs on {c['train_images']} train/good "
                  f"images (batch {c['batch_size']}; the validation loss on {c.get('calibration_images', '?')} held-out "
                  f"normals, no early stopping), scored as pure CPC-AD (the paper's loss map, mean) on "
                  f"{c['test_images']} test images. Epoch time: the fastest after the first epoch, validation "
                  "included; peak MB: the whole run.", ""]
        lines += _table(["model", "encoders", "params", "epochs", "epoch s", "image AUROC", "pixel AUROC",
                         "run peak MB"],
                        [[k, str(r["encoders"]), f"{r['params'] / 1e6:.2f} M", str(r.get("epochs", c["epochs"])),
                          f"{r['epoch_s']:.2f}",
                          f"{r['image_auroc']:.3f}", f"{r['pixel_auroc']:.3f}",
                          _mb(r.get("peak_run_bytes", r.get("peak_train_bytes")))]
                         for k, r in c["runs"].items()])
        lines += ["", f"Shared is {c['speedup']:.2f}x faster per epoch; at equal epochs its image AUROC is "
                      f"{-c['auroc_drop']:+.3f} against the independent models'."]
        same = c["runs"].get("shared, same time")
        if same:
            lines += [f"Given the independent models' training time ({same['epochs']} epochs), the shared "
                      f"encoder's image AUROC is {same['image_auroc'] - c['runs']['independent']['image_auroc']:+.3f} "
                      "against theirs (not a target; it says what the speed-up buys)."]
    sc = res.get("scaling")
    if sc:
        lines += ["", f"## Scaling: shared resnet18v2, {sc['grid']} grid", "",
                  "The fastest of epochs 2 and 3; peak memory over all three." +
                  (" Sets larger than the category's train set repeat its images." if sc["repeats_images"] else ""), ""]
        lines += _table(["train images", "steps/epoch", "epoch s", "ms/image", "train peak MB"],
                        [[str(r["train_images"]), str(r["steps_per_epoch"]), f"{r['epoch_s']:.2f}",
                          f"{1e3 * r['s_per_image']:.1f}", _mb(r["peak_train_bytes"])] for r in sc["rows"]])
    pr = res.get("paper_resolution")
    if pr:
        lines += ["", f"## Paper resolution ({m['config']['paper_res_grid']['image_size']} px, "
                      f"{pr[0]['patches_per_image']} patches per image)", "",
                  f"{m['config']['steps']} timed training steps (after {m['config']['warmup']} warm-up) of "
                  f"{m['config']['paper_res_batch']} images, or half that until it fits in memory, "
                  f"**extrapolated** to one epoch of {m['config']['paper_res_images']} images "
                  "(images / measured images per s).", ""]
        lines += _table(["encoder", "images/step", "out of memory at", "patches/step", "step s", "patches/s",
                         "GFLOP/patch", f"of {dtype} ceiling", "train peak MB", "epoch s (extrapolated)"],
                        [[r["encoder"], "", _list(r["oom_batches"]), r["error"], "", "", "", "", "", ""]
                         if "error" in r else
                         [r["encoder"], str(r["batch_images"]), _list(r["oom_batches"]), str(r["patches_per_step"]),
                          f"{r['step_s']:.3f}", f"{r['patches_per_s']:.0f}", f"{r['flops_per_patch'] / 1e9:.3f}",
                          _g(r["fraction_of_ceiling"], "{:.0%}"), _mb(r["peak_train_bytes"]),
                          f"{r['epoch_s_extrapolated']:.1f}"] for r in pr])
    elif m["device"] != "cuda":
        lines += ["", "Paper-resolution epoch: measured on a GPU only."]
    lines += ["", "## How memory is measured", "",
              "Peak memory: " + MEMORY_METHOD.get(m["device"], "not measured on this device") + "."]
    return "\n".join(lines) + "\n"


# ---- running -------------------------------------------------------------------------

def _meta(cfg: BenchConfig, device: torch.device) -> dict:
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    config = dataclasses.asdict(cfg)  # grids become dicts of their fields
    return {"device": device.type, "device_name": name, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M"),
            "python": platform.python_version(), "quick": cfg.quick, "config": config,
            "memory_method": MEMORY_METHOD.get(device.type, "not measured on this device"),
            "malloc_trim": _malloc_trim() if device.type == "cpu" else None}


def _load() -> float | None:
    """The 1-minute load average (None where the OS has none): how busy the machine was."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x {torch.get_num_threads()} threads"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(cfg: BenchConfig) -> dict:
    """Measure every section in `cfg.sections`, write <out_dir>/<device>.json and .md, return the results."""
    t_start, load_start = time.perf_counter(), _load()
    device = cu.resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as cu.train_model sets it
    res: dict = {}
    if "ceiling" in cfg.sections or "encoders" in cfg.sections or "paper_resolution" in cfg.sections:
        print("==> ceiling")
        res["ceiling"] = bench_ceiling(cfg, device)
        print("    " + ", ".join(f"{k} {v['flops_per_s'] / 1e9:.1f} GFLOP/s" for k, v in res["ceiling"].items()))
    if "encoders" in cfg.sections:
        res["encoders"], res["reference"] = [], []
        for grid_name in cfg.grids:
            print(f"==> reference trunk, {grid_name} grid")
            res["reference"].append(bench_reference(grid_name, cfg, device, res["ceiling"]))
            for name in cfg.encoders:
                print(f"==> {name}, {grid_name} grid")
                row = bench_encoder(name, grid_name, cfg, device, res["ceiling"])
                res["encoders"].append(row)
                print(f"    {row['patches_per_s']:.0f} patches/s, {_g(row['fraction_of_ceiling'], '{:.0%}')} of "
                      f"ceiling, scoring {row['score_images_per_s']:.1f} img/s, one image {row['score_latency_s']:.3f} s")
            print(f"    reference: {res['reference'][-1]['patches_per_s']:.0f} patches/s, "
                  f"{_g(res['reference'][-1]['fraction_of_ceiling'], '{:.0%}')} of ceiling")
    if "cpcad" in cfg.sections or "scaling" in cfg.sections:
        data = load_demo(cfg)
        if "cpcad" in cfg.sections:
            print(f"==> CPC-AD on {cfg.category}: independent vs shared")
            res["cpcad"] = bench_cpcad(data, cfg, device)
        if "scaling" in cfg.sections:
            print("==> scaling")
            res["scaling"] = bench_scaling(data, cfg, device)
    if "paper_resolution" in cfg.sections and (device.type == "cuda" or cfg.quick):
        print("==> paper resolution")
        res["paper_resolution"] = bench_paper_resolution(cfg, device, res["ceiling"])
    res["targets"] = targets(res, device)
    res = {"meta": {**_meta(cfg, device), "seconds": time.perf_counter() - t_start, "load_start": load_start,
                    "load_end": _load()}, **res}
    out = Path(cfg.out_dir)
    cu.save_json(res, out / f"{device.type}.json")
    (out / f"{device.type}.md").write_text(markdown(res))
    print(f"==> {out / device.type}.json and .md in {res['meta']['seconds']:.0f} s")
    for t in res["targets"]:
        print(f"    {'n/a ' if t['passed'] is None else 'pass' if t['passed'] else 'FAIL'}  {t['name']}: "
              f"{t['measured_text']} (target {t['target']})")
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="tiny settings (width 8, 16 px patches, 1 step)")
    p.add_argument("--data-root", default="data/demo")
    p.add_argument("--category", default="brick", choices=list(cu.DEMO_CATEGORIES))
    p.add_argument("--out-dir", default="results/bench")
    p.add_argument("--sections", nargs="*", default=list(BenchConfig.sections),
                   choices=list(BenchConfig.sections))
    p.add_argument("--encoders", nargs="*", default=list(cu.ENCODERS), choices=list(cu.ENCODERS))
    p.add_argument("--steps", type=int, help="timed training steps per row")
    p.add_argument("--cpcad-epochs", type=int, help="epochs of the CPC-AD comparison")
    a = p.parse_args(argv)
    kw = {"device": a.device, "data_root": a.data_root, "category": a.category, "out_dir": a.out_dir,
          "sections": tuple(a.sections), "encoders": tuple(a.encoders)}
    kw.update({k: v for k, v in (("steps", a.steps), ("cpcad_epochs", a.cpcad_epochs)) if v is not None})
    cfg = BenchConfig.tiny(**kw) if a.quick else BenchConfig.default_for(cu.resolve_device(a.device), **kw)
    return run(cfg)


if __name__ == "__main__":
    main()
