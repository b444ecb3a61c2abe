"""CPC (van den Oord et al. 2018, arXiv:1807.03748) and CPC-AD (de Haan & Loewe 2021,
arXiv:2107.07820): InfoNCE the MoCo way, the PixelCNN context network of CPC, and the
context-free directional predictors W_k of CPC-AD."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import ParameterError, check_param, make_config
from .patches import PatchGrid, extract_patches, patch_positions, to_float
from .corruption import changed_patches, corrupt
from .head import DefectHead, head_features
from .encoders import ENCODERS, NORMS, STEMS, build_encoder
from .devices import autocast


# InfoNCE the MoCo way (positive in column 0, per-row cross-entropy kept unreduced), the
# PixelCNN context network of CPC, and the context-free directional predictors of CPC-AD.

def _for_similarity(x: torch.Tensor, similarity: str) -> torch.Tensor:
    """Embeddings as the score sees them: fp32, unit length for "cosine", as they are for "dot"."""
    if similarity == "cosine":
        return F.normalize(x.float(), dim=-1)
    if similarity == "dot":
        return x.float()
    raise ValueError(f"unknown similarity {similarity!r}; choose dot or cosine")


def _randint(high: int, size: tuple[int, ...], generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    """Uniform integers in [0, high) on `device`, reproducible from the host `generator`.

    On CUDA they are drawn there by a generator seeded from `generator`: drawing about a
    million per step on the host and copying them over starved the GPU.
    """
    if device.type != "cuda":
        return torch.randint(0, high, size, generator=generator).to(device)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    return torch.randint(0, high, size, device=device, generator=torch.Generator(device).manual_seed(seed))


def info_nce(pred: torch.Tensor, positive: torch.Tensor, candidates: torch.Tensor,
             num_negatives: int | None = None, pos_index: torch.Tensor | None = None,
             generator: torch.Generator | None = None, similarity: str = "dot",
             temperature: float = 1.0, pos_key: torch.Tensor | None = None,
             cand_key: torch.Tensor | None = None, hard: torch.Tensor | None = None,
             hard_valid: torch.Tensor | None = None, outlier: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row InfoNCE loss: -log softmax of the positive among itself and its negatives.

    Args:
        pred: (N, D) predictions W_k c_t.
        positive: (N, D) the true targets z_{t+k}.
        candidates: (M, D) embeddings the negatives are drawn from.
        num_negatives: negatives per row, sampled uniformly without the positive; None uses
            every candidate (deterministic: how CPC-AD scores against its bank).
        pos_index: (N,) index of each row's positive inside `candidates`, excluded from its
            negatives; None when the candidates cannot contain it (a bank of train patches).
        pos_key: (N,) and cand_key: (M,) integer keys (`patch_positions`): a negative with its
            row's key is a copy of the positive (overlapping sub-images) and scores -inf, so it
            neither wins nor adds to the softmax. pos_index still keeps the positive itself out
            of the draw, so without copies every row has num_negatives real negatives.
        hard: (N, D) one more negative per row (the row's target with a training-only defect,
            `corruption`), counted only where hard_valid (N,) bool is True. With `outlier`, the
            row's loss also has -log(1 - p), p the hard negative's softmax among itself and the
            other negatives: it must rank below the normal negatives too, not only below the
            positive, which is what raises CPC-AD's score (its InfoNCE loss) on a defect.
    Returns:
        loss (N,) and correct (N,) bool: the positive scored above every negative (a tie within
        float rounding, as between identical patches, is a miss).
    """
    N, M = pred.shape[0], candidates.shape[0]
    pred, positive, candidates = (_for_similarity(t, similarity) for t in (pred, positive, candidates))
    pos = (pred * positive).sum(-1, keepdim=True) / temperature                         # (N, 1)
    scores = pred @ candidates.T / temperature                                          # (N, M)
    if num_negatives is None:
        if pos_index is not None:
            scores = scores.scatter(1, pos_index[:, None], float("-inf"))
        if pos_key is not None:
            scores = scores.masked_fill(cand_key[None, :] == pos_key[:, None], float("-inf"))
        neg = scores
    else:
        n_pool = M - (pos_index is not None)
        idx = _randint(n_pool, (N, num_negatives), generator, pred.device)
        if pos_index is not None:
            idx = idx + (idx >= pos_index[:, None]).long()  # skip over the positive
        neg = scores.gather(1, idx)                                                     # (N, num_negatives)
        if pos_key is not None:
            neg = neg.masked_fill(cand_key[idx] == pos_key[:, None], float("-inf"))
    exposure = 0.0
    if hard is not None:
        h = (pred * _for_similarity(hard, similarity)).sum(-1, keepdim=True) / temperature
        if outlier:  # -log(1 - p) = softplus(h - logsumexp(negatives))
            exposure = F.softplus(h[:, 0] - neg.logsumexp(1)).masked_fill(~hard_valid, 0.0)
        neg = torch.cat([neg, h.masked_fill(~hard_valid[:, None], float("-inf"))], dim=1)
    logits = torch.cat([pos, neg], dim=1)      # positive in column 0; finite, so -inf columns give no NaN
    loss = F.cross_entropy(logits, torch.zeros(N, dtype=torch.long, device=pred.device), reduction="none") + exposure
    pos = logits[:, 0]  # a hit beats every negative by more than float rounding (the two are summed differently):
    return loss, pos > logits[:, 1:].max(1).values + 1e-5 * (1 + pos.abs())  # identical patches tie, no hit


def encode_grid(encoder: nn.Module, x: torch.Tensor, grid: PatchGrid,
                multiscale: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Images (B, C, H, W) float -> patch embeddings on the grid (B * n_sub, D, G, G); with
    `multiscale`, (z, ms, stats): also both descriptors of `PatchEncoder.multiscale`
    (B * n_sub, D_ms | D_stats, G, G) from the same pass."""
    p = extract_patches(x, grid)                                  # (B', G, G, C, P, P)
    Bp, G = p.shape[:2]
    p = p.reshape(Bp * G * G, *p.shape[3:]).contiguous(memory_format=torch.channels_last)
    out = encoder.multiscale(p) if multiscale else (encoder(p),)  # (B' * G * G, D) each
    grids = tuple(t.reshape(Bp, G, G, -1).permute(0, 3, 1, 2) for t in out)  # (B', D, G, G)
    return grids if multiscale else grids[0]


# The kNN typicality scores, named after what they compare, in the order `PatchEncoder.multiscale`
# returns the descriptors: z (cosine), "ms" (cosine), "stats" (standardised Euclidean).
REFERENCE_KINDS = ("knn", "knn_ms", "knn_stats")


class CausalConv2d(nn.Conv2d):
    """Convolution whose output row i sees input rows <= i only (padding above, none below)."""

    def forward(self, x):
        kh, kw = self.kernel_size
        return super().forward(F.pad(x, (kw // 2, kw // 2, kh - 1, 0)))


class PixelCNNContext(nn.Module):
    """PixelCNN-style context network over the patch grid, top to bottom.

    Residual blocks of ReLU -> causal 2x3 conv -> ReLU -> 1x1 conv, so c[:, :, i] depends
    on z[:, :, :i + 1] only (rows of the grid at and above i), with a receptive field
    that grows by one row per block. (B, D, G, G) -> (B, hidden, G, G).
    """

    def __init__(self, dim: int, hidden: int, layers: int = 4):
        super().__init__()
        self.inp = nn.Conv2d(dim, hidden, 1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ReLU(), CausalConv2d(hidden, hidden, (2, 3)), nn.ReLU(), nn.Conv2d(hidden, hidden, 1))
            for _ in range(layers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c = self.inp(z)
        for block in self.blocks:
            c = c + block(c)
        return c


@dataclass
class CPCConfig:
    """CPC (notebook 01). Row i of the context predicts rows i + overlap + k, k = 1..pred_steps:
    rows closer than that share pixels with the context patch, which would make the task a
    copy. With 64 px patches at stride 32 the overlap is one row."""
    encoder: str = "resnet18v2"
    norm: str = "layer"
    width: int = 64
    stem: str = "imagenet"        # see make_stem: "small" keeps larger stage maps on small patches
    pred_steps: int = 3
    num_negatives: int = 16
    context_dim: int = 256
    context_layers: int = 4
    similarity: str = "dot"
    temperature: float = 1.0

    def __post_init__(self):
        _check_model_fields(self)
        for name in ("context_dim", "context_layers"):
            check_param(name, getattr(self, name), "int", low=1)
        check_param("num_negatives", self.num_negatives, "int", low=1)


def _check_model_fields(cfg) -> None:
    """The fields CPCConfig and CPCADConfig share: encoder, width, steps, score."""
    check_param("encoder", cfg.encoder, "str", choices=ENCODERS)
    check_param("norm", cfg.norm, "str", choices=NORMS)
    check_param("stem", cfg.stem, "str", choices=STEMS)
    check_param("width", cfg.width, "int", low=1)
    check_param("pred_steps", cfg.pred_steps, "int", low=1)
    check_param("similarity", cfg.similarity, "str", choices=("dot", "cosine"))
    check_param("temperature", cfg.temperature, "float", low=0, open_low=True)


class CPC(nn.Module):
    """Encoder + PixelCNN context + one linear predictor W_k per step, trained with InfoNCE."""

    def __init__(self, cfg: CPCConfig, grid: PatchGrid):
        super().__init__()
        self.cfg, self.grid = cfg, grid
        self.offset = grid.overlap_steps
        if grid.grid - self.offset - cfg.pred_steps < 1:
            raise ValueError(f"a {grid.grid}x{grid.grid} grid with {self.offset} overlapping rows "
                             f"leaves no context for pred_steps={cfg.pred_steps}")
        self.encoder = build_encoder(cfg.encoder, cfg.norm, cfg.width, stem=cfg.stem)
        D = self.encoder.out_dim
        self.context = PixelCNNContext(D, cfg.context_dim, cfg.context_layers)
        self.W = nn.ModuleList(nn.Linear(cfg.context_dim, D, bias=False) for _ in range(cfg.pred_steps))

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return self.loss(x, generator)  # what DistributedDataParallel wraps: the training objective

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None,
             negatives: str = "batch") -> dict[str, torch.Tensor]:
        """InfoNCE over every (context row, step k) pair.

        negatives="batch" (training): `num_negatives` drawn from every patch of the batch, so
        most come from other images, and a model that only recognises which image a patch
        belongs to already does well. negatives="image" (evaluation): every other patch of the
        *same* image and none else, the spatial question "which of this image's patches lies
        k rows below?"; deterministic, chance log(patches per image).
        Returns loss (scalar), loss_per_step (K,) and acc_per_step (K,).
        """
        if negatives not in ("batch", "image"):
            raise ValueError(f"negatives must be 'batch' or 'image', got {negatives!r}")
        z = encode_grid(self.encoder, x, self.grid)               # (B', D, G, G), B' = B * n_sub
        c = self.context(z)                                       # (B', Dc, G, G)
        B, D, G, _ = z.shape
        candidates = z.permute(0, 2, 3, 1).reshape(B * G * G, D)  # (B'*G*G, D), index b*G*G + i*G + j
        ids = torch.arange(B * G * G, device=z.device).view(B, G, G)
        keys = patch_positions(len(x), self.grid, z.device)      # (B'*G*G,): copies of a patch share a key
        per_image = B * G * G // len(x)                           # candidates of one image (all its sub-images)
        losses, accs = [], []
        for k, W_k in enumerate(self.W, start=1):
            rows = G - self.offset - k
            pred = W_k(c[:, :, :rows].permute(0, 2, 3, 1).reshape(-1, c.shape[1]))   # (B'*rows*G, D)
            pos_index = ids[:, self.offset + k:].reshape(-1)
            if negatives == "batch":
                loss, correct = info_nce(pred, candidates[pos_index], candidates, self.cfg.num_negatives,
                                         pos_index, generator, self.cfg.similarity, self.cfg.temperature,
                                         pos_key=keys[pos_index], cand_key=keys)
            else:  # one image at a time: its predictions against its own patches only
                parts = []
                for b in range(len(x)):
                    rows_b, own = pos_index // per_image == b, slice(b * per_image, (b + 1) * per_image)
                    pos_b = pos_index[rows_b]
                    parts.append(info_nce(pred[rows_b], candidates[pos_b], candidates[own], None, pos_b - own.start,
                                          None, self.cfg.similarity, self.cfg.temperature, pos_key=keys[pos_b],
                                          cand_key=keys[own]))
                loss, correct = (torch.cat(t) for t in zip(*parts))
            losses.append(loss.mean())
            accs.append(correct.float().mean())
        per_step = torch.stack(losses)
        return {"loss": per_step.mean(), "loss_per_step": per_step.detach(), "acc_per_step": torch.stack(accs)}


DIRECTIONS = ("top_down", "bottom_up", "left_right", "right_left")
DEFECT_NEGATIVES = ("none", "negative", "outlier")  # CPCADConfig.defect_negatives: see CPCAD.loss


def orient(t: torch.Tensor, direction: str) -> torch.Tensor:
    """Turn a (..., G, G) grid so that `direction` becomes row i -> row i + k."""
    if direction == "top_down":
        return t
    if direction == "bottom_up":
        return t.flip(-2)
    if direction == "left_right":
        return t.transpose(-1, -2)
    if direction == "right_left":
        return t.transpose(-1, -2).flip(-2)
    raise ValueError(f"unknown direction {direction!r}; choose from {DIRECTIONS}")


def unorient(t: torch.Tensor, direction: str) -> torch.Tensor:
    """Inverse of `orient`."""
    return t.flip(-2).transpose(-1, -2) if direction == "right_left" else orient(t, direction)


@dataclass
class CPCADConfig:
    """CPC-AD (notebook 02): score(z_t, z_{t+k}) = z_{t+k}^T W_k z_t, no context network.

    The model and how it trains; how its patch scores become anomaly maps is `ScoringConfig`'s.
    Every default was chosen by scripts/study.py on the validation data of the demo's tuning
    half, never on test data: the evidence for each is in results/study/README.md ("Why the
    defaults are what they are"). `cpcad_config("paper")` is de Haan & Loewe as published.
    One default is the preset's, not the dataclass's: `defect_head` is off here (plain CPC-AD,
    what the tests and the paper preset build on) and on in `cpcad_config("fast")`, notebook
    02's (adopted on the tuning half's validation, issue 30).
    """
    encoder: str = "resnet18v2"
    norm: str = "layer"
    width: int = 64
    stem: str = "imagenet"        # see make_stem: "small" keeps larger stage maps on small patches
    pred_steps: int = 1
    target_offset: int = 0
    num_negatives: int | None = 63
    negatives: str = "batch"      # training negatives: "batch" (num_negatives from the batch) | "image" (see patch_losses)
    defect_negatives: str = "none"  # "negative" | "outlier": targets with a training-only defect (`corruption`), see CPCAD.loss
    defect_head: bool = False     # also train the encoder to segment training-only defects (an auxiliary head), see
                                  # CPCAD.loss; True in the "fast" preset
    similarity: str = "cosine"
    temperature: float = 0.1
    shared_encoder: bool = True
    directions: tuple[str, ...] = DIRECTIONS

    def __post_init__(self):
        _check_model_fields(self)
        check_param("target_offset", self.target_offset, "int", low=0)
        check_param("num_negatives", self.num_negatives, "int", low=1, optional=True)  # None: all in the batch
        check_param("negatives", self.negatives, "str", choices=("batch", "image"))
        check_param("shared_encoder", self.shared_encoder, "bool")
        check_param("defect_negatives", self.defect_negatives, "str", choices=DEFECT_NEGATIVES)
        check_param("defect_head", self.defect_head, "bool")
        for d in self.directions:
            check_param("directions", d, "str", choices=DIRECTIONS)


def cpcad_config(preset: str = "fast", grid: PatchGrid | None = None, **overrides) -> CPCADConfig:
    """CPCADConfig from a named preset, then `overrides` (None keeps the preset's value).

    "fast": the dataclass defaults with `defect_head` on (what the studies chose). "paper":
    de Haan & Loewe as published: four independent encoder + W_k models, dot-product scores (temperature 1),
    targets that share no pixels with the context patch (target_offset = the grid's overlap,
    hence the `grid`). Its scoring (pure CPC-AD loss, mean reduction, the training grid) is
    `scoring_config("paper")`.

    One difference from the paper remains: the paper's image score averages every prediction's
    loss equally, while here each patch's map value is the mean of the predictions that target
    it and the image score ("mean") averages patches equally. Patches near the border are
    targeted by fewer directions, so their predictions weigh more: on a 7x7 grid with
    target_offset 1 a corner patch's two predictions count twice as much as each of an interior
    patch's four. The map is what the heatmaps need; the image scores differ only in weighting.
    """
    if preset == "fast":
        base = dict(defect_head=True)
    elif preset == "paper":
        if grid is None:
            raise ValueError("the paper preset needs the grid: its targets skip the overlapping rows")
        base = dict(shared_encoder=False, similarity="dot", temperature=1.0, target_offset=grid.overlap_steps,
                    pred_steps=1)
    else:
        raise ValueError(f"unknown preset {preset!r}; choose fast or paper")
    cfg = make_config(CPCADConfig, **{**base, **{k: v for k, v in overrides.items() if v is not None}})
    if grid is not None:
        _check_grid_fits(cfg, grid)  # here, with the other parameters: before any data is loaded
    return cfg


def _check_grid_fits(cfg: CPCADConfig, grid: PatchGrid) -> None:
    """Each row of the grid needs a context patch before its targets: G - target_offset - pred_steps >= 1."""
    G, K, off = grid.grid, cfg.pred_steps, cfg.target_offset
    if G - off - K < 1:
        raise ParameterError(f"a {G}x{G} grid leaves no context for pred_steps={K}, target_offset={off}: "
                             f"pred_steps + target_offset must be at most {G - 1} (a larger image_size or a "
                             "smaller stride gives a larger grid)")


class CPCAD(nn.Module):
    """CPC-AD: per-patch InfoNCE losses in four directions, averaged into an anomaly map.

    `shared_encoder=True` encodes each patch once and gives each direction its own W_k;
    `False` trains four independent encoder + W_k models, as in the paper (4x the encoding).
    Each prediction's loss is assigned to the patch being predicted, z_{t+k}.
    """

    def __init__(self, cfg: CPCADConfig, grid: PatchGrid):
        super().__init__()
        self.cfg, self.grid = cfg, grid
        G, K, off = grid.grid, cfg.pred_steps, cfg.target_offset
        _check_grid_fits(cfg, grid)
        cover = sum(unorient(self._target_count(G), d) for d in cfg.directions)
        if (cover == 0).any():
            raise ValueError(f"directions {cfg.directions} leave patches that are never predicted; "
                             "add the opposite direction")
        n_enc = 1 if cfg.shared_encoder else len(cfg.directions)
        self.encoders = nn.ModuleList(build_encoder(cfg.encoder, cfg.norm, cfg.width, stem=cfg.stem)
                                      for _ in range(n_enc))
        D = self.encoders[0].out_dim
        W = torch.empty(len(cfg.directions), K, D, D)
        for w in W.view(-1, D, D):
            nn.init.xavier_uniform_(w)
        self.W = nn.Parameter(W)                                  # (n_dir, K, D, D): W_k per direction
        if cfg.defect_head:  # on every encoder's stage statistics, as `head.head_features` reads them
            P = grid.patch_size
            with torch.no_grad():
                dim = sum(enc.eval().multiscale(torch.zeros(1, 3, P, P))[2].shape[1] for enc in self.encoders)
            self.encoders.train()
            self.aux_head = DefectHead(dim)

    def chance_loss(self, batch_size: int) -> float:
        """The training loss of a model that has learned nothing: log of the candidates each
        prediction chooses among (the positive and its negatives), for batches of `batch_size`."""
        per_image = self.grid.num_subimages ** 2 * self.grid.grid ** 2
        if self.cfg.negatives == "image":
            return math.log(per_image)
        return math.log(self.cfg.num_negatives + 1 if self.cfg.num_negatives else batch_size * per_image)

    def _target_count(self, G: int) -> torch.Tensor:
        """How many predictions target each patch in the oriented frame: (G, G)."""
        count = torch.zeros(G, G)
        for k in range(1, self.cfg.pred_steps + 1):
            count[self.cfg.target_offset + k:] += 1
        return count

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One (B', D, G, G) grid per encoder (one when shared, one per direction otherwise)."""
        return [encode_grid(enc, x, self.grid) for enc in self.encoders]

    def patch_losses(self, zs: list[torch.Tensor], bank: torch.Tensor | None = None,
                     generator: torch.Generator | None = None,
                     defects: tuple[list[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Per-patch InfoNCE loss, averaged over steps k and directions: (B', G, G).

        Negatives: with `bank` (n_enc, M, D) every bank entry (scoring); without it, in
        training (all normal images), never a copy of the target cut from another sub-image
        (same image, same position), and with cfg.negatives "batch" `num_negatives` patches of
        the whole batch, with "image" every other patch of the target's own image and none
        else: the hard negatives of a texture, the same material at other places.
        `defects` (one (B'*G*G, D) grid per encoder, and which patches hold a defect) adds each
        defective target as one more negative of the predictions of it (`defect_negatives`).
        """
        G, off = self.grid.grid, self.cfg.target_offset
        if bank is None:
            n_images = len(zs[0]) // self.grid.num_subimages ** 2
            keys = patch_positions(n_images, self.grid, zs[0].device)          # (B*G*G,), index b*G*G + i*G + j
        total = 0.0
        count = 0.0
        for d, direction in enumerate(self.cfg.directions):
            z = zs[d % len(zs)]                                               # (B, D, G, G)
            B, D = z.shape[:2]
            flat = z.permute(0, 2, 3, 1).reshape(B * G * G, D)                 # candidates, index b*G*G + i*G + j
            ids = orient(torch.arange(B * G * G, device=z.device).view(B, G, G), direction)
            zo = orient(z, direction)
            loss_map = z.new_zeros(B, G, G, dtype=torch.float32)
            for k in range(1, self.cfg.pred_steps + 1):
                rows = G - off - k
                ctx = zo[:, :, :rows].permute(0, 2, 3, 1).reshape(-1, D)       # (B*rows*G, D)
                pred = ctx @ self.W[d, k - 1].to(ctx.dtype)
                pos_index = ids[:, off + k:].reshape(-1)
                hard = hard_valid = None
                outlier = self.cfg.defect_negatives == "outlier"
                if defects is not None:
                    hard, hard_valid = defects[0][d % len(zs)][pos_index], defects[1][pos_index]
                if bank is None and self.cfg.negatives == "image":  # one image at a time, its own patches
                    per_image = len(flat) // n_images                          # all its sub-images' patches
                    owner = pos_index // per_image
                    loss = pred.new_empty(len(pred), dtype=torch.float32)
                    for b in range(n_images):
                        own, rows_b = slice(b * per_image, (b + 1) * per_image), owner == b
                        pos_b = pos_index[rows_b]
                        loss[rows_b] = info_nce(pred[rows_b], flat[pos_b], flat[own], None, pos_b - own.start, None,
                                                self.cfg.similarity, self.cfg.temperature, pos_key=keys[pos_b],
                                                cand_key=keys[own], hard=None if hard is None else hard[rows_b],
                                                hard_valid=None if hard is None else hard_valid[rows_b],
                                                outlier=outlier)[0].float()
                elif bank is None:
                    loss, _ = info_nce(pred, flat[pos_index], flat, self.cfg.num_negatives, pos_index,
                                       generator, self.cfg.similarity, self.cfg.temperature,
                                       pos_key=keys[pos_index], cand_key=keys, hard=hard, hard_valid=hard_valid,
                                       outlier=outlier)
                else:
                    loss, _ = info_nce(pred, flat[pos_index], bank[d % len(zs)], None, None,
                                       None, self.cfg.similarity, self.cfg.temperature)
                loss_map[:, off + k:] += loss.view(B, rows, G)
            total = total + unorient(loss_map, direction)
            count = count + unorient(self._target_count(G).to(z.device), direction)
        return total / count

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Training objective: the mean per-patch loss with in-batch negatives. In training,
        `defect_negatives` "negative" adds each target's defective copy as one more negative
        (ranked below the true target), "outlier" also ranks it below the normal negatives
        (`info_nce`'s outlier term). The validation loss (eval mode) stays plain InfoNCE,
        comparable across settings. With `defect_head`, training adds the binary cross-entropy of
        an auxiliary head that segments a training-only defect from the encoder's patch
        statistics (`defect_head_loss`; "defect_bce" in the history), so the encoder learns what
        a defect changes; the head is not used to score. The study: results/study/README.md (issue 30)."""
        anomaly_aware = self.training and self.cfg.defect_negatives != "none"
        defects = self.defective_targets(x, generator) if anomaly_aware else None
        loss = self.patch_losses(self.encode(x), generator=generator, defects=defects).mean()
        if not (self.training and self.cfg.defect_head):
            return {"loss": loss}
        bce = self.defect_head_loss(x, generator)
        return {"loss": loss + bce, "defect_bce": bce.detach()}

    def defect_head_loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Binary cross-entropy of the auxiliary head's logits on a copy of x with one training-only
        defect per image (`corruption.corrupt`) against which training-grid patches it changed;
        the statistics are standardised by the batch's own (detached) mean and spread."""
        bad, _ = corrupt(x, generator)
        labels = changed_patches(x, bad, self.grid).float()                          # (B'*G*G,)
        f = head_features(self.encoders, bad, self.grid)                             # (B', D, G, G)
        mu, sd = f.mean((0, 2, 3)).detach(), f.std((0, 2, 3)).detach().clamp_min(1e-3)
        logits = self.aux_head.net((f - mu[:, None, None]) / sd[:, None, None])[:, 0]  # (B', G, G)
        return F.binary_cross_entropy_with_logits(logits.float().reshape(-1), labels)

    def defective_targets(self, x: torch.Tensor, generator: torch.Generator | None = None
                          ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """A training-only defect on each image (`corruption.corrupt`); only the patches it
        changed are encoded: one (B'*G*G, D) grid per encoder (zeros elsewhere) and which they are."""
        bad, _ = corrupt(x, generator)
        covered = changed_patches(x, bad, self.grid)                                # (B'*G*G,)
        p = extract_patches(bad, self.grid)                                         # (B', G, G, C, P, P)
        p = p.reshape(-1, *p.shape[3:])[covered].contiguous(memory_format=torch.channels_last)
        D, grids = self.encoders[0].out_dim, []
        for enc in self.encoders:
            full = x.new_zeros(len(covered), D)
            if covered.any():
                full[covered] = enc(p).to(full.dtype)
            grids.append(full)
        return grids, covered

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return self.loss(x, generator)  # what DistributedDataParallel wraps: the training objective

    @torch.no_grad()
    def build_bank(self, images: torch.Tensor, size: int, seed: int = 0,
                   batch_size: int = 512, precision: str = "auto") -> torch.Tensor:
        """Encode a fixed random sample of `size` (`ScoringConfig.test_negatives`) train/good
        patches of the training grid as test-time negatives: (n_enc, M, D)."""
        return self.build_references(images, size, seed, ("knn",), batch_size, self.grid, precision)["knn"]

    def build_references(self, images: torch.Tensor, size: int, seed: int = 0,
                         kinds: Sequence[str] = REFERENCE_KINDS, batch_size: int = 512,
                         grid: PatchGrid | None = None, precision: str = "auto") -> dict[str, torch.Tensor]:
        """Encode a fixed random sample of `size` train/good patches once, as each of `kinds`:
        {"knn": z (n_enc, M, D), "knn_ms": (n_enc, M, D_ms), "knn_stats": (n_enc, M, D_stats)}.

        The patches are sampled from `grid` (the score grid, where the typicality scores are
        measured; default the training grid). Only they are cut out and encoded: the cost is M patches, not the set.
        `precision` is the run's (`TrainConfig.precision`): a model trained in fp32 is encoded in fp32.
        """
        device = self.W.device
        g = torch.Generator().manual_seed(seed)
        grid = grid or self.grid
        P, H = grid.patch_size, grid.image_size
        keys = patch_positions(len(images), grid)                # (N * n_sub * G * G,), encode_grid's order
        pick = torch.randperm(len(keys), generator=g)[:size].sort().values
        img, top, left = keys[pick] // (H * H), keys[pick] % (H * H) // H, keys[pick] % H  # patch corners
        windows = images.unfold(2, P, 1).unfold(3, P, 1)         # (N, C, H-P+1, W-P+1, P, P), a view
        out = {k: [[] for _ in self.encoders] for k in kinds}
        for lo in range(0, len(pick), batch_size):
            sl = slice(lo, lo + batch_size)
            # gather only the picked uint8 patches (no float copy of whole images, no Python loop)
            patches = to_float(windows[img[sl], :, top[sl], left[sl]].to(device))  # (b, C, P, P)
            with autocast(device, precision):
                for e, enc in enumerate(self.encoders):
                    described = (enc(patches),) if set(kinds) == {"knn"} else enc.multiscale(patches)
                    d = dict(zip(REFERENCE_KINDS, described))
                    for k in kinds:
                        out[k][e].append(d[k].float())
        return {k: torch.stack([torch.cat(o) for o in v]) for k, v in out.items()}  # each (n_enc, M, ...)
