"""A discriminative defect head on the frozen CPC encoder (issue 30, lever 3), in the style of
DRAEM and CutPaste: both learn, from scratch, to segment synthetic defects pasted into normal
images, and find real ones by what the synthetic ones have in common with them.

Here the segmenter is small and sits on the encoder's patch descriptors, not on pixels: a 1x1
conv, a 3x3 conv over neighbouring patches and a 1x1 conv to one logit per patch of the score
grid, reading the stage-statistics descriptor ("knn_stats"'s, `PatchEncoder.multiscale`) of
every encoder, standardised. It is fitted after CPC training, on the class's train/good images
with the training-only defects of `corruption.py` (kinds disjoint from the validation set's and
the demo's test edits), and the encoder stays frozen: the same head on the untrained network is
the control that says what CPC's features add. Its logit is the score kind "head" (`scoring.py`),
calibrated per grid position like the others, read by the detectors "head" and "knn_stats_head".
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .corruption import changed_patches, corrupt
from .devices import autocast
from .patches import PatchGrid, to_float

HEAD_HIDDEN = 64          # channels of the head's two hidden layers
HEAD_IMAGES = 256         # corrupted training images the head learns from (copies of train/good, each its own defect)
HEAD_STEPS = 400          # AdamW steps over them, batches of HEAD_BATCH feature grids
HEAD_BATCH = 16
HEAD_LR = 1e-3


class DefectHead(nn.Module):
    """Standardised patch descriptors (B', D, G, G) -> defect logits (B', G, G)."""

    def __init__(self, dim: int, hidden: int = HEAD_HIDDEN):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.net = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, hidden, 3, padding=1),
                                 nn.ReLU(), nn.Conv2d(hidden, 1, 1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net((f.float() - self.mean[:, None, None]) / self.std[:, None, None])[:, 0]

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "DefectHead":
        """The head a `state_dict()` was saved from (its sizes read from the weights)."""
        hidden, dim = state["net.0.weight"].shape[:2]
        head = cls(dim, hidden)
        head.load_state_dict(state)
        return head


def head_features(encoders, x: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """What the head reads of float images x: every encoder's stage statistics on `grid`,
    concatenated, (B', sum D_stats, G, G)."""
    from .models import encode_grid
    return torch.cat([encode_grid(enc, x, grid, multiscale=True)[2].float() for enc in encoders], dim=1)


def fit_head(model, images: torch.Tensor, grid: PatchGrid, seed: int = 0, device: torch.device | str = "cpu",
             precision: str = "auto", batch_size: int = 16, progress: bool = False, n_images: int | None = None,
             steps: int | None = None) -> DefectHead:
    """Fit a DefectHead on uint8 train/good images (N, C, H, W) under `model`'s frozen encoders.

    `n_images` (default HEAD_IMAGES) corrupted copies are encoded once (`corrupt`, one defect
    each; a patch is positive when the defect changed it, `changed_patches`), then the head
    takes `steps` (default HEAD_STEPS) AdamW steps of binary cross-entropy on them.
    Deterministic for a seed; the global RNG is left untouched.
    """
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    order = torch.arange(n_images or HEAD_IMAGES) % len(images)
    feats, labels = [], []
    model.eval()
    with torch.no_grad():
        for idx in tqdm(order.split(batch_size), desc="head features", disable=not progress):
            x = to_float(images[idx].to(device))
            bad, _ = corrupt(x, g)
            with autocast(device, precision):
                feats.append(head_features(model.encoders, bad, grid).cpu())
            labels.append(changed_patches(x, bad, grid).view(-1, grid.grid, grid.grid).float().cpu())
    feats, labels = torch.cat(feats), torch.cat(labels)            # (M, D, G, G), (M, G, G)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = DefectHead(feats.shape[1])
    flat = feats.transpose(0, 1).flatten(1)                        # (D, M * G * G)
    head.mean.copy_(flat.mean(1))
    std = flat.std(1)
    head.std.copy_(std.clamp_min(max(1e-3 * float(std.median()), 1e-12)))  # as `_prepare_references` floors it
    head.to(device).train()
    opt = torch.optim.AdamW(head.parameters(), lr=HEAD_LR)
    losses = []
    with torch.enable_grad():  # callers score under no_grad (`prepare_scoring`)
        for _ in tqdm(range(steps or HEAD_STEPS), desc="head", disable=not progress):
            pick = torch.randint(0, len(feats), (HEAD_BATCH,), generator=g)
            loss = F.binary_cross_entropy_with_logits(head(feats[pick].to(device)), labels[pick].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    rate = float(labels.mean())
    chance = float(F.binary_cross_entropy(torch.tensor(rate), torch.tensor(rate))) if 0 < rate < 1 else 0.0
    head.fit_log = {"positives": rate, "chance_bce": chance,  # the loss of predicting the base rate everywhere
                    "first_bce": sum(losses[:20]) / len(losses[:20]), "last_bce": sum(losses[-20:]) / len(losses[-20:])}
    return head.eval()
