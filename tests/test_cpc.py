"""CPC and CPC-AD section: the InfoNCE loss against a plain loop, causality of the PixelCNN
context, which rows CPC predicts, CPC-AD's directions, per-patch losses, bank and scoring."""
from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import cpc_utils as cu
import cpc_ad.models
from conftest import random_images

STEP = {"top_down": (1, 0), "bottom_up": (-1, 0), "left_right": (0, 1), "right_left": (0, -1)}


# ---- InfoNCE -------------------------------------------------------------------------

def loop_info_nce(pred, positive, candidates, negatives, similarity="dot", temperature=1.0):
    """InfoNCE one row at a time in float64: negatives[n] lists the candidate rows of row n."""
    def score(a, b):
        a, b = a.double(), b.double()
        if similarity == "cosine":
            a, b = a / a.norm(), b / b.norm()
        return float(a @ b) / temperature

    losses, correct = [], []
    for n in range(len(pred)):
        s_pos = score(pred[n], positive[n])
        s_neg = [score(pred[n], candidates[j]) for j in negatives[n]]
        top = max([s_pos] + s_neg)
        losses.append(top + math.log(sum(math.exp(s - top) for s in [s_pos] + s_neg)) - s_pos)
        correct.append(s_pos > max(s_neg))
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(correct)


@pytest.mark.parametrize("similarity, temperature", [("dot", 1.0), ("dot", 0.5), ("cosine", 0.1)])
def test_info_nce_all_candidates_matches_loop(similarity, temperature):
    pred, positive, candidates = torch.randn(7, 5), torch.randn(7, 5), torch.randn(11, 5)
    loss, correct = cu.info_nce(pred, positive, candidates, None, similarity=similarity, temperature=temperature)
    ref, ref_correct = loop_info_nce(pred, positive, candidates, [range(11)] * 7, similarity, temperature)
    assert loss.shape == (7,) and correct.dtype == torch.bool
    assert torch.allclose(loss.double(), ref, atol=1e-5)
    assert torch.equal(correct, ref_correct)


def test_info_nce_all_candidates_excludes_the_positive():
    pred, candidates = torch.randn(6, 4), torch.randn(9, 4)
    pos_index = torch.tensor([0, 3, 8, 3, 5, 1])
    loss, _ = cu.info_nce(pred, candidates[pos_index], candidates, None, pos_index)
    negatives = [[j for j in range(9) if j != p] for p in pos_index.tolist()]
    ref, _ = loop_info_nce(pred, candidates[pos_index], candidates, negatives)
    assert torch.allclose(loss.double(), ref, atol=1e-5)


@pytest.mark.parametrize("with_pos_index", [False, True])
def test_info_nce_sampled_negatives_match_loop(with_pos_index):
    """Reproduce the sampling with the same generator seed, then compute the loss by hand."""
    N, M, K = 8, 10, 6
    pred, candidates = torch.randn(N, 3), torch.randn(M, 3)
    pos_index = torch.randint(0, M, (N,)) if with_pos_index else None
    positive = candidates[pos_index] if with_pos_index else torch.randn(N, 3)
    loss, correct = cu.info_nce(pred, positive, candidates, K, pos_index, torch.Generator().manual_seed(42))

    draws = torch.randint(0, M - with_pos_index, (N, K), generator=torch.Generator().manual_seed(42))
    negatives = []
    for n in range(N):
        row = [r + (with_pos_index and r >= pos_index[n]) for r in draws[n].tolist()]
        if with_pos_index:
            assert pos_index[n].item() not in row and max(row) < M
        negatives.append(row)
    ref, ref_correct = loop_info_nce(pred, positive, candidates, negatives)
    assert torch.allclose(loss.double(), ref, atol=1e-5)
    assert torch.equal(correct, ref_correct)


def test_info_nce_never_samples_the_positive_as_a_negative():
    """With 3 candidates and 50 draws per row, a row would meet its own positive for sure;
    a sampled copy of the positive would cost at least log 2."""
    candidates = torch.eye(3) * 10
    loss, correct = cu.info_nce(candidates, candidates, candidates, 50, torch.arange(3),
                                torch.Generator().manual_seed(0), "cosine", 0.01)
    assert loss.max() < 1e-6 and correct.all()


def test_info_nce_draws_every_other_candidate():
    """Which negative cu.info_nce drew can be read off its loss: with one negative per row and
    candidate j scoring j + 1 against a positive scoring 0, the loss is log(1 + e^(j + 1)).
    Every candidate but the positive (index 2) must be drawn, about equally often."""
    M, N = 5, 4000
    candidates = torch.arange(1, M + 1, dtype=torch.float32)[:, None]  # score j + 1 against pred = 1
    loss, _ = cu.info_nce(torch.ones(N, 1), torch.zeros(N, 1), candidates, 1, torch.full((N,), 2),
                          torch.Generator().manual_seed(0))
    drawn = (torch.log(torch.expm1(loss.double())) - 1).round().long()  # invert log(1 + e^s)
    counts = torch.bincount(drawn, minlength=M)
    assert counts[2] == 0 and (counts[[0, 1, 3, 4]] > 0.2 * N).all(), counts  # uniform: N / 4 each


def test_info_nce_counts_ties_as_misses():
    """A model that maps every patch of an image to the same embedding ties the positive with
    its negatives: that is no correct prediction, and the loss is log(number of candidates)."""
    z = torch.ones(6, 4)
    loss, correct = cu.info_nce(z, z, z, None, torch.arange(6))
    assert not correct.any()
    assert torch.allclose(loss, torch.full((6,), math.log(6)))


def test_info_nce_perfect_predictions_give_zero_loss():
    z = torch.randn(16, 256)
    loss, correct = cu.info_nce(z, z, z, 15, torch.arange(16), torch.Generator().manual_seed(0), "cosine", 0.01)
    assert loss.max() < 1e-3 and correct.all()
    q = torch.linalg.qr(torch.randn(32, 32))[0]          # orthonormal rows: dot scores 50 vs 0
    loss, correct = cu.info_nce(50 * q, q, q, None, torch.arange(32))
    assert loss.max() < 32 * math.exp(-50) + 1e-6 and correct.all()


@pytest.mark.parametrize("num_negatives", [15, None])
def test_info_nce_random_predictions_give_log_n_plus_one(num_negatives):
    N, M, D = 3000, 15 if num_negatives is None else 400, 256
    pred, positive, candidates = torch.randn(N, D), torch.randn(N, D), torch.randn(M, D)
    loss, correct = cu.info_nce(pred, positive, candidates, num_negatives, None,
                                torch.Generator().manual_seed(0), "cosine", 1.0)
    assert loss.mean().item() == pytest.approx(math.log(16), abs=0.02)
    assert correct.float().mean().item() == pytest.approx(1 / 16, abs=0.02)


def test_info_nce_positive_in_column_zero_gives_cross_entropy():
    """The MoCo form: cross-entropy of [positive, negatives] logits with target 0."""
    pred, positive, candidates = torch.randn(4, 3), torch.randn(4, 3), torch.randn(5, 3)
    loss, _ = cu.info_nce(pred, positive, candidates, None)
    logits = torch.cat([(pred * positive).sum(1, keepdim=True), pred @ candidates.T], 1)
    assert torch.allclose(loss, F.cross_entropy(logits, torch.zeros(4, dtype=torch.long), reduction="none"))


@pytest.mark.parametrize("num_negatives", [None, 6])
def test_info_nce_keys_exclude_copies_of_the_positive(num_negatives):
    """A negative with the row's key scores -inf: the loss is the loop's over the other negatives."""
    N, M = 8, 10
    pred, candidates = torch.randn(N, 3), torch.randn(M, 3)
    cand_key = torch.tensor([0, 1, 2, 0, 1, 2, 3, 4, 0, 5])      # copies: 0 x3, 1 x2, 2 x2
    pos_index = torch.randint(0, M, (N,))
    loss, correct = cu.info_nce(pred, candidates[pos_index], candidates, num_negatives, pos_index,
                                torch.Generator().manual_seed(42), pos_key=cand_key[pos_index], cand_key=cand_key)
    if num_negatives is None:
        draws = [range(M)] * N
    else:
        r = torch.randint(0, M - 1, (N, num_negatives), generator=torch.Generator().manual_seed(42))
        draws = (r + (r >= pos_index[:, None]).long()).tolist()
    negatives = [[j for j in row if cand_key[j] != cand_key[p]] for row, p in zip(draws, pos_index.tolist())]
    assert any(len(n) < len(d) - (num_negatives is None) for n, d in zip(negatives, draws))  # copies were drawn
    ref, ref_correct = loop_info_nce(pred, candidates[pos_index], candidates, negatives)
    assert torch.isfinite(loss).all() and torch.allclose(loss.double(), ref, atol=1e-5)
    assert torch.equal(correct, ref_correct)


def test_info_nce_row_with_only_copies_as_negatives():
    """Every negative a copy: loss 0 and correct, no NaN in the loss or its gradient."""
    pred = torch.randn(2, 4, requires_grad=True)
    candidates = torch.randn(3, 4)
    key = torch.zeros(3, dtype=torch.long)
    loss, correct = cu.info_nce(pred, candidates[:2], candidates, 5, torch.arange(2), torch.Generator().manual_seed(0),
                                pos_key=key[:2], cand_key=key)
    assert torch.equal(loss, torch.zeros(2)) and correct.all()
    loss.sum().backward()
    assert torch.isfinite(pred.grad).all()


def test_unknown_similarity_raises():
    with pytest.raises(ValueError, match="cosine"):
        cu.info_nce(torch.randn(2, 3), torch.randn(2, 3), torch.randn(4, 3), None, similarity="l2")


# ---- PixelCNN context ----------------------------------------------------------------

def test_causal_conv_keeps_shape():
    conv = cu.CausalConv2d(3, 5, (2, 3))
    assert conv(torch.randn(2, 3, 6, 6)).shape == (2, 5, 6, 6)


def test_pixelcnn_context_is_causal():
    """Changing a patch in row i changes the context of row i and leaves rows above it alone."""
    G = 6
    ctx = cu.PixelCNNContext(dim=4, hidden=8, layers=3).eval()
    z = torch.randn(2, 4, G, G)
    with torch.no_grad():
        c = ctx(z)
        assert c.shape == (2, 8, G, G)
        for i in range(G):
            for j in range(G):
                z2 = z.clone()
                z2[:, :, i, j] = torch.randn(2, 4)
                diff = (ctx(z2) - c).abs().amax(dim=(0, 1))                 # (G, G)
                assert diff[:i].sum() <= 1e-6, f"patch ({i}, {j}) leaked into rows above it"
                assert diff[i, j] > 1e-3                                    # its own row sees it
                if i + 1 < G:
                    assert diff[i + 1].max() > 1e-3                         # and so do rows below


# ---- CPC -----------------------------------------------------------------------------

def tiny_cpc(grid: cu.PatchGrid, pred_steps: int = 2, **kw) -> cu.CPC:
    cfg = cu.CPCConfig(width=8, pred_steps=pred_steps, num_negatives=8, context_dim=16, context_layers=2, **kw)
    return cu.CPC(cfg, grid)


def test_cpc_loss_outputs():
    model = tiny_cpc(cu.PatchGrid(64, 16, 8), pred_steps=3)
    x = torch.randn(2, 3, 64, 64)
    out = model.loss(x, torch.Generator().manual_seed(0))
    assert out["loss"].shape == () and torch.isfinite(out["loss"])
    assert out["loss_per_step"].shape == (3,) and out["acc_per_step"].shape == (3,)
    assert ((0 <= out["acc_per_step"]) & (out["acc_per_step"] <= 1)).all()
    assert torch.allclose(out["loss"], out["loss_per_step"].mean())
    again = model.loss(x, torch.Generator().manual_seed(0))
    assert torch.equal(out["loss"], again["loss"])  # all randomness comes from the generator
    out["loss"].backward()
    for p in (model.encoder.stem[0].weight, model.context.inp.weight, model.W[2].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("grid", [cu.PatchGrid(64, 16, 8), cu.PatchGrid(64, 16, 16), cu.PatchGrid(64, 24, 8)],
                         ids=["overlap1", "overlap0", "overlap2"])
def test_cpc_targets_skip_overlapping_rows(grid, monkeypatch):
    """Context row i predicts row i + overlap_steps + k with W_k, and the candidates are the batch."""
    calls, info_nce = [], cu.info_nce

    def spy(*args, **kwargs):
        calls.append(inspect.signature(info_nce).bind(*args, **kwargs).arguments)
        return info_nce(*args, **kwargs)

    monkeypatch.setattr(cpc_ad.models, "info_nce", spy)
    model = tiny_cpc(grid, pred_steps=2)
    x = torch.randn(2, 3, 64, 64)
    model.loss(x, torch.Generator().manual_seed(0))
    B, G, off = 2, grid.grid, grid.overlap_steps
    with torch.no_grad():
        z = cu.encode_grid(model.encoder, x, grid)                        # (B, D, G, G)
        c = model.context(z)
    D = z.shape[1]
    flat = z.permute(0, 2, 3, 1).reshape(-1, D)
    assert len(calls) == 2
    for k, call in enumerate(calls, start=1):
        rows = G - off - k
        b, i, j = torch.meshgrid(torch.arange(B), torch.arange(rows), torch.arange(G), indexing="ij")
        assert torch.equal(call["pos_index"], (b * G * G + (i + off + k) * G + j).reshape(-1))
        assert torch.allclose(call["candidates"], flat, atol=1e-5)
        assert torch.allclose(call["positive"], flat[call["pos_index"]], atol=1e-5)
        expected_pred = model.W[k - 1](c[:, :, :rows].permute(0, 2, 3, 1)).reshape(-1, D)
        assert torch.allclose(call["pred"], expected_pred, atol=1e-5)
        assert call["num_negatives"] == 8


def test_cpc_same_image_negatives_stay_inside_each_image():
    """negatives="image": each image's predictions meet its own patches only, so a batch scores
    exactly as its images one by one, and every other patch of the image is a negative."""
    grid = cu.PatchGrid(64, 16, 8)
    model = tiny_cpc(grid, pred_steps=2).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        batch = model.loss(x, negatives="image")
        alone = [model.loss(x[i:i + 1], negatives="image") for i in range(3)]
        assert torch.allclose(batch["loss_per_step"], torch.stack([a["loss_per_step"] for a in alone]).mean(0))
        z = cu.encode_grid(model.encoder, x[:1], grid)                         # (1, D, 7, 7)
        c = model.context(z)
        pred = model.W[0](c[0, :, :5].permute(1, 2, 0).reshape(-1, c.shape[1]))  # rows 0..4 predict rows 2..6
    flat = z[0].permute(1, 2, 0).reshape(-1, z.shape[1])                       # (49, D)
    pos = (torch.arange(2, 7)[:, None] * 7 + torch.arange(7)).reshape(-1)
    ref, _ = loop_info_nce(pred, flat[pos], flat, [[j for j in range(49) if j != p] for p in pos.tolist()])
    assert alone[0]["loss_per_step"][0].item() == pytest.approx(ref.mean().item(), abs=1e-4)
    with pytest.raises(ValueError, match="negatives"):
        model.loss(x, negatives="other")


def test_same_image_negatives_defeat_a_source_image_recogniser():
    """Uniform images: every patch of an image looks the same, so knowing the image is all a
    model can know. With batch negatives (other colours) it still scores hits; with same-image
    negatives it is at chance exactly: loss log(49), no hit."""
    grid = cu.PatchGrid(64, 16, 8)
    model = tiny_cpc(grid, pred_steps=2).eval()
    x = (torch.rand(8, 3, 1, 1) * 255).to(torch.uint8).expand(8, 3, 64, 64).contiguous()
    image = cu.prediction_metrics(model, x, "image", batch_size=8)
    batch = cu.prediction_metrics(model, x, "batch", batch_size=8)
    assert image["chance_loss"] == pytest.approx(math.log(49)) and image["chance_accuracy"] == pytest.approx(1 / 49)
    assert image["loss_per_step"] == pytest.approx([math.log(49)] * 2, abs=1e-3)
    assert image["acc_per_step"] == [0.0, 0.0]
    assert batch["chance_loss"] == pytest.approx(math.log(9))
    assert all(a > 0 for a in batch["acc_per_step"])  # other images' patches are told apart


def test_prediction_metrics_chance_counts_distinct_positions():
    """Overlapping sub-images repeat windows: chance is one in the image's distinct positions."""
    grid = cu.PatchGrid(96, 16, 8, subimage_size=64, subimage_stride=32)   # 4 sub-images of 7x7, 11x11 positions
    model = tiny_cpc(grid, pred_steps=2)
    m = cu.prediction_metrics(model, (torch.rand(2, 3, 96, 96) * 255).to(torch.uint8), "image")
    assert m["chance_accuracy"] == pytest.approx(1 / 121)
    assert len(m["acc_per_step"]) == 2 and all(0 <= a <= 1 for a in m["acc_per_step"])


def test_cpc_without_context_raises():
    with pytest.raises(ValueError, match="no context"):
        tiny_cpc(cu.PatchGrid(32, 16, 8), pred_steps=2)   # 3 rows - 1 overlap - 2 steps = 0
    tiny_cpc(cu.PatchGrid(32, 16, 8), pred_steps=1)
    with pytest.raises(ValueError):
        tiny_cpc(cu.PatchGrid(64, 16, 8), pred_steps=6)


# ---- CPC-AD: directions --------------------------------------------------------------

@pytest.mark.parametrize("direction", cu.DIRECTIONS)
def test_orient_unorient_are_inverses(direction):
    t = torch.randn(2, 3, 5, 5)
    assert torch.equal(cu.unorient(cu.orient(t, direction), direction), t)
    assert torch.equal(cu.orient(cu.unorient(t, direction), direction), t)


@pytest.mark.parametrize("direction", cu.DIRECTIONS)
def test_orient_turns_direction_into_row_i_to_row_i_plus_k(direction):
    G = 5
    pos = torch.stack(torch.meshgrid(torch.arange(G), torch.arange(G), indexing="ij"))  # (2, G, G): (row, col)
    o = cu.orient(pos, direction)
    step = torch.tensor(STEP[direction])
    for k in range(1, G):
        assert (o[:, k:] - o[:, :-k] == k * step[:, None, None]).all()   # k rows down = k steps along direction
    side = (o[:, :, 1:] - o[:, :, :-1]).abs().sum(0)
    assert (side == 1).all() and (o[:, :, 1:] - o[:, :, :-1])[:, 0, 0] @ step == 0  # columns: a perpendicular step


def test_unknown_direction_raises():
    with pytest.raises(ValueError, match="top_down"):
        cu.orient(torch.zeros(3, 3), "diagonal")


# ---- CPC-AD: model -------------------------------------------------------------------

def tiny_cpcad(grid: cu.PatchGrid, **kw) -> cu.CPCAD:
    kw = {"width": 8, "pred_steps": 2, "target_offset": 0, "num_negatives": 8,
          "similarity": "cosine", "temperature": 0.1, "norm": "layer", **kw}
    return cu.CPCAD(cu.CPCADConfig(**kw), grid)


@pytest.mark.parametrize("shared, n_enc", [(True, 1), (False, 4)])
def test_shared_encoder(shared, n_enc):
    model = tiny_cpcad(cu.PatchGrid(32, 16, 8), shared_encoder=shared)
    assert len(model.encoders) == n_enc
    assert model.W.shape == (4, 2, 32, 32)
    zs = model.encode(torch.randn(2, 3, 32, 32))
    assert len(zs) == n_enc and all(z.shape == (2, 32, 3, 3) for z in zs)
    if not shared:
        assert not torch.equal(model.encoders[0].stem[0].weight, model.encoders[1].stem[0].weight)


@pytest.mark.parametrize("directions", [("top_down",), ("left_right",), ("top_down", "left_right"),
                                        ("bottom_up", "right_left")])
def test_directions_that_leave_patches_unpredicted_raise(directions):
    with pytest.raises(ValueError, match="never predicted"):
        tiny_cpcad(cu.PatchGrid(32, 16, 8), directions=directions)


@pytest.mark.parametrize("directions", [("top_down", "bottom_up"), ("left_right", "right_left"), cu.DIRECTIONS])
def test_opposite_directions_cover_every_patch(directions):
    model = tiny_cpcad(cu.PatchGrid(32, 16, 8), directions=directions)
    out = model.patch_losses(model.encode(torch.randn(2, 3, 32, 32)), generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 3) and torch.isfinite(out).all() and (out > 0).all()


def test_cpcad_without_context_raises():
    with pytest.raises(ValueError, match="no context"):
        tiny_cpcad(cu.PatchGrid(32, 16, 8), pred_steps=3)
    with pytest.raises(ValueError, match="no context"):
        tiny_cpcad(cu.PatchGrid(32, 16, 8), pred_steps=2, target_offset=1)


@pytest.mark.parametrize("target_offset", [0, 1])
@pytest.mark.parametrize("shared", [True, False])
def test_patch_losses_match_loop(target_offset, shared):
    """Against a bank: each prediction z_t W_k scored against its target z_{t+offset+k}
    along the direction, loss assigned to the target, averaged over every prediction of it."""
    grid = cu.PatchGrid(64, 16, 16)  # 4x4 patches
    model = tiny_cpcad(grid, target_offset=target_offset, shared_encoder=shared).eval()
    with torch.no_grad():
        zs = model.encode(torch.randn(2, 3, 64, 64))
        bank = torch.randn(len(zs), 20, zs[0].shape[1])
        out = model.patch_losses(zs, bank)
    B, G, T = 2, 4, 0.1
    total, count = torch.zeros(B, G, G, dtype=torch.float64), torch.zeros(G, G, dtype=torch.float64)
    for d, direction in enumerate(model.cfg.directions):
        z, negatives = zs[d % len(zs)].double(), F.normalize(bank[d % len(zs)].double(), dim=-1)
        dy, dx = STEP[direction]
        for k in (1, 2):
            s = target_offset + k
            for i in range(G):
                for j in range(G):
                    ti, tj = i + s * dy, j + s * dx
                    if not (0 <= ti < G and 0 <= tj < G):
                        continue
                    pred = F.normalize(z[:, :, i, j] @ model.W[d, k - 1].detach().double(), dim=-1)  # (B, D)
                    pos = (pred * F.normalize(z[:, :, ti, tj], dim=-1)).sum(-1, keepdim=True) / T
                    logits = torch.cat([pos, pred @ negatives.T / T], 1)
                    total[:, ti, tj] += torch.logsumexp(logits, 1) - logits[:, 0]
                    count[ti, tj] += 1
    assert out.shape == (B, G, G)
    assert torch.allclose(out.double(), total / count, atol=1e-4)


def test_cpcad_same_image_negatives_stay_inside_each_image():
    """negatives="image" in training: a batch's patch losses are its images' one by one (no
    other image is a negative), and on uniform images, whose patches are all alike, the loss
    is at chance log(patches per image) exactly: knowing the image is no help."""
    grid = cu.PatchGrid(64, 16, 8)                                            # 7x7 patches
    model = tiny_cpcad(grid, negatives="image").eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        batch = model.patch_losses(model.encode(x))
        alone = torch.cat([model.patch_losses(model.encode(x[i:i + 1])) for i in range(3)])
        assert torch.allclose(batch, alone, atol=1e-5)
        flat = (torch.rand(4, 3, 1, 1) * 255).to(torch.uint8).expand(4, 3, 64, 64).contiguous()
        uniform = model.loss(cu.to_float(flat))["loss"]
    assert uniform.item() == pytest.approx(math.log(49), abs=1e-3) == model.chance_loss(batch_size=4)
    assert tiny_cpcad(grid).chance_loss(batch_size=4) == pytest.approx(math.log(9))          # 8 batch negatives
    assert tiny_cpcad(grid, num_negatives=None).chance_loss(4) == pytest.approx(math.log(4 * 49))  # all of them
    with pytest.raises(ValueError, match="negatives"):
        tiny_cpcad(grid, negatives="everything")


def test_cpcad_loss_trains_every_part():
    model = tiny_cpcad(cu.PatchGrid(32, 16, 8))
    out = model.loss(torch.randn(3, 3, 32, 32), torch.Generator().manual_seed(0))
    assert out["loss"].shape == () and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.W.grad.abs().sum() > 0 and model.encoders[0].stem[0].weight.grad.abs().sum() > 0


# ---- CPC-AD: copies of a patch in overlapping sub-images ------------------------------

SUBIMAGES_768 = cu.PatchGrid(768, 64, 32, subimage_size=256, subimage_stride=128)  # 5x5 sub-images x 7x7


def without_keys(monkeypatch):
    """The loss as it was before the keys: info_nce ignoring pos_key and cand_key."""
    info_nce = cu.info_nce
    monkeypatch.setattr(cpc_ad.models, "info_nce", lambda *a, pos_key=None, cand_key=None, **kw: info_nce(*a, **kw))


@pytest.mark.parametrize("grid", [SUBIMAGES_768, cu.PatchGrid(96, 16, 8, subimage_size=64, subimage_stride=32),
                                  cu.PatchGrid(64, 16, 8)], ids=["768", "96", "no-subimages"])
def test_patch_positions_are_the_patch_corners(grid):
    """Keys against the top-left pixel that extract_patches cuts from an image of coordinates."""
    B, H = 2, grid.image_size
    rows, cols = torch.meshgrid(torch.arange(H), torch.arange(H), indexing="ij")
    coords = torch.stack([torch.full((B, H, H), 0) + torch.arange(B)[:, None, None],
                          rows.expand(B, H, H), cols.expand(B, H, H)], 1)          # (B, 3, H, H): b, row, col
    corner = cu.extract_patches(coords, grid)[..., 0, 0].reshape(-1, 3)           # (B'*G*G, 3)
    keys = cu.patch_positions(B, grid)
    assert keys.dtype == torch.long
    assert torch.equal(keys, corner[:, 0] * H * H + corner[:, 1] * H + corner[:, 2])


@pytest.mark.parametrize("num_negatives", [None, 63])
def test_no_identical_windows_among_negatives_on_768_px(num_negatives):
    """Random 768 px images cut into 5x5 overlapping sub-images: pixel vectors as embeddings and
    perfect predictions at temperature 0.01, so each bit-identical window drawn as a negative
    adds 1 to exp(loss) and everything else adds < e^-40. Before the keys: 1.84 copies per
    positive among all candidates; with them: none."""
    grid, B = SUBIMAGES_768, 2
    x = cu.extract_patches(cu.to_float(random_images(B, 768)), grid)[..., ::8, ::8].flatten(3)  # (B', G, G, 192)
    x = x.reshape(-1, x.shape[-1])
    keys = cu.patch_positions(B, grid)
    pos_index = torch.arange(len(x)).view(-1, 7, 7)[:, 1:].reshape(-1)              # top_down, k = 1
    copies = {}
    for keyed in (False, True):
        kw = {"pos_key": keys[pos_index], "cand_key": keys} if keyed else {}
        loss, correct = cu.info_nce(x[pos_index], x[pos_index], x, num_negatives, pos_index,
                                    torch.Generator().manual_seed(0), "cosine", 0.01, **kw)
        copies[keyed] = (loss.double().exp() - 1).mean().item()
    if num_negatives is None:
        assert copies[False] == pytest.approx(1.81, abs=0.01)
    else:
        assert copies[False] > 0.02                        # 63 draws of 2449 x ~1.8 copies: ~0.05
    assert copies[True] < 1e-12


def one_hot_positions(grid: cu.PatchGrid, num_images: int) -> tuple[torch.Tensor, int]:
    """z = one-hot of the patch's absolute position: (B', D, G, G), D = num_images * n * n."""
    n, G = (grid.image_size - grid.patch_size) // grid.stride + 1, grid.grid
    keys = cu.patch_positions(num_images, grid)
    H = grid.image_size
    slot = keys // (H * H) * n * n + keys % (H * H) // H // grid.stride * n + keys % H // grid.stride
    z = F.one_hot(slot, num_images * n * n).float()                                # (B'*G*G, D)
    return z.view(-1, G, G, z.shape[1]).permute(0, 3, 1, 2), n


@pytest.mark.parametrize("num_negatives", [None, 63])
def test_cpcad_perfect_predictions_give_zero_loss_with_subimages(num_negatives, monkeypatch):
    """Each W_k maps the one-hot of a position to the one-hot of its target, so every prediction
    is exact: the training loss is ~0, and only the copies of the target cut from other
    sub-images could raise it (as they did before the keys)."""
    grid = SUBIMAGES_768
    model = tiny_cpcad(grid, pred_steps=1, num_negatives=num_negatives, temperature=0.01)
    z, n = one_hot_positions(grid, 1)
    W = torch.zeros(4, 1, n * n, n * n)
    for d, (dy, dx) in enumerate(STEP[direction] for direction in model.cfg.directions):
        for r in range(n):
            for c in range(n):
                if 0 <= r + dy < n and 0 <= c + dx < n:
                    W[d, 0, r * n + c, (r + dy) * n + c + dx] = 1.0
    model.W = torch.nn.Parameter(W)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        assert model.patch_losses([z], generator=g).max() < 1e-6
        without_keys(monkeypatch)
        assert model.patch_losses([z], generator=torch.Generator().manual_seed(0)).mean() > 0.02


@pytest.mark.parametrize("name", ["cpc", "cpcad"])
def test_losses_without_subimages_are_unchanged(name, monkeypatch):
    """Without sub-images every key is unique: the loss is bitwise the one before the keys."""
    grid = cu.PatchGrid(64, 16, 8)
    model = tiny_cpc(grid) if name == "cpc" else tiny_cpcad(grid)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        now = model.loss(x, torch.Generator().manual_seed(0))["loss"]
        without_keys(monkeypatch)
        before = model.loss(x, torch.Generator().manual_seed(0))["loss"]
    assert torch.equal(now, before)


def test_cpc_loss_passes_the_position_keys(monkeypatch):
    grid = cu.PatchGrid(96, 16, 8, subimage_size=64, subimage_stride=32)
    calls, info_nce = [], cu.info_nce

    def spy(*args, **kwargs):
        calls.append(inspect.signature(info_nce).bind(*args, **kwargs).arguments)
        return info_nce(*args, **kwargs)

    monkeypatch.setattr(cpc_ad.models, "info_nce", spy)
    tiny_cpc(grid).loss(torch.randn(2, 3, 96, 96), torch.Generator().manual_seed(0))
    keys = cu.patch_positions(2, grid)
    assert len(calls) == 2
    for call in calls:
        assert torch.equal(call["cand_key"], keys) and torch.equal(call["pos_key"], keys[call["pos_index"]])


# ---- CPC-AD: bank and scoring --------------------------------------------------------

@pytest.mark.parametrize("shared", [True, False])
def test_build_bank_picks_encoded_patches(shared):
    grid = cu.PatchGrid(96, 16, 8, subimage_size=64, subimage_stride=32)  # 4 sub-images x 7x7
    model = tiny_cpcad(grid, shared_encoder=shared).eval()
    images = random_images(2, 96)
    bank = model.build_bank(images, size=50, seed=3, batch_size=16)
    n_enc = 1 if shared else 4
    assert bank.shape == (n_enc, 50, model.encoders[0].out_dim)
    assert torch.equal(bank, model.build_bank(images, size=50, seed=3, batch_size=16))
    assert torch.allclose(bank, model.build_bank(images, size=50, seed=3, batch_size=7), atol=1e-5)
    assert not torch.allclose(bank, model.build_bank(images, size=50, seed=4))
    pick = torch.randperm(2 * 4 * 49, generator=torch.Generator().manual_seed(3))[:50].sort().values
    with torch.no_grad():
        for e, enc in enumerate(model.encoders):
            z = cu.encode_grid(enc, cu.to_float(images), grid)              # (2 * 4, D, 7, 7)
            every = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])          # index (b, sub, i, j)
            assert torch.allclose(bank[e], every[pick], atol=1e-5)


def test_prepare_scoring_builds_the_configured_bank_and_only_the_detectors_references():
    model, images = tiny_cpcad(cu.PatchGrid(32, 16, 8)), random_images(4, 32)
    s = cu.prepare_scoring(model, images, None, cu.ScoringConfig(test_negatives=20, knn_bank=30), device="cpu")
    assert s["bank"].shape == (1, 20, 32) and set(s["references"]) == {"knn_stats"}
    assert s["references"]["knn_stats"].shape[:2] == (1, 30) and s["grid"] == cu.PatchGrid(32, 16, 4)
    pure = cu.prepare_scoring(model, images, None, cu.scoring_config("paper"), device="cpu")
    assert pure["references"] == {} and pure["grid"] == model.grid  # the loss alone reads no references
    every = cu.prepare_scoring(model, images, None, cu.ScoringConfig(knn_bank=30), kinds=cu.REFERENCE_KINDS,
                               device="cpu")
    assert set(every["references"]) == set(cu.REFERENCE_KINDS)
    assert torch.equal(every["references"]["knn_stats"], cu.prepare_scoring(
        model, images, None, cu.ScoringConfig(knn_bank=30), device="cpu")["references"]["knn_stats"])


def test_score_images_deterministic_and_batch_independent():
    grid = cu.PatchGrid(64, 16, 8)
    model = tiny_cpcad(grid)
    images = random_images(4, 64)
    bank = model.build_bank(images, size=64)
    maps = cu.score_images(model, images, bank, batch_size=4, device="cpu", grid=cu.PatchGrid(64, 16, 4))
    assert maps.shape == (4, 1, 13, 13) and torch.isfinite(maps).all() and (maps > 0).all()
    assert torch.equal(maps, cu.score_images(model, images, bank, batch_size=4, device="cpu", grid=cu.PatchGrid(64, 16, 4)))
    alone = cu.score_images(model, images[2:3], bank, batch_size=1, device="cpu", grid=cu.PatchGrid(64, 16, 4))
    assert torch.allclose(alone, maps[2:3], rtol=1e-5, atol=1e-5)
    uneven = cu.score_images(model, images, bank, batch_size=3, device="cpu", grid=cu.PatchGrid(64, 16, 4))
    assert torch.allclose(uneven, maps, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(maps[0], maps[1])  # different images get different maps


def test_subimage_layout_end_to_end(demo_root):
    """Train one epoch at 96 px with 2x2 sub-images of 64 px, score, and compute every metric."""
    grid = cu.PatchGrid(96, 16, 8, subimage_size=64, subimage_stride=32)
    data = cu.load_category(demo_root, "brick", image_size=96, num_threads=2)
    model = tiny_cpcad(grid, pred_steps=3)
    history = cu.train_model(model, data["train"], None, cu.TrainConfig(epochs=1, batch_size=4, device="cpu"),
                             progress=False)
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"])
    bank = model.build_bank(data["train"].images, size=128)
    score_grid = cu.ScoringConfig().score_grid(grid)
    maps = cu.score_images(model, data["test"].images, bank, device="cpu", grid=score_grid)
    assert maps.shape == (len(data["test"]), 4, 13, 13) and torch.isfinite(maps).all()  # the dense score grid
    result = cu.evaluate_maps(maps, data["test"], score_grid)
    assert result["pixel_maps"].shape == (len(data["test"]), 1, 96, 96)
    assert set(result["scores"]) == {"mean", "max"}
    for key in ("image_auroc", "image_f1_max", "pixel_auroc", "aupro", "image_auroc_max"):
        assert 0.0 <= result["metrics"][key] <= 1.0


def test_cpcad_config_presets():
    grid = cu.PatchGrid(128, 32, 16)
    assert cu.cpcad_config() == cu.CPCADConfig(defect_head=True)  # the one default that is the preset's (issue 30)
    assert cu.cpcad_config("fast", width=8, norm=None) == cu.CPCADConfig(width=8, defect_head=True)  # None keeps it
    assert not cu.CPCADConfig().defect_head and not cu.cpcad_config("fast", defect_head=False).defect_head
    paper = cu.cpcad_config("paper", grid, width=8)
    assert not paper.defect_head  # as published
    assert (paper.shared_encoder, paper.similarity, paper.temperature) == (False, "dot", 1.0)
    assert paper.target_offset == grid.overlap_steps == 1 and paper.width == 8
    scoring = cu.scoring_config("paper")
    assert (scoring.detector, scoring.reduce, scoring.dense_scoring) == ("cpcad", "mean", False)
    assert cu.ScoringConfig().dense_scoring and scoring.score_grid(grid) == grid  # the paper's maps: the training grid
    assert cu.scoring_config("fast", reduce="mean", detector=None) == cu.ScoringConfig(reduce="mean")
    model = cu.CPCAD(paper, grid)
    assert len(model.encoders) == 4
    with pytest.raises(ValueError, match="needs the grid"):
        cu.cpcad_config("paper")
    with pytest.raises(ValueError, match="unknown preset"):
        cu.cpcad_config("fastest")


def test_cpcad_config_checks_that_the_grid_leaves_context():
    """With the grid, the configuration step itself refuses pred_steps + target_offset that leave
    no context patch (before any data is loaded), with the same rule as CPCAD."""
    grid = cu.PatchGrid(32, 16, 8)  # 3x3
    assert cu.cpcad_config("fast", grid, pred_steps=2).pred_steps == 2
    with pytest.raises(cu.ParameterError, match=r"a 3x3 grid leaves no context for pred_steps=3, target_offset=0: "
                                                r"pred_steps \+ target_offset must be at most 2"):
        cu.cpcad_config("fast", grid, pred_steps=3)
    with pytest.raises(cu.ParameterError, match="pred_steps=2, target_offset=1"):
        cu.cpcad_config("paper", grid, pred_steps=2)  # the paper's offset: the grid's overlap, 1 here
    with pytest.raises(cu.ParameterError, match="leaves no context"):
        cu.CPCAD(cu.CPCADConfig(width=8, pred_steps=3), grid)


@pytest.mark.parametrize("field, value", [("detector", "magic"), ("reduce", "median")])
def test_scoring_config_rejects_unknown_detector_or_reduce(field, value):
    with pytest.raises(ValueError, match=value):
        cu.ScoringConfig(**{field: value})
    with pytest.raises(TypeError):  # scoring policy is not the model's
        cu.CPCADConfig(width=8, **{field: value})
