"""One resumable training loop for CPC and CPC-AD: Adam, early stopping on the validation loss,
an atomic checkpoint every epoch, a time budget, and DistributedDataParallel under torchrun."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .files import save_atomic, save_json
from .data import ImageSet
from .checks import ParameterError, check_param
from .patches import to_float
from .devices import PRECISIONS, _any_rank, _distributed, _mean_over_ranks, autocast, resolve_device, resolve_precision
from .runs import RESUMABLE_CHANGES, RESUMABLE_TRAIN, RunBlocked, fingerprint_diff, load_checkpoint


# One loop for CPC and CPC-AD: Adam, early stopping on validation loss, an atomic checkpoint
# after every epoch with the RNG states, so an interrupted run resumes to the same weights.

@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 16          # images per step; each gives n_sub * G * G patches
    lr: float = 2e-4
    weight_decay: float = 0.0
    patience: int = 5             # epochs without a better validation loss before stopping
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"       # auto | bf16 | fp16 | fp32, see resolve_precision
    time_budget: float | None = None  # seconds this call may train; stops at an epoch boundary before it

    def __post_init__(self):
        for name in ("epochs", "batch_size", "patience"):
            check_param(name, getattr(self, name), "int", low=1)
        check_param("lr", self.lr, "float", low=0)  # 0 keeps the initial weights (a random-init reference)
        if not math.isfinite(self.lr):  # nan passes every comparison above
            raise ParameterError(f"lr={self.lr!r}: must be a finite number")
        check_param("weight_decay", self.weight_decay, "float", low=0)
        check_param("seed", self.seed, "int", low=0)
        check_param("device", self.device, "str")
        check_param("precision", self.precision, "str", choices=PRECISIONS)
        check_param("time_budget", self.time_budget, "float", low=0, open_low=True, optional=True)


class TimeBudgetReached(RuntimeError):
    """Training stopped at an epoch boundary because the next epoch would not fit in the time
    budget (a Kaggle session's 12 hours, a cluster job's limit); the checkpoint is kept."""


def parse_duration(value: str | float | int | None) -> float | None:
    """Seconds from 3600, "90s", "30m", "11h" or "1h30m"; None stays None."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if value is None else float(value)
    import re
    text = str(value).strip().lower()
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?", text)
    if not text or parts is None:
        raise ParameterError(f"time_budget={value!r}: expected seconds or a duration such as 90s, 30m, 11h, 1h30m")
    h, m, sec = (float(x) if x else 0.0 for x in parts.groups())
    return h * 3600 + m * 60 + sec


def _batches(n: int, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


@torch.no_grad()
def validation_loss(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device,
                    seed: int = 0, precision: str = "auto") -> float:
    """Mean training objective on held-out images, with a fixed negative sample (repeatable)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for idx in _batches(len(images), batch_size, None):
        with autocast(device, precision):
            total += model.loss(to_float(images[idx].to(device, non_blocking=True)), g)["loss"].item() * len(idx)
        n += len(idx)
    return total / n


NEGATIVES_SEED_OFFSET = 1_000_003  # the negatives' generator: seed + this, a stream apart from the batch order


def _rng_state() -> dict:
    """The global RNG states as tensors and plain types (what weights_only=True reads back):
    torch's (CPU and each CUDA device), numpy's and python's, for an exact resume of code (a
    model, an on_epoch hook) that draws from them."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy_rng": {"name": name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python_rng": {"version": version, "keys": list(keys), "gauss": gauss}}


def _set_rng_state(state: dict) -> None:
    """Restore what `_rng_state` saved (a checkpoint of older code has the torch CPU state only)."""
    torch.set_rng_state(state["torch_rng"].cpu())
    if state.get("cuda_rng") and torch.cuda.is_available() and len(state["cuda_rng"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
    if "numpy_rng" in state:
        n = state["numpy_rng"]
        np.random.set_state((n["name"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    if "python_rng" in state:
        py = state["python_rng"]
        random.setstate((py["version"], tuple(py["keys"]), py["gauss"]))


def train_model(model: nn.Module, train: ImageSet, val: ImageSet | None, cfg: TrainConfig,
                checkpoint_dir: str | os.PathLike | None = None, resume: bool = False,
                progress: bool = True, on_epoch: Callable[[nn.Module, int], dict] | None = None,
                fingerprint: dict | None = None) -> list[dict]:
    """Train `model` (CPC or CPCAD) with Adam; returns the history, one dict per epoch.

    Checkpoints `last.pt` (and a small `progress.json`: epoch, losses, seconds) after every
    epoch and `best.pt` on every better validation loss;
    at the end the best weights are loaded (without `checkpoint_dir`, from a CPU copy kept
    in memory). `resume=True` continues from `last.pt`
    (epochs counts the total). A non-finite loss raises FloatingPointError and leaves the
    last good checkpoint in place. `on_epoch(model, epoch)`, if given, runs after each epoch's
    validation and its dict is added to that epoch's record (e.g. detection on the synthetic
    validation anomalies, to study how long to train). `fingerprint` (`run_fingerprint`) is
    stored in the checkpoint; resuming from one whose fingerprint differs (other than in
    `epochs`) is an error naming the differing fields.

    Precision: `cfg.precision` (resolve_precision: "auto" picks bf16, fp16 or fp32 by device);
    fp16 trains with a gradient scaler (torch.amp.GradScaler), whose state is checkpointed and
    restored on resume. Each epoch's record names the precision used. `cfg.time_budget`: before
    each epoch, if the slowest epoch so far would overrun the budget, the last checkpoint is
    kept and TimeBudgetReached is raised; resume=True continues from there.

    Under torchrun (torch.distributed initialised, see `init_distributed`): each of the N
    processes trains on its share of every batch (images i, i + N, ...; negatives come from
    that share), DistributedDataParallel all-reduces the gradients, the logged losses are
    averaged over processes, and rank 0 alone writes checkpoints. A global batch smaller than
    N is skipped. Resume works with another N: the checkpoint holds the model, the optimizer
    and the batch-order generator, none of which depends on N (the negatives drawn do: they
    come from a generator of their own, so a share of another size never shifts the batch order).
    A checkpoint holds tensors and plain types only and is read with weights_only=True
    (`load_checkpoint`).
    """
    budget = _TimeBudget(cfg.time_budget)  # its clock starts now: moving data and resuming count
    dist = _Distribution(*_distributed())
    _check_negatives(model, cfg.batch_size // dist.world, len(train))
    device = dist.place(cfg.device)
    precision = _Precision(cfg.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model.to(device)
    run = _Run(model, cfg, precision, dist)
    ckpt = _Checkpointer(checkpoint_dir, dist.rank)
    if resume and ckpt.has_last():
        _resume(run, ckpt.folder, fingerprint, device)
    else:
        ckpt.clear_stale()
    run.net = dist.wrap(model)  # after a resume: DDP starts every process from rank 0's weights
    images = train.images.to(device)  # decoded once; one host->device copy for the whole run
    val_images = val.images.to(device) if val is not None and len(val) else None
    bar = tqdm(range(run.start, cfg.epochs), desc="train", disable=not progress, initial=run.start, total=cfg.epochs)
    for epoch in bar:
        if run.stopping.exhausted:
            break
        if budget.reached(epoch, run.start, run.history, dist):
            bar.close()
            raise TimeBudgetReached(budget.message(epoch, cfg.epochs, _kept(ckpt.folder)))
        t0 = time.perf_counter()
        record = run.train_epoch(images, epoch, ckpt.folder)
        if val_images is not None:
            record["val_loss"] = validation_loss(model, val_images, cfg.batch_size, device, cfg.seed + 1,
                                                 precision.name)
            if run.stopping.improved(record["val_loss"]):
                ckpt.keep_best(model, epoch + 1)
        record["seconds"] = time.perf_counter() - t0
        if on_epoch is not None:
            record.update(on_epoch(model, epoch + 1))
        run.history.append(record)
        bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                        **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
        if ckpt.writes:
            ckpt.save_epoch(run.checkpoint(epoch + 1, fingerprint), record, cfg.epochs)
    dist.barrier()  # rank 0's best.pt is complete before anyone reads it
    ckpt.load_best(model, device)
    model.eval()
    return run.history


# ---- the parts of train_model, one concern each --------------------------------------
# In the order train_model meets them: the processes, the precision, the state an epoch
# updates (and a checkpoint holds), early stopping, the time budget, the files, resume.

class _Distribution:
    """This process's place under torchrun, (rank, world) = (0, 1) when alone, and every step that
    involves the other processes, so that the loop reads the same for one process or N."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.device: torch.device | None = None

    def place(self, device: str) -> torch.device:
        """The device this process trains on: one GPU per process under torchrun."""
        self.device = resolve_device(device)
        if self.world > 1 and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return self.device

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel (all-reducing the gradients) when there are other processes."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def share(self, idx: torch.Tensor) -> torch.Tensor | None:
        """This process's images of a global batch (i, i + N, ...); None when the batch is too
        small to give every process one, so that all of them skip it."""
        return idx[self.rank::self.world] if len(idx) >= self.world else None

    def mean(self, value: float) -> float:
        return _mean_over_ranks(value, self.world, self.device)

    def any(self, flag: bool) -> bool:
        """True on every process if on one: they stop at the same epoch."""
        return _any_rank(flag, self.world, self.device)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


class _Precision:
    """The precision a run computes in (resolve_precision: "auto" picks by device) and what it
    takes: autocast around the forward passes and, for fp16 only, a gradient scaler, since fp16
    gradients underflow unscaled. The scaler's state is part of a checkpoint."""

    def __init__(self, requested: str, device: torch.device):
        self.name = resolve_precision(requested, device)
        self.device = device
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.name == "fp16")

    def autocast(self):
        return autocast(self.device, self.name)


def _optimizer_step(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss: torch.Tensor) -> None:
    """One optimizer step on `loss` through the gradient scaler (a pass-through unless fp16, where
    the step is skipped when the scaled gradients overflowed). Gradient clipping goes here, after
    scaler.unscale_(opt)."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


class _Run:
    """What training updates, and so what an exact resume restores: the weights, the optimizer,
    the gradient scaler, the two generators, the early-stopping counters and the history.
    `checkpoint` and `restore` map it to and from last.pt; new state (an LR schedule) joins both."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, precision: _Precision, dist: _Distribution):
        self.model, self.cfg, self.precision, self.dist = model, cfg, precision, dist
        self.net = model  # what the forward pass runs: the DDP wrapper under torchrun
        self.opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        # two streams: every process draws the same batch order whatever the negatives of its share took
        self.order = torch.Generator().manual_seed(cfg.seed)
        self.negatives = torch.Generator().manual_seed(cfg.seed + NEGATIVES_SEED_OFFSET)
        self.stopping = _EarlyStopping(cfg.patience)
        self.history: list[dict] = []
        self.start = 0  # epochs trained before this call

    def train_epoch(self, images: torch.Tensor, epoch: int, folder: Path | None) -> dict:
        """One pass over `images` in the order's next permutation; the epoch's record so far
        (losses averaged over the processes). A non-finite loss or weight is FloatingPointError."""
        model, dist, device = self.model, self.dist, self.dist.device
        losses, extras = [], {}
        model.train()
        for step, idx in enumerate(_batches(len(images), self.cfg.batch_size, self.order)):
            share = dist.share(idx)
            if share is None:
                continue
            with self.precision.autocast():
                out = self.net(to_float(images[share.to(device)]), self.negatives)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss diverged with lr={self.cfg.lr:g}: non-finite loss ({loss.item()}) "
                                         f"at epoch {epoch + 1}, step {step}{_kept(folder)}; try a lower lr")
            _optimizer_step(self.opt, self.precision.scaler, loss)
            losses.append(loss.item())
            for key, v in out.items():
                if key != "loss":
                    extras.setdefault(key, []).append(v.detach().float().cpu())
        if not torch.stack([p.isfinite().all() for p in model.parameters()]).all():  # e.g. an inf step
            raise FloatingPointError(f"the training diverged with lr={self.cfg.lr:g}: non-finite weights after epoch "
                                     f"{epoch + 1}{_kept(folder)}; try a lower lr")
        return {"epoch": epoch + 1, "train_loss": dist.mean(float(np.mean(losses))), "precision": self.precision.name,
                **{k: torch.stack(v).mean(0).tolist() for k, v in extras.items()}}

    def checkpoint(self, epoch: int, fingerprint: dict | None) -> dict:
        """last.pt after `epoch` epochs: tensors and plain types only (see load_checkpoint)."""
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "epoch": epoch,
                "generator": self.order.get_state(), "negatives_generator": self.negatives.get_state(),
                **_rng_state(), "scaler": self.precision.scaler.state_dict(),
                "history": self.history, "best": self.stopping.best, "bad_epochs": self.stopping.bad_epochs,
                "fingerprint": fingerprint,
                "config": {"train": dataclasses.asdict(self.cfg), "model": _model_config(self.model)}}

    def restore(self, state: dict) -> None:
        """Back to what `checkpoint` saved (a checkpoint of older code may lack some of it)."""
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.order.set_state(state["generator"].cpu())  # loaded onto the device; generator states live on the CPU
        if "negatives_generator" in state:
            self.negatives.set_state(state["negatives_generator"].cpu())
        _set_rng_state(state)
        if state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])
        self.history, self.start = state["history"], state["epoch"]
        self.stopping.best, self.stopping.bad_epochs = state["best"], state["bad_epochs"]


class _EarlyStopping:
    """The best validation loss so far and the epochs since it improved: `patience` of those end
    the run. Without validation nothing is counted and the run takes all its epochs."""

    def __init__(self, patience: int):
        self.patience, self.best, self.bad_epochs = patience, float("inf"), 0

    @property
    def exhausted(self) -> bool:
        return self.bad_epochs >= self.patience

    def improved(self, val_loss: float) -> bool:
        """Count one epoch's validation loss; True when it is the best so far (strictly lower, so
        the first of equal losses stays the best)."""
        if val_loss < self.best:
            self.best, self.bad_epochs = val_loss, 0
            return True
        self.bad_epochs += 1
        return False


class _TimeBudget:
    """cfg.time_budget: stop at an epoch boundary rather than be killed mid-epoch, when the slowest
    epoch of this call would no longer fit in what is left (the first epoch always runs)."""

    def __init__(self, seconds: float | None):
        self.seconds, self.t_start, self.slowest = seconds, time.perf_counter(), 0.0

    def reached(self, epoch: int, start: int, history: list[dict], dist: _Distribution) -> bool:
        self.slowest = max((h["seconds"] for h in history[start:] if "seconds" in h), default=0.0)
        over = (self.seconds is not None and epoch > start
                and time.perf_counter() - self.t_start + self.slowest > self.seconds)
        return dist.any(over)

    def message(self, epoch: int, epochs: int, kept: str) -> str:
        return (f"stopped after epoch {epoch} of {epochs}: another epoch (up to {self.slowest:.0f} s) would overrun "
                f"time_budget={self.seconds:.0f} s{kept}; run again with resume=True to continue")


class _Checkpointer:
    """The run's files in `folder`, written atomically by rank 0 alone: last.pt and progress.json
    after every epoch, best.pt on every better validation loss. Without a folder the best weights
    are a CPU copy in memory, so train_model ends on them either way."""

    def __init__(self, folder: str | os.PathLike | None, rank: int):
        self.folder = Path(folder) if folder else None
        self.writes = self.folder is not None and rank == 0
        self._best: dict | None = None

    def has_last(self) -> bool:
        return self.folder is not None and (self.folder / "last.pt").exists()

    def clear_stale(self) -> None:
        """A fresh run must not end on an older run's weights."""
        if self.writes:
            for stale in ("last.pt", "best.pt"):
                (self.folder / stale).unlink(missing_ok=True)

    def keep_best(self, model: nn.Module, epoch: int) -> None:
        if self.writes:
            save_atomic({"model": model.state_dict(), "epoch": epoch}, self.folder / "best.pt")
        elif self.folder is None:
            self._best = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}

    def save_epoch(self, state: dict, record: dict, epochs: int) -> None:
        save_atomic(state, self.folder / "last.pt")
        save_json({"epoch": record["epoch"], "epochs": epochs, "train_loss": record["train_loss"],
                   "val_loss": record.get("val_loss"), "seconds": record["seconds"]},
                  self.folder / "progress.json")  # for whoever watches the run from outside (scripts/sweep.py)

    def load_best(self, model: nn.Module, device: torch.device) -> None:
        if self.folder and (self.folder / "best.pt").exists():
            model.load_state_dict(load_checkpoint(self.folder / "best.pt", device)["model"])
        elif self._best is not None:
            model.load_state_dict(self._best)


def _kept(ckpt: Path | None) -> str:
    """What an error can promise about checkpoints: only files that exist."""
    last = ckpt / "last.pt" if ckpt else None
    return f"; the last good checkpoint is kept in {last}" if last and last.exists() else "; no checkpoint was written"


def _resume(run: _Run, folder: Path, fingerprint: dict | None, device: torch.device) -> None:
    """Continue `run` from folder/last.pt, once it is known to fit: the same configuration and
    fingerprint (`_check_resumable`) and a readable best.pt, as the run will end on it."""
    state = load_checkpoint(folder / "last.pt", device)
    _check_resumable(state, run.model, run.cfg, folder / "last.pt", fingerprint)
    if (folder / "best.pt").exists():
        load_checkpoint(folder / "best.pt")  # a truncated best.pt fails now, not after training
    run.restore(state)


def _model_config(model: nn.Module) -> dict:
    cfg = getattr(model, "cfg", None)
    return {"class": type(model).__name__, **(dataclasses.asdict(cfg) if cfg is not None else {})}


def _check_resumable(state: dict, model: nn.Module, cfg: TrainConfig, path: Path,
                     fingerprint: dict | None = None) -> None:
    saved = state.get("config", {})
    now = {"train": dataclasses.asdict(cfg), "model": _model_config(model)}
    # a model option missing from the saved config is newer than the checkpoint, which was
    # trained with that option's default (e.g. `stem`)
    fields = dataclasses.fields(model.cfg) if hasattr(model, "cfg") else ()
    defaults = {f.name: f.default for f in fields if f.default is not dataclasses.MISSING}
    saved_model = json.loads(json.dumps({**defaults, **(saved.get("model") or {})}, default=list))
    now_model = json.loads(json.dumps(now["model"], default=list))
    diff = [k for k in now_model if saved_model.get(k) != now_model[k]]
    diff += [f"train.{k}" for k in now["train"]
             if k not in RESUMABLE_TRAIN and saved.get("train", {}).get(k) != now["train"][k]]
    if fingerprint is not None and state.get("fingerprint") is not None:
        diff += fingerprint_diff(state["fingerprint"], fingerprint, ignore=RESUMABLE_CHANGES)
    if diff:
        raise ValueError(f"cannot resume from {path}: its configuration differs in {', '.join(diff)}; "
                         "use another checkpoint_dir or resume=False")
    if state.get("epoch", 0) > cfg.epochs:  # else its model would be reported as one of cfg.epochs epochs
        raise ValueError(f"cannot resume from {path}: it has trained {state['epoch']} epochs, more than "
                         f"epochs={cfg.epochs}; ask for at least {state['epoch']}, or resume=False to train "
                         f"{cfg.epochs} from the start")


def _check_negatives(model: nn.Module, batch_size: int, num_train: int) -> None:
    """num_negatives must fit in what one full batch supplies (otherwise they repeat)."""
    k, grid = getattr(getattr(model, "cfg", None), "num_negatives", None), getattr(model, "grid", None)
    if k is None or grid is None:
        return
    pool = min(batch_size, num_train) * grid.num_subimages ** 2 * grid.grid ** 2 - 1
    if k > pool:
        raise ParameterError(f"num_negatives={k}: a batch of {min(batch_size, num_train)} images gives only "
                             f"{pool} other patches to draw from; lower num_negatives or raise batch_size")


def learning_check(history: list[dict], chance_loss: float, margin: float = 0.05) -> dict:
    """Did training learn anything? {"status": "ok" | "at_chance" | "diverged", "message": str}.

    at_chance: the best validation loss (the training loss without validation) is within
    `margin` x chance of the chance loss log(N + 1), the loss of a model that ranks the
    positive no better than a negative (e.g. a collapsed encoder). diverged: the last epoch's
    training loss is above twice chance (e.g. dot-product scores blowing up). Runs that end
    like this still produce metrics; they are flagged, not hidden.
    """
    val = [h["val_loss"] for h in history if "val_loss" in h]
    best = min(val) if val else min(h["train_loss"] for h in history)
    last = history[-1]["train_loss"]
    numbers = f"best loss {best:.3f}, last training loss {last:.3g}, chance {chance_loss:.3f}"
    if not math.isfinite(last) or last > 2 * chance_loss:
        return {"status": "diverged", "message": f"training diverged: {numbers}"}
    if best >= (1 - margin) * chance_loss:
        return {"status": "at_chance", "message": f"nothing learned: the loss stayed at chance ({numbers})"}
    return {"status": "ok", "message": f"learned: {numbers}"}


def chosen_epoch(history: list[dict]) -> int:
    """The epoch whose weights `train_model` ended on: that of the best validation loss (the
    first of equals, as best.pt is only replaced by a lower loss), else the last epoch. With
    early stopping it can lie well before the epochs asked for; an epoch ladder records it
    per rung."""
    val = [(h["val_loss"], h["epoch"]) for h in history if h.get("val_loss") is not None]
    return min(val, key=lambda v: v[0])[1] if val else history[-1]["epoch"]
