"""Patch encoders (N, C, P, P) -> (N, D): pre-activation ResNet v2 (He et al. 2016,
arXiv:1603.05027) and DenseNet (Huang et al. 2017, arXiv:1608.06993), cut after stage 3."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


# Patch encoders (N, C, P, P) -> (N, D) by mean pooling: pre-activation ResNet v2 (He et al.
# 2016, arXiv:1603.05027) and DenseNet (Huang et al. 2017, arXiv:1608.06993), cut after stage 3.

class LayerNorm2d(nn.GroupNorm):
    """LayerNorm over (C, H, W) of each sample with a per-channel affine: GroupNorm(1, C).

    On CUDA the same function runs as F.layer_norm over the trailing (H, W, C) of the
    channels_last view: CUDA's group_norm copies channels_last inputs to NCHW and back,
    which cost more than the convolutions. On CPU GroupNorm's own kernel is the faster.
    """

    def __init__(self, channels: int):
        super().__init__(1, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda:
            return super().forward(x)
        C, H, W = x.shape[1:]
        y = F.layer_norm(x.permute(0, 2, 3, 1), (H, W, C), self.weight.expand(H, W, C),
                         self.bias.expand(H, W, C), self.eps)               # (N, H, W, C)
        return y.permute(0, 3, 1, 2)                                          # (N, C, H, W), channels_last


NORMS = ("layer", "group", "batch", "none")


def norm_layer(norm: str, channels: int) -> nn.Module:
    """Normalisation for the encoders.

    "layer" (the default) is LayerNorm over (C, H, W) of each patch (GroupNorm with one
    group), as in CPC v2: BatchNorm lets the patches of one batch share statistics, which
    the contrastive task can exploit to find its positive, and it makes a patch's embedding
    (hence its anomaly score) depend on what else is in the batch. LayerNorm keeps every
    patch independent, so training and scoring see the same function. "group" (32 groups),
    "batch" and "none" are there to study that choice; with "batch" the validation loss stayed
    near chance (results/study/README.md, "Why the defaults are what they are").
    """
    if norm == "layer":
        return LayerNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; choose layer, group, batch or none")


class PreActBasicBlock(nn.Module):
    """norm-ReLU-conv3x3 twice, identity shortcut (ResNet-18 v2)."""
    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int, norm: str):
        super().__init__()
        c_out = width * self.expansion
        self.norm1, self.conv1 = norm_layer(norm, c_in), nn.Conv2d(c_in, width, 3, stride, 1, bias=False)
        self.norm2, self.conv2 = norm_layer(norm, width), nn.Conv2d(width, c_out, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None

    def forward(self, x):
        h = F.relu(self.norm1(x))
        skip = self.shortcut(h) if self.shortcut is not None else x
        h = self.conv1(h)
        return skip + self.conv2(F.relu(self.norm2(h)))


class PreActBottleneck(nn.Module):
    """norm-ReLU-conv 1x1 / 3x3 / 1x1 with 4x expansion (ResNet-50 v2)."""
    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int, norm: str):
        super().__init__()
        c_out = width * self.expansion
        self.norm1, self.conv1 = norm_layer(norm, c_in), nn.Conv2d(c_in, width, 1, bias=False)
        self.norm2, self.conv2 = norm_layer(norm, width), nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.norm3, self.conv3 = norm_layer(norm, width), nn.Conv2d(width, c_out, 1, bias=False)
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None

    def forward(self, x):
        h = F.relu(self.norm1(x))
        skip = self.shortcut(h) if self.shortcut is not None else x
        h = self.conv1(h)
        h = self.conv2(F.relu(self.norm2(h)))
        return skip + self.conv3(F.relu(self.norm3(h)))


STEMS = ("imagenet", "imagenet_norm", "small")


def make_stem(stem: str, in_channels: int, channels: int, norm: str) -> nn.Sequential:
    """The layers before the first stage, which set the size of the stage maps.

    "imagenet" (the default, as trained so far): conv7x7/2 -> maxpool3/2, no norm or ReLU
    between them; a 32 px patch gives 8x8 -> 4x4 -> 2x2 stage maps, where most 3x3 kernels
    see padding. "imagenet_norm": conv7x7/2 -> norm -> ReLU -> maxpool3/2, as in the published
    pre-activation ResNet and DenseNet-121. "small": conv3x3/1 -> norm -> ReLU -> maxpool2/2,
    a quarter of the downsampling: 16x16 -> 8x8 -> 4x4 stage maps on 32 px patches, at about
    4x the FLOPs of "imagenet" (the stages run on 4x the area; measured 3.7x to 3.9x for the
    three encoders at width 64) rather than the 16x of no downsampling at all.
    """
    if stem == "imagenet":  # layer indices stay stem.0 / stem.1: old checkpoints load
        return nn.Sequential(nn.Conv2d(in_channels, channels, 7, 2, 3, bias=False), nn.MaxPool2d(3, 2, 1))
    if stem == "imagenet_norm":
        return nn.Sequential(nn.Conv2d(in_channels, channels, 7, 2, 3, bias=False), norm_layer(norm, channels),
                             nn.ReLU(), nn.MaxPool2d(3, 2, 1))
    if stem == "small":
        return nn.Sequential(nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False), norm_layer(norm, channels),
                             nn.ReLU(), nn.MaxPool2d(2))
    raise ValueError(f"unknown stem {stem!r}; choose {', '.join(STEMS)}")


class PatchEncoder(nn.Module):
    """Stem (`make_stem`) -> stages -> final norm -> mean pool. `out_dim` = D.

    No ReLU before the pool: it would confine every z to the positive orthant, where cosine
    similarities crowd together; without it the CPC-AD loss fell about twice as fast (see the
    study in CPCADConfig).
    """

    def __init__(self, stem_channels: int, stages: nn.Sequential, out_dim: int, norm: str, in_channels: int = 3,
                 stem: str = "imagenet"):
        super().__init__()
        self.stem = make_stem(stem, in_channels, stem_channels, norm)
        self.stages = stages
        self.final_norm = norm_layer(norm, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.final_norm(self.stages(self.stem(x)))          # (N, D, P/16, P/16); P/8 with the "small" stem
        return h.mean(dim=(2, 3))                                 # (N, D)

    def multiscale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z as `forward`, and two descriptors of the patch from the same pass, for the kNN
        typicality scores:

        * "ms" (N, sum of stage channels): each stage's output mean-pooled and scaled to unit
          length, concatenated, so the fine early stages (edges, intensity) weigh as much as
          the final embedding; compared by cosine ("knn_ms").
        * "stats" (N, D_stats): the mean *and* the spatial standard deviation of every channel
          of the stem's output, of each stage's but the last, and of the final normed map (the
          std only where the map is larger than 1x1), unscaled; compared by Euclidean distance
          after standardising each dimension by the references' spread ("knn_stats"). The
          mean of a textured patch's features is close to the features of its mean colour, so
          a flat fill looks typical to "ms"; its spread, and the magnitude cosine drops, do not.
        """
        h, parts, stats = self.stem(x), [], []

        def pool(t):
            stats.append(t.float().mean(dim=(2, 3)))
            if t.shape[-1] * t.shape[-2] > 1:
                stats.append(t.float().std(dim=(2, 3), unbiased=False))

        pool(h)
        for i, stage in enumerate(self.stages):
            h = stage(h)
            if i < len(self.stages) - 1:
                parts.append(F.normalize(h.float().mean(dim=(2, 3)), dim=-1))
                pool(h)
        h = self.final_norm(h)
        pool(h)
        z = h.mean(dim=(2, 3))
        parts.append(F.normalize(z.float(), dim=-1))
        return z, torch.cat(parts, -1) / math.sqrt(len(parts)), torch.cat(stats, -1)


def resnet_v2(block: type, layers: Sequence[int], norm: str = "layer", width: int = 64,
              in_channels: int = 3, stem: str = "imagenet") -> PatchEncoder:
    """Pre-activation ResNet with three stages (widths w, 2w, 4w; strides 1, 2, 2)."""
    stages, c = [], width
    for i, n in enumerate(layers):
        w = width * 2 ** i
        blocks = []
        for j in range(n):
            blocks.append(block(c, w, 2 if (i > 0 and j == 0) else 1, norm))
            c = w * block.expansion
        stages.append(nn.Sequential(*blocks))
    return PatchEncoder(width, nn.Sequential(*stages), c, norm, in_channels, stem)


class DenseLayer(nn.Module):
    """norm-ReLU-conv1x1 (4k) -> norm-ReLU-conv3x3 (k); output concatenated to its input."""

    def __init__(self, c_in: int, growth: int, norm: str):
        super().__init__()
        self.body = nn.Sequential(norm_layer(norm, c_in), nn.ReLU(), nn.Conv2d(c_in, 4 * growth, 1, bias=False),
                                  norm_layer(norm, 4 * growth), nn.ReLU(),
                                  nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


def densenet(layers: Sequence[int] = (6, 12, 24), norm: str = "layer", width: int = 64,
             in_channels: int = 3, stem: str = "imagenet") -> PatchEncoder:
    """DenseNet-121 cut after its third dense block (growth rate width/2; transitions halve
    channels and size)."""
    stages, c, growth = [], width, width // 2
    for i, n in enumerate(layers):
        mods = []
        if i > 0:  # transition: norm-ReLU-conv1x1 halving channels, then 2x2 average pool
            mods += [norm_layer(norm, c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
            c //= 2
        for _ in range(n):
            mods.append(DenseLayer(c, growth, norm))
            c += growth
        stages.append(nn.Sequential(*mods))
    return PatchEncoder(width, nn.Sequential(*stages), c, norm, in_channels, stem)


ENCODERS: dict[str, Callable[..., PatchEncoder]] = {
    # name: builder(norm, width, in_channels, stem)    D     params (width 64, LayerNorm, "imagenet" stem)
    "resnet18v2": lambda **kw: resnet_v2(PreActBasicBlock, (2, 2, 2), **kw),   # 256    2.78 M
    "resnet50v2": lambda **kw: resnet_v2(PreActBottleneck, (3, 4, 6), **kw),   # 1024   8.54 M
    "densenet": lambda **kw: densenet((6, 12, 24), **kw),                      # 1024   4.27 M
}


def build_encoder(name: str, norm: str = "layer", width: int = 64, in_channels: int = 3,
                  stem: str = "imagenet") -> PatchEncoder:
    """Build a patch encoder from the `ENCODERS` registry; `width` scales every channel count,
    `stem` is one of `STEMS` (see `make_stem`)."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; available: {', '.join(ENCODERS)}")
    enc = ENCODERS[name](norm=norm, width=width, in_channels=in_channels, stem=stem)
    return enc.to(memory_format=torch.channels_last)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
