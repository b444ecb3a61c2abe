"""Where and how a run computes: the device (auto -> cuda, mps, cpu), the precision (bf16 from
compute capability 8.0, fp16 with a gradient scaler on 7.x, else fp32), seeding, and the
distributed process group under torchrun."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from .checks import ParameterError, check_param


DEVICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda, then mps, then cpu; "cpu", "cuda", "cuda:N", "mps" as named.

    A device this machine does not have is a ParameterError naming it, raised here, before a
    model or bundle is loaded, so the message is about the device and not whatever it stopped.
    """
    if str(device) != "auto":
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda", "mps"):
            raise ParameterError(f"device={device!r}: expected {DEVICES}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ParameterError(f"device={device!r}: no CUDA device is available on this machine; use auto or cpu")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise ParameterError(f"device={device!r}: this machine has {n} CUDA device{'s' * (n != 1)} "
                                 f"(cuda:0 to cuda:{n - 1})")
        if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ParameterError(f"device={device!r}: MPS is not available on this machine; use auto or cpu")
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """"auto" -> what the device runs fast: bf16 on CUDA compute capability >= 8.0 (A100, H100;
    it has tensor cores for bf16 from there), fp16 with a gradient scaler on 7.x (V100, T4:
    bf16 would be emulated, far slower), fp32 below 7.0 (P100: no fp16 tensor cores either)
    and on CPU / MPS. An explicit bf16 or fp16 needs CUDA."""
    check_param("precision", precision, "str", choices=PRECISIONS)
    device = torch.device(device)
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            raise ParameterError(f"precision={precision!r} needs a CUDA device, not {device}; use auto or fp32")
        return "fp32"
    if precision != "auto":
        return precision
    major, _ = torch.cuda.get_device_capability(device)
    return "bf16" if major >= 8 else "fp16" if major >= 7 else "fp32"


def autocast(device: torch.device, precision: str = "auto"):
    """Mixed-precision autocast for `precision` (see resolve_precision); fp32: a no-op."""
    import contextlib
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun describes (env RANK, WORLD_SIZE, MASTER_ADDR...): NCCL on
    CUDA, gloo on CPU. Returns (rank, world size); (0, 1) when not launched by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return _distributed()


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _any_rank(flag: bool, world: int, device: torch.device) -> bool:
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)  # NCCL reduces CUDA tensors only
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _mean_over_ranks(value: float, world: int, device: torch.device) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item()) / world
