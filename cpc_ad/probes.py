"""What CPC learned (notebook 01): prediction accuracy on held-out images and linear / kNN
probes of the encoder's patch features against defect masks, trained and untrained."""
from __future__ import annotations

import math
import random
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import ImageSet
from .checks import check_param
from .patches import PatchGrid, extract_patches, patch_positions, to_float
from .models import CPC, encode_grid
from .training import _batches
from .metrics import _mean_std


# CPC's training loss flatters it: most in-batch negatives come from other images, so a model
# that only knows which image a patch came from already beats chance. `prediction_metrics`
# asks the spatial question with the image's own patches as the only negatives, and the
# patch probes ask whether frozen embeddings find defects, always beside the same network
# untrained and beside raw pixels.

PROBE_MIN_FRACTION = 0.1   # a patch is a defect patch when at least this fraction of its pixels is
PROBE_MAX_REFERENCES = 16384  # normal patches the kNN probe compares against (a seeded sample beyond)


@torch.no_grad()
def prediction_metrics(model: CPC, images: torch.Tensor, negatives: str = "image", batch_size: int = 16,
                       device: torch.device | str = "cpu", seed: int = 0) -> dict:
    """CPC's loss and accuracy per step k on held-out images (see `CPC.loss`).

    negatives="image": every other patch of the same image, nothing else (chance: one in the
    number of distinct patch positions of an image). negatives="batch": the training objective,
    `num_negatives` drawn from the whole batch of `batch_size` images with a fixed seed.
    Returns {"loss_per_step": [K], "acc_per_step": [K], "chance_loss", "chance_accuracy"}.
    """
    device = torch.device(device)
    model.eval().to(device)
    g = torch.Generator().manual_seed(seed)
    loss = acc = 0
    for idx in _batches(len(images), batch_size, None):
        out = model.loss(to_float(images[idx].to(device)), g, negatives)
        loss = loss + out["loss_per_step"].float().cpu() * len(idx)
        acc = acc + out["acc_per_step"].float().cpu() * len(idx)
    candidates = (len(torch.unique(patch_positions(1, model.grid))) if negatives == "image"
                  else model.cfg.num_negatives + 1)
    return {"loss_per_step": (loss / len(images)).tolist(), "acc_per_step": (acc / len(images)).tolist(),
            "chance_loss": math.log(candidates), "chance_accuracy": 1 / candidates}


PROBE_DESCRIPTORS = ("z", "stats")


@torch.no_grad()
def patch_embeddings(encoder: nn.Module, images: torch.Tensor, grid: PatchGrid, batch_size: int = 32,
                     device: torch.device | str = "cpu", descriptor: str = "z") -> torch.Tensor:
    """Frozen features of every grid patch: (N, n_sub * G * G, F) float32, on the CPU.

    descriptor "z": the embedding CPC predicts (F = D); "stats": the stage statistics of
    `PatchEncoder.multiscale` (the mean and spatial spread of every channel of every stage),
    the descriptor the `knn_stats` detector compares.
    """
    check_param("descriptor", descriptor, "str", choices=PROBE_DESCRIPTORS)
    return _patch_descriptors(encoder, images, grid, batch_size, device)[descriptor]


@torch.no_grad()
def _patch_descriptors(encoder: nn.Module, images: torch.Tensor, grid: PatchGrid, batch_size: int = 32,
                       device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every PROBE_DESCRIPTORS reading of every grid patch from one encoding pass:
    {"z" | "stats": (N, n_sub * G * G, F) float32, on the CPU}."""
    encoder.eval().to(device)
    out = {d: [] for d in PROBE_DESCRIPTORS}
    for x in images.split(batch_size):
        z, _, stats = encode_grid(encoder, to_float(x.to(device)), grid, multiscale=True)  # (b * n_sub, F, G, G)
        for d, t in (("z", z), ("stats", stats)):
            out[d].append(t.float().permute(0, 2, 3, 1).reshape(len(x), -1, t.shape[1]).cpu())
    return {d: torch.cat(v) for d, v in out.items()}


def pixel_patch_features(images: torch.Tensor, grid: PatchGrid, size: int = 4) -> torch.Tensor:
    """The raw-pixel reference: every grid patch average-pooled to size x size pixels,
    (N, n_sub * G * G, 3 * size * size)."""
    out = []
    for x in images.split(32):
        p = extract_patches(to_float(x), grid)                            # (b * n_sub, G, G, C, P, P)
        q = F.adaptive_avg_pool2d(p.reshape(-1, *p.shape[3:]), size)
        out.append(q.reshape(len(x), -1, q[0].numel()))
    return torch.cat(out)


def patch_defect_fraction(masks: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """The fraction of each grid patch's pixels inside the defect mask: (N, n_sub * G * G)."""
    return torch.cat([extract_patches(m.float(), grid).mean(dim=(3, 4, 5)).reshape(len(m), -1)
                      for m in masks.split(32)])


def patch_probes(fit: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                 normal: torch.Tensor, min_fraction: float = PROBE_MIN_FRACTION, seed: int = 0) -> dict:
    """Can these frozen patch features find defects? Two probes, scored by AUROC on test patches.

    * linear: a logistic regression on standardised features, fit to tell defect patches from
      normal ones in `fit` (synthetic anomalies pasted into held-out normals, never test/) and
      scored on `test`'s patches (the real defects): CPC's linear evaluation, per patch.
    * knn (no labels): each test patch's Euclidean distance, after standardising by the normal
      patches' mean and spread, to its nearest normal patch; AUROC over patches, and over
      images with each image's largest distance.
    A patch counts as a defect when at least `min_fraction` of its pixels are; patches with a
    smaller, non-zero share are neither clearly normal nor defective and are left out.

    Args:
        fit, test: (features (N, n, F), defect fraction (N, n)) as from `patch_embeddings` (or
            `pixel_patch_features`) and `patch_defect_fraction`.
        normal: (M, n, F) features of normal images (the training images), for the kNN.
    Returns {"linear_auroc", "knn_auroc", "knn_image_auroc"}.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def labelled(features, fraction):
        keep = ((fraction == 0) | (fraction >= min_fraction)).reshape(-1)
        return features.reshape(-1, features.shape[-1])[keep].numpy(), (fraction.reshape(-1)[keep] > 0).numpy(), keep

    x_fit, y_fit, _ = labelled(*fit)
    x_test, y_test, keep = labelled(*test)
    for what, y in (("fit", y_fit), ("test", y_test)):
        if y.all() or not y.any():
            raise ValueError(f"the {what} patches need both defect and normal patches (defect: at least "
                             f"{min_fraction:.0%} of the pixels); got {int(y.sum())} of {len(y)} defective")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, class_weight="balanced"))
    linear = roc_auc_score(y_test, clf.fit(x_fit, y_fit).decision_function(x_test))

    ref = normal.reshape(-1, normal.shape[-1])
    if len(ref) > PROBE_MAX_REFERENCES:
        ref = ref[torch.randperm(len(ref), generator=torch.Generator().manual_seed(seed))[:PROBE_MAX_REFERENCES]]
    mu, sd = ref.mean(0), ref.std(0) + 1e-6
    ref, query = (ref - mu) / sd, ((test[0] - mu) / sd).reshape(-1, ref.shape[-1])
    distance = torch.cat([torch.cdist(q, ref).min(1).values for q in query.split(4096)]).view(test[1].shape)
    image_labels = (test[1] > 0).any(1).numpy()
    return {"linear_auroc": float(linear),
            "knn_auroc": float(roc_auc_score(y_test, distance.reshape(-1)[keep].numpy())),
            "knn_image_auroc": float(roc_auc_score(image_labels, distance.max(1).values.numpy()))}


# name: what it is; "trained" (the CPC-trained encoder read as the knn_stats detector reads it) is the headline
PROBE_FEATURES = {"trained": "CPC-trained encoder, stage statistics", "random": "same encoder at random init, stage statistics",
                  "trained_z": "CPC-trained encoder, embedding z", "random_z": "same encoder at random init, embedding z",
                  "pixel": "raw pixels"}
PROBE_METRICS = {"knn_auroc": "kNN, patch AUROC", "knn_image_auroc": "kNN, image AUROC",
                 "linear_auroc": "linear probe, patch AUROC"}  # the first is notebook 01's headline


def probe_representations(trained: nn.Module, random: nn.Module, train: ImageSet, fit: ImageSet, test: ImageSet,
                          grid: PatchGrid, device: torch.device | str = "cpu", seed: int = 0) -> dict:
    """`patch_probes` of five representations (`PROBE_FEATURES`): the CPC-trained encoder and
    the same encoder at its random initialisation, each read as stage statistics (what the
    knn_stats detector compares; the headline) and as the embedding z, and raw pixels. fit:
    normals with synthetic anomalies (for the linear probe), train: the normal images the kNN
    compares against, test: real defects.
    Returns {name in PROBE_FEATURES: {"linear_auroc", "knn_auroc", "knn_image_auroc"}}."""
    sets = {"fit": fit, "test": test, "train": train}
    features = {"pixel": {k: pixel_patch_features(v.images, grid) for k, v in sets.items()}}
    for name, encoder in (("trained", trained), ("random", random)):  # one encoding pass per encoder and set
        both = {k: _patch_descriptors(encoder, v.images, grid, device=device) for k, v in sets.items()}
        features[name] = {k: d["stats"] for k, d in both.items()}
        features[f"{name}_z"] = {k: d["z"] for k, d in both.items()}
    fit_fraction, test_fraction = patch_defect_fraction(fit.masks, grid), patch_defect_fraction(test.masks, grid)
    return {name: patch_probes((features[name]["fit"], fit_fraction), (features[name]["test"], test_fraction),
                               features[name]["train"], seed=seed) for name in PROBE_FEATURES}


PROBE_MARGIN = 0.02  # AUROC the trained encoder must gain over its random init, on average and in every seed


def probe_verdict(runs: list[dict], metric: str = "knn_auroc", margin: float = PROBE_MARGIN,
                  against: str = "random") -> tuple[bool, list[float]]:
    """Does the trained encoder beat `against` (its random initialisation, or "pixel") on
    `metric`? Over the seeds' `probe_representations`: (mean gain >= margin and a gain in
    every seed, gain per seed)."""
    gains = [r["trained"][metric] - r[against][metric] for r in runs]
    return bool(np.mean(gains) >= margin and min(gains) > 0), gains


def mean_pm(values: Sequence[float], digits: int = 3) -> str:
    m, sd = _mean_std(list(values))
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def probe_table(runs: list[dict]) -> str:
    """Markdown: one row per representation, mean ± std over the seeds' `probe_representations`."""
    lines = ["| features | " + " | ".join(PROBE_METRICS.values()) + " |", "|---" * (len(PROBE_METRICS) + 1) + "|"]
    for f, name in PROBE_FEATURES.items():
        lines.append(f"| {name} | " + " | ".join(mean_pm([r[f][m] for r in runs]) for m in PROBE_METRICS) + " |")
    return "\n".join(lines)


def prediction_table(runs: list[dict]) -> str:
    """Markdown: CPC's loss and accuracy per step k, negatives from the batch and from the same
    image only, mean ± std over seeds. runs: [{"batch": prediction_metrics, "image": ...}]."""
    lines = ["| k | batch negatives: loss | accuracy | same-image negatives: loss | accuracy |", "|---" * 5 + "|"]
    for k in range(len(runs[0]["image"]["acc_per_step"])):
        lines.append(f"| {k + 1} | " + " | ".join(mean_pm([r[n][m][k] for r in runs]) for n in ("batch", "image")
                                                    for m in ("loss_per_step", "acc_per_step")) + " |")
    lines.append("| chance | " + " | ".join(f"{runs[0][n][c]:.3f}" for n in ("batch", "image")
                                              for c in ("chance_loss", "chance_accuracy")) + " |")
    return "\n".join(lines)
