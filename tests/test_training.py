"""Training section: the one training loop, its checkpoints, exact resume, NaN handling,
early stopping, the device choice and atomic writes."""
from __future__ import annotations

import json
import re
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import cpc_utils as cu
import cpc_ad.training
from conftest import metrics_record

GRID = cu.PatchGrid(32, 16, 8)  # 3x3 patches of 16 px


def tiny_cpcad(width: int = 8) -> cu.CPCAD:
    return cu.CPCAD(cu.CPCADConfig(width=width, pred_steps=2, num_negatives=4, similarity="cosine",
                                   temperature=0.1, norm="layer"), GRID)


def tiny_cpc(width: int = 8) -> cu.CPC:
    return cu.CPC(cu.CPCConfig(width=width, pred_steps=1, num_negatives=4, context_dim=16, context_layers=2), GRID)


MODELS = {"cpcad": tiny_cpcad, "cpc": tiny_cpc}


def config(epochs: int, **kw) -> cu.TrainConfig:
    return cu.TrainConfig(**{"epochs": epochs, "batch_size": 2, "lr": 1e-3, "patience": 10, "seed": 0,
                             "device": "cpu", **kw})


@pytest.fixture(scope="module")
def sets(fake_widget):
    """4 train and 2 validation images of 32 px from the fake tree."""
    return cu.split_train_val(fake_widget["train"], val_fraction=0.34, seed=0)


def build(name: str, seed: int, **kw):
    torch.manual_seed(seed)
    return MODELS[name](**kw)


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in ("last.pt", "best.pt", "progress.json"))


# ---- the loop ------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MODELS))
def test_history_and_checkpoints(name, sets, tmp_path, monkeypatch):
    train, val = sets
    saved, save_atomic = [], cu.save_atomic

    def spy(obj, path, *args, **kwargs):
        saved.append((Path(path).name, obj["epoch"]))
        return save_atomic(obj, path, *args, **kwargs)

    monkeypatch.setattr(cpc_ad.training, "save_atomic", spy)
    model = build(name, 0)
    history = cu.train_model(model, train, val, config(3), tmp_path, progress=False)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    for h in history:
        assert math.isfinite(h["train_loss"]) and math.isfinite(h["val_loss"]) and h["seconds"] > 0
        if name == "cpc":
            assert len(h["loss_per_step"]) == 1 and 0 <= h["acc_per_step"][0] <= 1
    # last.pt after every epoch; best.pt whenever the validation loss improved
    assert [e for f, e in saved if f == "last.pt"] == [1, 2, 3]
    improved = [h["epoch"] for i, h in enumerate(history)
                if h["val_loss"] < min([math.inf] + [g["val_loss"] for g in history[:i]])]
    assert [e for f, e in saved if f == "best.pt"] == improved
    assert leftovers(tmp_path) == []  # written through temporary files, none left behind
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["epoch"] == 3 and without_seconds(last["history"]) == without_seconds(history)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["epoch"] == improved[-1]
    assert_same_weights(model.state_dict(), best["model"])  # the best weights are loaded at the end
    assert not model.training


def test_training_without_validation(sets):
    train, _ = sets
    history = cu.train_model(build("cpcad", 0), train, None, config(2), progress=False)
    assert len(history) == 2 and all("val_loss" not in h for h in history)


def test_training_changes_the_weights(sets):
    train, val = sets
    model = build("cpcad", 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cu.train_model(model, train, val, config(1), progress=False)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", list(MODELS))
def test_resume_gives_the_same_weights(name, sets, tmp_path):
    """epochs=1 then resume to 3 with a fresh model == an uninterrupted run of 3 epochs."""
    train, val = sets
    straight = build(name, 0)
    h_straight = cu.train_model(straight, train, val, config(3), tmp_path / "straight", progress=False)

    cu.train_model(build(name, 0), train, val, config(1), tmp_path / "split", progress=False)
    resumed = build(name, 1234)  # different initial weights: everything must come from last.pt
    h_resumed = cu.train_model(resumed, train, val, config(3), tmp_path / "split", resume=True, progress=False)

    assert without_seconds(h_resumed) == without_seconds(h_straight)
    assert_same_weights(resumed.state_dict(), straight.state_dict())
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert_same_weights(a["model"], b["model"])
    assert torch.equal(a["generator"], b["generator"])


def test_resume_restores_the_global_rngs(sets, tmp_path):
    """An on_epoch hook that draws from python's, numpy's and torch's global RNGs draws the same
    numbers after a resume as in an uninterrupted run: the checkpoint holds those states."""
    import random
    train, val = sets

    def draws(model, epoch):
        return {"draws": [random.random(), float(np.random.rand()), float(torch.rand(1))]}

    cu.seed_everything(0)
    straight = cu.train_model(build("cpcad", 0), train, val, config(3), tmp_path / "straight", progress=False,
                              on_epoch=draws)
    cu.seed_everything(0)
    cu.train_model(build("cpcad", 0), train, val, config(1), tmp_path / "split", progress=False, on_epoch=draws)
    cu.seed_everything(1)  # another process: other global states until the checkpoint's are restored
    resumed = cu.train_model(build("cpcad", 0), train, val, config(3), tmp_path / "split", resume=True,
                             progress=False, on_epoch=draws)
    assert [h["draws"] for h in resumed] == [h["draws"] for h in straight]


def test_batch_order_does_not_depend_on_the_negatives(sets, monkeypatch):
    """The images of each step, epoch after epoch, are the same whether the model draws 4 or 8
    negatives per patch: batch order and negatives come from generators of their own."""
    train, _ = sets
    ref = cu.to_float(train.images).flatten(1)

    def order(num_negatives: int) -> list[list[int]]:
        model = cu.CPCAD(cu.CPCADConfig(width=8, pred_steps=2, num_negatives=num_negatives, similarity="cosine",
                                        temperature=0.1, norm="layer"), GRID)
        seen, forward = [], model.forward

        def spy(x, generator=None):
            seen.append([int((ref == row).all(1).nonzero()) for row in x.flatten(1)])
            return forward(x, generator)
        monkeypatch.setattr(model, "forward", spy)
        cu.train_model(model, train, None, config(4), progress=False)
        return seen

    four, eight = order(4), order(8)
    assert len(four) == 8 and four == eight


def test_resume_without_checkpoint_starts_fresh(sets, tmp_path):
    train, val = sets
    history = cu.train_model(build("cpcad", 0), train, val, config(2), tmp_path, resume=True, progress=False)
    assert [h["epoch"] for h in history] == [1, 2]


def test_resume_finished_run_trains_no_more(sets, tmp_path):
    train, val = sets
    cu.train_model(build("cpcad", 0), train, val, config(2), tmp_path, progress=False)
    history = cu.train_model(build("cpcad", 1), train, val, config(2), tmp_path, resume=True, progress=False)
    assert [h["epoch"] for h in history] == [1, 2]


def test_resume_with_fewer_epochs_than_trained_raises(sets, tmp_path):
    """A 2-epoch model resumed with epochs=1 would be reported (metrics.json, the epochs plot) as 1 epoch's."""
    train, val = sets
    cu.train_model(build("cpcad", 0), train, val, config(2), tmp_path, progress=False)
    with pytest.raises(ValueError, match=f"cannot resume from {tmp_path / 'last.pt'}: it has trained 2 epochs, "
                                         "more than epochs=1"):
        cu.train_model(build("cpcad", 0), train, val, config(1), tmp_path, resume=True, progress=False)


@pytest.mark.parametrize("change, field", [({"lr": 5e-4}, "train.lr"), ({"batch_size": 4}, "train.batch_size"),
                                           ({"seed": 1}, "train.seed")])
def test_resume_with_another_train_config_raises(change, field, sets, tmp_path):
    train, val = sets
    cu.train_model(build("cpcad", 0), train, val, config(1), tmp_path, progress=False)
    with pytest.raises(ValueError) as e:
        cu.train_model(build("cpcad", 0), train, val, config(2, **change), tmp_path, resume=True, progress=False)
    assert field in str(e.value) and str(tmp_path / "last.pt") in str(e.value)


def test_resume_from_a_checkpoint_older_than_an_option(sets, tmp_path):
    """A last.pt written before the model config had `stem` resumes when the stem is the default."""
    train, val = sets
    cu.train_model(build("cpcad", 0), train, val, config(1), tmp_path, progress=False)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    del state["config"]["model"]["stem"]
    torch.save(state, tmp_path / "last.pt")
    history = cu.train_model(build("cpcad", 0), train, val, config(2), tmp_path, resume=True, progress=False)
    assert [h["epoch"] for h in history] == [1, 2]
    small = cu.CPCAD(cu.CPCADConfig(width=8, pred_steps=2, num_negatives=4, similarity="cosine", temperature=0.1,
                                    stem="small"), GRID)
    with pytest.raises(ValueError, match="stem"):
        cu.train_model(small, train, val, config(3), tmp_path, resume=True, progress=False)


def test_resume_with_another_model_raises(sets, tmp_path):
    train, val = sets
    cu.train_model(build("cpcad", 0), train, val, config(1), tmp_path, progress=False)
    with pytest.raises(ValueError, match="width"):
        cu.train_model(build("cpcad", 0, width=16), train, val, config(2), tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="class"):
        cu.train_model(build("cpc", 0), train, val, config(2), tmp_path, resume=True, progress=False)


# ---- failures ------------------------------------------------------------------------

def test_nan_loss_raises_and_keeps_the_last_good_checkpoint(sets, tmp_path, monkeypatch):
    train, val = sets
    model = build("cpcad", 0)
    loss, steps = model.loss, {"n": 0}

    def nan_from_epoch_2(x, generator=None):
        out = loss(x, generator)
        if model.training:  # validation runs in eval mode and stays finite
            steps["n"] += 1
            if steps["n"] > 2:  # 4 images at batch_size 2: 2 steps per epoch
                out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(model, "loss", nan_from_epoch_2)
    with pytest.raises(FloatingPointError) as e:
        cu.train_model(model, train, val, config(3), tmp_path / "nan", progress=False)
    assert "epoch 2" in str(e.value) and str(tmp_path / "nan") in str(e.value)
    assert leftovers(tmp_path / "nan") == []
    last = torch.load(tmp_path / "nan" / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and len(last["history"]) == 1
    reference = build("cpcad", 0)
    cu.train_model(reference, train, val, config(1), tmp_path / "ref", progress=False)
    good = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)
    assert_same_weights(last["model"], good["model"])
    model.load_state_dict(last["model"])  # loadable into the model


@pytest.mark.parametrize("with_val", [True, False])
def test_a_huge_learning_rate_raises_without_writing_nan_weights(with_val, sets, tmp_path):
    """One step per epoch: the first step turns the weights into inf. That must fail before
    a checkpoint with non-finite weights replaces the last good one, saying that the training
    diverged and at which lr."""
    train, val = sets
    with pytest.raises(FloatingPointError, match=r"^the (loss|training) diverged with lr=1e\+308: .*; try a lower lr$"):
        cu.train_model(build("cpcad", 0), train, val if with_val else None,
                       config(3, lr=1e308, batch_size=len(train)), tmp_path, progress=False)
    for name in ("last.pt", "best.pt"):
        if (tmp_path / name).exists():
            state = torch.load(tmp_path / name, weights_only=True)
            assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()), name


@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping(patience, sets, tmp_path):
    """With lr=0 the validation loss never improves after epoch 1 (validation is repeatable)."""
    train, val = sets
    history = cu.train_model(build("cpcad", 0), train, val, config(10, lr=0.0, patience=patience), tmp_path,
                             progress=False)
    assert len(history) == patience + 1 < 10
    assert len({h["val_loss"] for h in history}) == 1
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("name", list(MODELS))
def test_best_weights_without_checkpoint_dir(name, sets, monkeypatch):
    """Without checkpoint_dir the run still ends on the best validation epoch's weights (kept in
    memory): validation losses scripted to be best at epoch 2 of 4, compared with a 2-epoch run."""
    train, val = sets
    scripted = iter([3.0, 1.0, 2.0, 2.5])
    monkeypatch.setattr(cpc_ad.training, "validation_loss", lambda *args, **kwargs: next(scripted))
    model = build(name, 0)
    history = cu.train_model(model, train, val, config(4), progress=False)
    assert [h["val_loss"] for h in history] == [3.0, 1.0, 2.0, 2.5]
    at_best, at_last = build(name, 0), build(name, 0)  # validation draws nothing from the run's generator
    cu.train_model(at_best, train, None, config(2), progress=False)
    cu.train_model(at_last, train, None, config(4), progress=False)
    assert_same_weights(model.state_dict(), at_best.state_dict())
    assert any(not torch.equal(v, at_last.state_dict()[k]) for k, v in model.state_dict().items())
    assert not model.training


def test_validation_loss_is_repeatable(sets):
    _, val = sets
    model = build("cpcad", 0)
    a = cu.validation_loss(model, val.images, 2, torch.device("cpu"), seed=1)
    b = cu.validation_loss(model, val.images, 2, torch.device("cpu"), seed=1)
    assert a == b and math.isfinite(a)
    assert not model.training


# ---- device --------------------------------------------------------------------------

def test_resolve_device_auto(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert cu.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert cu.resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cu.resolve_device("auto") == torch.device("cuda")


def test_resolve_device_on_this_machine():
    expected = "cuda" if torch.cuda.is_available() else "cpu"  # the CI machine has no GPU: cpu
    assert cu.resolve_device("auto").type in (expected, "mps")
    assert cu.resolve_device("cpu") == torch.device("cpu")
    assert cu.resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_a_device_this_machine_lacks_is_one_clear_error(monkeypatch):
    """An unknown name, CUDA without a GPU, a GPU index past the count: each a ParameterError
    naming the device and what is accepted (stubbed, the same with or without a GPU)."""
    with pytest.raises(cu.ParameterError, match=r"^device='gpu7': expected auto, cpu, cuda, cuda:N or mps$"):
        cu.resolve_device("gpu7")
    with pytest.raises(cu.ParameterError, match="device='meta': expected auto"):
        cu.resolve_device("meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(cu.ParameterError, match="device='cuda': no CUDA device is available on this machine"):
        cu.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cu.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(cu.ParameterError, match=r"device='cuda:3': this machine has 2 CUDA devices \(cuda:0 to cuda:1\)"):
        cu.resolve_device("cuda:3")


def test_autocast_is_a_no_op_on_cpu():
    with cu.autocast(torch.device("cpu")):
        y = torch.randn(2, 2) @ torch.randn(2, 2)
    assert y.dtype == torch.float32


# ---- atomic writes -------------------------------------------------------------------

def test_save_atomic_writes_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "state.pt"
    cu.save_atomic({"w": torch.arange(3)}, path)
    cu.save_atomic({"w": torch.arange(4)}, path)  # replaces
    assert torch.equal(torch.load(path)["w"], torch.arange(4))
    assert [p.name for p in path.parent.iterdir()] == ["state.pt"]


def test_save_atomic_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.pt"
    cu.save_atomic({"w": torch.arange(3)}, path)

    def broken(obj, f):
        f.write(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cu.save_atomic({"w": torch.arange(4)}, path, broken)
    assert torch.equal(torch.load(path)["w"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_save_json(tmp_path):
    cu.save_json({"a": np.float32(0.5), "b": torch.tensor([1, 2]), "c": tmp_path, "d": np.arange(2)},
                 tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 0.5, "b": [1, 2], "c": str(tmp_path), "d": [0, 1]}
    with pytest.raises(TypeError, match="set"):
        cu.save_json({"x": {1, 2}}, tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists() and len(list(tmp_path.iterdir())) == 1


def test_fresh_run_ignores_stale_checkpoints(tmp_path):
    """A run without resume must not load an older run's best.pt at the end."""
    grid = cu.PatchGrid(32, 16, 8)
    train = cu.ImageSet(torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8),
                        torch.zeros(4, 1, 32, 32, dtype=torch.bool), torch.zeros(4, dtype=torch.long),
                        ["good"] * 4, [f"{i}.png" for i in range(4)])
    stale = cu.CPCAD(cu.CPCADConfig(width=8, num_negatives=15), grid)
    cu.save_atomic({"model": stale.state_dict(), "epoch": 1}, tmp_path / "best.pt")
    torch.manual_seed(1)
    model = cu.CPCAD(cu.CPCADConfig(width=8, num_negatives=15), grid)
    cu.train_model(model, train, None, cu.TrainConfig(epochs=1, batch_size=2), tmp_path, progress=False)
    assert not (tmp_path / "best.pt").exists()
    assert not torch.equal(model.W, stale.W)


def test_on_epoch_adds_to_each_record(sets):
    train, val = sets
    seen = []

    def on_epoch(model, epoch):
        seen.append((epoch, model.training))
        return {"probe": epoch * 10} if epoch == 2 else {}
    history = cu.train_model(tiny_cpcad(), train, val, config(3), progress=False, on_epoch=on_epoch)
    assert [e for e, _ in seen] == [1, 2, 3]
    assert [h.get("probe") for h in history] == [None, 20, None]


# ---- validated parameters, failures that say what happened (issue: runs that never lie) ----

@pytest.mark.parametrize("kw, text", [
    (dict(epochs=0), "epochs=0: must be >= 1"), (dict(epochs=-3), "epochs=-3: must be >= 1"),
    (dict(epochs="5"), "epochs='5': expected int, got str"), (dict(patience=0), "patience=0: must be >= 1"),
    (dict(batch_size=0), "batch_size=0: must be >= 1"), (dict(lr=-1e-3), "lr=-0.001: must be >= 0"),
    (dict(epochs=2.5), "epochs=2.5: expected int"), (dict(epochs=True), "epochs=True: expected int")])
def test_train_config_rejects_bad_values(kw, text):
    with pytest.raises(cu.ParameterError) as e:
        cu.TrainConfig(**kw)
    assert text in str(e.value)


@pytest.mark.parametrize("kw, text", [
    (dict(num_negatives=0), "num_negatives=0: must be >= 1"),
    (dict(temperature=-0.1), "temperature=-0.1: must be > 0"), (dict(temperature=0), "temperature=0: must be > 0"),
    (dict(similarity="cos"), "similarity='cos': choose one of dot, cosine"), (dict(width="16"), "width='16'"),
    (dict(shared_encoder=1), "shared_encoder=1: expected bool")])
def test_cpcad_config_rejects_bad_values(kw, text):
    with pytest.raises(cu.ParameterError) as e:
        cu.CPCADConfig(**kw)
    assert text in str(e.value)
    assert cu.CPCADConfig(num_negatives=None).num_negatives is None  # None: every patch of the batch


@pytest.mark.parametrize("kw, text", [
    (dict(test_negatives=0), "test_negatives=0"), (dict(knn_bank=0), "knn_bank=0"),
    (dict(detector="nope"), "detector='nope'"), (dict(reduce="median"), "reduce='median'"),
    (dict(dense_scoring=1), "dense_scoring=1: expected bool")])
def test_scoring_config_rejects_bad_values(kw, text):
    with pytest.raises(cu.ParameterError) as e:
        cu.ScoringConfig(**kw)
    assert text in str(e.value)


def test_cpc_config_and_grid_reject_bad_values():
    with pytest.raises(cu.ParameterError, match="num_negatives=0"):
        cu.CPCConfig(num_negatives=0)
    with pytest.raises(cu.ParameterError, match="context_layers=0"):
        cu.CPCConfig(context_layers=0)
    with pytest.raises(cu.ParameterError, match="image_size='64'"):
        cu.PatchGrid("64", 16, 8)


def test_more_negatives_than_a_batch_supplies_is_an_error(sets):
    train, val = sets
    model = cu.CPCAD(cu.CPCADConfig(width=8, num_negatives=18), GRID)  # 2 images x 9 patches - 1 = 17
    with pytest.raises(cu.ParameterError, match="num_negatives=18: a batch of 2 images gives only 17"):
        cu.train_model(model, train, val, config(1), progress=False)
    cu.train_model(cu.CPCAD(cu.CPCADConfig(width=8, num_negatives=17), GRID), train, val, config(1), progress=False)


def test_learning_check():
    hist = [{"train_loss": 2.0, "val_loss": 1.9}, {"train_loss": 1.0, "val_loss": 1.1}]
    assert cu.learning_check(hist, math.log(64))["status"] == "ok"
    flat = [{"train_loss": 4.16, "val_loss": 4.15}, {"train_loss": 4.158, "val_loss": 4.152}]
    at_chance = cu.learning_check(flat, math.log(64))
    assert at_chance["status"] == "at_chance" and "4.150" in at_chance["message"] and "4.159" in at_chance["message"]
    exploded = cu.learning_check([{"train_loss": 3.0, "val_loss": 3.0}, {"train_loss": 1e16, "val_loss": 2.0}],
                                 math.log(64))
    assert exploded["status"] == "diverged" and "1e+16" in exploded["message"]
    assert cu.learning_check([{"train_loss": 4.2}], math.log(64))["status"] == "at_chance"  # no validation


def test_a_collapsed_run_is_flagged(sets):
    """lr 1e3 with cosine scores: training 'finishes' but learns nothing; the check says so."""
    train, val = sets
    model = tiny_cpcad()
    history = cu.train_model(model, train, val, config(3, lr=1e3), progress=False)
    check = cu.learning_check(history, math.log(model.cfg.num_negatives + 1))
    assert check["status"] in ("at_chance", "diverged"), (check, history)


def test_errors_name_only_checkpoints_that_exist(sets, tmp_path):
    train, val = sets
    with pytest.raises(FloatingPointError) as e:
        cu.train_model(build("cpcad", 0), train, val, config(2, lr=1e308, batch_size=len(train)),
                       tmp_path / "ck", progress=False)
    assert "no checkpoint was written" in str(e.value) and "kept in" not in str(e.value)


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_truncated_checkpoint_on_resume_names_the_file(name, sets, tmp_path):
    train, val = sets
    cu.train_model(build("cpcad", 0), train, val, config(1), tmp_path, progress=False)
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError) as e:
        cu.train_model(build("cpcad", 0), train, val, config(2), tmp_path, resume=True, progress=False)
    assert f"cannot read checkpoint {tmp_path / name}" in str(e.value) and "resume=False" in str(e.value)
    assert torch.load(tmp_path / ("best.pt" if name == "last.pt" else "last.pt"), weights_only=True)  # untouched


class Payload:
    """What a planted checkpoint could hold: a full unpickle of it (not weights-only) creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("name", ["last.pt", "best.pt"])
def test_a_checkpoint_holding_code_is_refused_not_run(name, sets, tmp_path):
    """A checkpoint copied in from elsewhere (or written by older code that pickled objects):
    resume refuses it with an error naming the file, and the payload never runs."""
    train, val = sets
    ckpt, marker = tmp_path / "ck", tmp_path / "payload-ran"
    cu.train_model(build("cpcad", 0), train, val, config(1), ckpt, progress=False)
    state = torch.load(ckpt / name, weights_only=True)  # what train_model writes: tensors and plain types
    torch.save({**state, "extra": Payload(marker)}, ckpt / name)
    with pytest.raises(RuntimeError) as e:
        cu.train_model(build("cpcad", 0), train, val, config(2), ckpt, resume=True, progress=False)
    assert f"refusing checkpoint {ckpt / name}" in str(e.value) and "resume=False" in str(e.value)
    assert "nothing in it was run" in str(e.value) and len(str(e.value).splitlines()) == 1
    assert not marker.exists()


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")])
def test_full_disk_is_one_clear_error_and_keeps_the_file(error, tmp_path):
    path = tmp_path / "last.pt"
    cu.save_atomic({"w": torch.arange(3)}, path)

    def full(obj, f):
        f.write(b"part")
        raise error

    with pytest.raises(OSError) as e:
        cu.save_atomic({"w": torch.arange(4)}, path, full)
    assert e.value.errno == 28 and str(path) in str(e.value) and "disk is full" in str(e.value)
    assert "previous last.pt is kept" in str(e.value)
    assert torch.equal(torch.load(path)["w"], torch.arange(3)) and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_written_files_get_the_usual_mode(tmp_path):
    import os
    old = os.umask(0o022)
    try:
        cu.save_json({"a": 1}, tmp_path / "metrics.json")
        cu.save_atomic({"w": 1}, tmp_path / "last.pt")
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {"0o644"}


# ---- run identity and the run folder ----

def test_fingerprint_covers_parameters_data_and_code(demo_root):
    params = {"category": "brick", "width": 16, "epochs": 3, "resume": False, "output_dir": "x", "data_root": ""}
    fp = cu.run_fingerprint(params, demo_root, "brick")
    assert set(fp) == {"parameters", "data", "code"} and "resume" not in fp["parameters"]
    assert fp["data"]["category"] == "brick" and fp["data"]["files"] > 0 and fp["code"] == cu.code_fingerprint()
    assert cu.fingerprint_diff(fp, cu.run_fingerprint({**params, "resume": True, "output_dir": "y"},
                                                      demo_root, "brick")) == []
    other = cu.run_fingerprint({**params, "width": 32, "epochs": 4}, demo_root, "gravel")
    assert {"data.category", "data.digest", "parameters.width", "parameters.epochs"} <= set(cu.fingerprint_diff(fp, other))
    assert cu.fingerprint_diff(fp, other, ignore=cu.RESUMABLE_CHANGES) == [
        d for d in cu.fingerprint_diff(fp, other) if d != "parameters.epochs"]


def test_fingerprint_covers_the_files_loaded_from_a_symlinked_folder(fresh_mvtec, tmp_path):
    """train/good as a link to a folder elsewhere: the loader follows it, and so does the
    fingerprint, so deleting half the training images changes the digest (a sweep reruns the
    pair instead of skipping it as finished with these parameters)."""
    good = fresh_mvtec / "widget" / "train" / "good"
    good.rename(tmp_path / "elsewhere")
    good.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    data = cu.load_category(fresh_mvtec, "widget", 32)
    before = cu.data_fingerprint(fresh_mvtec, "widget")
    assert before["files"] == len(data["train"]) + len(data["test"]) + int(data["test"].labels.sum())  # + masks
    for f in sorted(good.iterdir())[::2]:
        f.unlink()
    after = cu.data_fingerprint(fresh_mvtec, "widget")
    assert after["files"] == before["files"] - (len(data["train"]) + 1) // 2 and after["digest"] != before["digest"]


def test_resume_refuses_a_checkpoint_of_another_run(sets, tmp_path):
    """Another category or image size with the same model config: refused, naming the fields."""
    train, val = sets
    fp = {"parameters": {"category": "brick", "image_size": 64, "epochs": 1}, "data": {"digest": "a"}, "code": "c"}
    cu.train_model(build("cpcad", 0), train, val, config(1), tmp_path, progress=False, fingerprint=fp)
    other = {"parameters": {"category": "gravel", "image_size": 128, "epochs": 2}, "data": {"digest": "b"}, "code": "c"}
    with pytest.raises(ValueError) as e:
        cu.train_model(build("cpcad", 0), train, val, config(2), tmp_path, resume=True, progress=False,
                       fingerprint=other)
    assert "data.digest" in str(e.value) and "parameters.category" in str(e.value)
    assert "parameters.image_size" in str(e.value) and "parameters.epochs" not in str(e.value)
    longer = {**fp, "parameters": {**fp["parameters"], "epochs": 2}}  # more epochs: that is what resume is for
    assert len(cu.train_model(build("cpcad", 0), train, val, config(2), tmp_path, resume=True, progress=False,
                              fingerprint=longer)) == 2


def test_a_failed_run_keeps_the_previous_one(tmp_path):
    out = tmp_path / "brick" / "resnet18v2"
    work = cu.begin_run(out, {"v": 1})
    (work / "checkpoints").mkdir()
    (work / "checkpoints" / "last.pt").write_bytes(b"model 1")
    cu.finish_run(out, work, metrics_record(image_auroc=0.9))
    assert json.loads((out / "metrics.json").read_text())["image_auroc"] == 0.9
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    work = cu.begin_run(out, {"v": 2})  # a second run that then fails: nothing of the first is touched
    (work / "checkpoints").mkdir()
    (work / "checkpoints" / "last.pt").write_bytes(b"model 2, half")
    assert (out / "checkpoints" / "last.pt").read_bytes() == b"model 1" and (out / "metrics.json").exists()
    assert [r["image_auroc"] for r in cu.load_results(tmp_path)] == [0.9]  # the staging folder is not a result
    work = cu.begin_run(out, {"v": 2})  # a third that succeeds replaces the first
    assert not (work / "checkpoints").exists()  # resume=False starts the unfinished one over
    cu.finish_run(out, work, {"image_auroc": 0.7})
    assert json.loads((out / "metrics.json").read_text())["image_auroc"] == 0.7
    assert not (out / "checkpoints").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["resnet18v2"]  # no staging, old copy or lock left


@pytest.mark.parametrize("folder", ["checkpoints", "checkpoints/seed1"], ids=["one model", "one per seed"])
def test_resume_continues_a_staged_run_or_a_copy_of_the_finished_one(tmp_path, folder):
    out = tmp_path / "run"
    work = cu.begin_run(out, {})
    (work / folder).mkdir(parents=True)
    (work / folder / "last.pt").write_bytes(b"epoch 3")
    cu.finish_run(out, work, {})
    work = cu.begin_run(out, {}, resume=True)  # train a finished run further: on a copy
    assert (work / folder / "last.pt").read_bytes() == b"epoch 3"
    (work / folder / "last.pt").write_bytes(b"epoch 4")
    assert (out / folder / "last.pt").read_bytes() == b"epoch 3"
    work = cu.begin_run(out, {}, resume=True)  # interrupted: the staged run continues
    assert (work / folder / "last.pt").read_bytes() == b"epoch 4"


def test_a_rung_continues_the_shorter_rung_and_equals_a_separate_run(sets, tmp_path):
    """An epoch ladder's 3-epoch rung, staged from the finished 1-epoch rung
    (stage_continuation), trains to the same weights and history as a separate 3-epoch run,
    and leaves the shorter rung's folder as it was."""
    train, val = sets
    fp = {"parameters": {"epochs": 1}}
    e1, e3 = tmp_path / "e1", tmp_path / "e3"
    work = cu.begin_run(e1, fp)
    cu.train_model(build("cpcad", 0), train, val, config(1), work / "checkpoints", progress=False, fingerprint=fp)
    cu.finish_run(e1, work, {"epochs": 1})
    before = snapshot(e1)
    longer = {"parameters": {"epochs": 3}}
    staged = cu.stage_continuation(e3, e1, longer)
    assert json.loads((staged / "run.json").read_text())["fingerprint"] == longer and cu.is_run_folder(staged)
    assert sorted(p.name for p in (staged / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert not (tmp_path / ".e3.lock").exists()  # taken while staging, given back
    work = cu.begin_run(e3, longer, resume=True)
    assert work == staged and (work / "checkpoints" / "last.pt").exists()  # kept: the rung continues from it
    rung = build("cpcad", 1234)  # other initial weights: everything must come from the copied last.pt
    h_rung = cu.train_model(rung, train, val, config(3), work / "checkpoints", resume=True, progress=False,
                            fingerprint=longer)
    separate = build("cpcad", 0)
    h_separate = cu.train_model(separate, train, val, config(3), tmp_path / "separate", progress=False)
    assert without_seconds(h_rung) == without_seconds(h_separate) and len(h_rung) == 3
    assert_same_weights(rung.state_dict(), separate.state_dict())
    assert snapshot(e1) == before
    with pytest.raises(FileNotFoundError, match="holds no checkpoints/last.pt"):
        cu.stage_continuation(tmp_path / "e5", tmp_path / "separate", longer)


def test_resume_without_a_checkpoint_says_it_starts_from_the_start(tmp_path, capsys):
    out = tmp_path / "run"
    cu.begin_run(out, {}, resume=True)
    assert f"resume=True, but neither {out} nor its staging folder holds a checkpoint" in capsys.readouterr().out
    cu.begin_run(out, {}, resume=False)
    assert capsys.readouterr().out == ""


def test_an_interrupted_switch_over_is_undone(tmp_path):
    out = tmp_path / "run"
    cu.finish_run(out, cu.begin_run(out, {}), {"n": 1})
    out.rename(tmp_path / ".run.old")  # killed between the two renames of finish_run
    cu.begin_run(out, {})
    assert json.loads((out / "metrics.json").read_text()) == {"n": 1}


def snapshot(folder: Path) -> dict:
    """Every file below `folder` (hidden ones too) with its bytes: what must not change."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


FOREIGN_FOLDERS = {
    "a data category": {"train/good/000.png": b"png", "test/good/000.png": b"png",
                        "ground_truth/crack/000_mask.png": b"png", "notes.txt": b"my notes"},
    "a user's notes": {"notes.txt": b"my notes"},
    "an earlier sweep": {"brick/resnet18v2/metrics.json": b"{}", "brick/resnet18v2/model.pt": b"model"},
    "a run folder with a user's file": {"metrics.json": b"{}", "model.pt": b"model", "notes.txt": b"mine"},
}


@pytest.mark.parametrize("files", FOREIGN_FOLDERS.values(), ids=FOREIGN_FOLDERS.keys())
def test_an_output_dir_that_is_not_a_run_is_refused_and_kept(tmp_path, files):
    out = tmp_path / "out"
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError) as e:
        cu.begin_run(out, {})
    top = sorted({n.split("/")[0] + ("/" if "/" in n else "") for n in files})
    assert f"output_dir {out} is not empty and not a run folder" in str(e.value) and ", ".join(top[:5]) in str(e.value)
    assert snapshot(tmp_path) == before  # nothing written, moved or deleted, and no lock left


def test_a_users_file_in_an_earlier_run_folder_is_named_not_deleted(tmp_path):
    """The marker proves the folder is ours, not every file in it: a note the user saved into a
    finished run's folder stops the next run, which names it, and nothing is deleted."""
    out = tmp_path / "run"
    cu.finish_run(out, cu.begin_run(out, {}), {"n": 1})
    assert cu.is_run_folder(out)
    (out / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match=r"is an earlier run of cpc_utils, but it also holds notes.txt"):
        cu.begin_run(out, {})
    assert snapshot(tmp_path) == before
    (out / "notes.txt").unlink()
    cu.finish_run(out, cu.begin_run(out, {}), {"n": 2})  # without it the run is replaced as before
    assert json.loads((out / "metrics.json").read_text()) == {"n": 2}


@pytest.mark.parametrize("inside", ["test/myrun", "train/good/myrun", "results"])
def test_an_output_dir_inside_the_categorys_data_is_refused(fresh_mvtec, inside):
    """A run writing into test/ would leave figures the next run loads as a defect type of its own."""
    category = cu.list_categories(fresh_mvtec)[0]
    out = fresh_mvtec / category / inside
    before = snapshot(fresh_mvtec)
    with pytest.raises(ValueError, match=f"output_dir {out} is inside the data folder {fresh_mvtec / category}"):
        cu.begin_run(out, cu.run_fingerprint({"seed": 0}, fresh_mvtec, category))
    assert snapshot(fresh_mvtec) == before  # no lock, staging folder or run written into the data
    sibling = fresh_mvtec.parent / "runs" / category  # beside the data: fine
    cu.finish_run(sibling, cu.begin_run(sibling, cu.run_fingerprint({"seed": 0}, fresh_mvtec, category)), {"n": 1})


def test_output_dir_dot_is_the_working_folder_with_its_siblings_outside(tmp_path, monkeypatch):
    """output_dir "." (the working folder, empty here): the staging folder is its sibling, not
    a "..partial" inside it, and the finished run lands in the folder itself."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    work = cu.begin_run(".", {})
    assert work == tmp_path / ".work.partial"
    cu.finish_run(".", work, {"n": 1})
    assert json.loads((cwd / "metrics.json").read_text()) == {"n": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_a_file_as_output_dir_is_refused(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(FileExistsError, match=f"output_dir {tmp_path / 'out'} is a file"):
        cu.begin_run(tmp_path / "out", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("sibling", [".out.partial", ".out.old"])
def test_foreign_staging_or_old_folders_are_refused_and_kept(tmp_path, sibling):
    (tmp_path / sibling).mkdir()
    (tmp_path / sibling / "notes.txt").write_text("mine")
    (tmp_path / "out").mkdir()  # empty: replaceable
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match=f"{tmp_path / sibling} is not empty and not a run folder"):
        cu.begin_run(tmp_path / "out", {})
    assert snapshot(tmp_path) == before


def test_a_folder_that_only_looks_like_a_run_is_refused_and_kept(tmp_path):
    """Issue 28.1: a user's metrics.json and photo.png are not a run of ours: without the marker
    nothing in the folder is taken as the project's, and nothing is deleted."""
    out = tmp_path / "myexp"
    out.mkdir()
    (out / "metrics.json").write_text('{"accuracy": 0.9}')
    (out / "photo.png").write_bytes(b"my photo")
    (out / "run.json").write_text("{}")
    assert not cu.is_run_folder(out)
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match=r"is not empty and not a run folder of cpc_utils \(it holds metrics.json, "
                                              r"photo.png, run.json\)"):
        cu.begin_run(out, {})
    assert snapshot(tmp_path) == before


def test_a_finished_run_lists_its_files_and_only_those_are_its_own(tmp_path):
    """Issue 28.1: the marker lists every file and folder the run wrote; a file added later, at
    the top or in a subfolder, is the user's, and a link is never the run's."""
    out = tmp_path / "run"
    work = cu.begin_run(out, {})
    (work / "checkpoints").mkdir()
    (work / "checkpoints" / "last.pt").write_bytes(b"weights")
    (work / "roc.png").write_bytes(b"png")
    cu.finish_run(out, work, {"n": 1})
    marker = json.loads((out / cu.RUN_MARKER).read_text())
    assert marker["files"] == ["checkpoints/", "checkpoints/last.pt", "metrics.json", "roc.png", "run.json"]
    assert cu.is_run_folder(out)
    for added in ("photo.png", "checkpoints/seed0/", "checkpoints/mine.pt"):  # what a run writes, by name: not listed
        path = out / added.rstrip("/")
        path.mkdir() if added.endswith("/") else path.write_bytes(b"mine")
        assert not cu.is_run_folder(out), added
        with pytest.raises(FileExistsError, match=f"also holds {re.escape(added)}"):
            cu.begin_run(out, {})
        path.rmdir() if added.endswith("/") else path.unlink()
    (out / "latest").symlink_to(tmp_path)
    assert not cu.is_run_folder(out)


@pytest.mark.parametrize("added", ["scored/notes.txt", "checkpoints/mine.pt"])
def test_a_users_file_in_a_finished_runs_subfolder_stops_the_rerun(tmp_path, added):
    """Issue 28.2: checkpoints/ and a score output in scored/ are looked into, file by file."""
    out = tmp_path / "run"
    work = cu.begin_run(out, {"seed": 0})
    (work / "checkpoints").mkdir()
    (work / "checkpoints" / "last.pt").write_bytes(b"weights")
    cu.finish_run(out, work, {"n": 1})
    (out / "scored" / "heatmaps").mkdir(parents=True)  # what `score --out run/scored` writes: listed in its manifest
    cu.save_json({"written_by": "cpc_utils score", "files": ["scores.csv", "heatmaps/000.png"]},
                 out / "scored" / cu.SCORE_MANIFEST)
    (out / "scored" / "scores.csv").write_text("path\n")
    (out / "scored" / "heatmaps" / "000.png").write_bytes(b"png")
    assert cu.is_run_folder(out)  # the score output is the project's
    (out / added).write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match=f"also holds {re.escape(added)}"):
        cu.begin_run(out, {"seed": 1})
    assert snapshot(tmp_path) == before
    (out / added).unlink()
    cu.finish_run(out, cu.begin_run(out, {"seed": 1}), {"n": 2})  # without it the run (and its scored/) is replaced
    assert json.loads((out / "metrics.json").read_text()) == {"n": 2} and not (out / "scored").exists()


def test_a_run_of_an_older_cpc_utils_with_the_marker_but_no_list_is_replaced(tmp_path):
    """A marker without the list of files (written before it had one): what a run writes, by name,
    is its own, subfolders included; anything else is named."""
    out = tmp_path / "run"
    for name in ("metrics.json", "model.pt", "run.json", "roc.png", "02_cpc_anomaly_detection.ipynb",
                 "checkpoints/last.pt", "checkpoints/seed1/best.pt", "scored/scores.csv"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("{}")
    cu.save_json({"written_by": "cpc_utils.begin_run"}, out / cu.RUN_MARKER)
    cu.save_json({"files": ["scores.csv"]}, out / "scored" / cu.SCORE_MANIFEST)
    assert cu.is_run_folder(out)
    (out / "checkpoints" / "mine.pt").write_text("mine")
    with pytest.raises(FileExistsError, match="also holds checkpoints/mine.pt"):
        cu.begin_run(out, {})
    (out / "checkpoints" / "mine.pt").unlink()
    cu.finish_run(out, cu.begin_run(out, {}), {"n": 2})
    assert sorted(p.name for p in out.iterdir()) == sorted([cu.RUN_MARKER, "metrics.json", "run.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_failed_run_says_so_and_leaves_no_lock(tmp_path):
    """Issue 28.10: a run that diverges (or crashes) records why in its staging folder's run.json
    and unlocks the output_dir, so another process may start at once."""
    out = tmp_path / "run"
    work = cu.begin_run(out, {})
    cu.abandon_run(out, work, FloatingPointError("the loss is nan at epoch 3"))
    run = json.loads((work / "run.json").read_text())
    assert run["status"] == "failed" and run["error"] == "FloatingPointError: the loss is nan at epoch 3"
    assert not (tmp_path / ".run.lock").exists() and cu.is_run_folder(work)
    cu.abandon_run(out, cu.begin_run(out, {}), KeyboardInterrupt())
    assert json.loads((work / "run.json").read_text())["status"] == "stopped"


def test_a_locked_output_dir_is_named_in_the_refusal(tmp_path):
    """Issue 28.11: the message names the output_dir, not its parent folder."""
    out = tmp_path / "results" / "run"
    out.parent.mkdir()
    (out.parent / ".run.lock").write_text(json.dumps({"pid": 1, "host": "another-host", "started": "earlier"}))
    with pytest.raises(cu.RunBlocked, match=f"^output_dir {re.escape(str(out))} is being written by process 1 on "
                                            "another-host"):
        cu.begin_run(out, {})


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    lock = tmp_path / ".run.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "then"}))
        with pytest.raises(RuntimeError) as e:
            cu.acquire_lock(lock)
        assert f"process {holder.pid}" in str(e.value) and str(lock) in str(e.value)
    finally:
        holder.kill()
        holder.wait()
    cu.acquire_lock(lock)  # its holder is gone: taken over
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    cu.acquire_lock(lock)  # the same process again (a notebook cell rerun): fine


def test_unwritable_folder_is_one_clear_error(tmp_path, monkeypatch):
    import tempfile

    def denied(*a, **kw):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(OSError) as e:
        cu.save_json({"a": 1}, tmp_path / "metrics.json")
    assert str(e.value) == f"[Errno 13] cannot write {tmp_path / 'metrics.json'}: Permission denied"


# ---- precision by device, time budgets ----

@pytest.mark.parametrize("capability, expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"),
                                                  ((7, 0), "fp16"), ((6, 0), "fp32")])
def test_auto_precision_follows_the_compute_capability(capability, expected, monkeypatch):
    """H100/A100 -> bf16; T4/V100 -> fp16 with a scaler; P100 -> fp32 (stubbed, no GPU needed)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert cu.resolve_precision("auto", torch.device("cuda")) == expected
    assert cu.resolve_precision("fp32", torch.device("cuda")) == "fp32"
    assert cu.resolve_precision("bf16", torch.device("cuda")) == "bf16"


@pytest.mark.parametrize("lr", [float("inf"), float("nan")])
def test_a_learning_rate_that_is_not_finite_is_refused_up_front(lr):
    with pytest.raises(cu.ParameterError, match=r"^lr=(inf|nan): must be a finite number$"):
        cu.TrainConfig(lr=lr)


def test_precision_on_cpu():
    assert cu.resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(cu.ParameterError, match="precision='fp16' needs a CUDA device"):
        cu.resolve_precision("fp16", "cpu")
    with pytest.raises(cu.ParameterError, match="precision='fp8'"):
        cu.TrainConfig(precision="fp8")


def test_training_records_its_precision_and_scaler(sets, tmp_path):
    train, val = sets
    history = cu.train_model(build("cpcad", 0), train, val, config(1), tmp_path, progress=False)
    assert history[0]["precision"] == "fp32"
    assert "scaler" in torch.load(tmp_path / "last.pt", weights_only=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_training_step_with_a_gradient_scaler(sets, tmp_path):
    train, val = sets
    history = cu.train_model(build("cpcad", 0), train, val, config(2, device="cuda", precision="fp16"), tmp_path,
                             progress=False)
    assert history[-1]["precision"] == "fp16" and math.isfinite(history[-1]["train_loss"])
    assert torch.load(tmp_path / "last.pt", weights_only=True)["scaler"]["scale"] > 0


@pytest.mark.parametrize("text, seconds", [(3600, 3600.0), ("90s", 90.0), ("30m", 1800.0), ("11h", 39600.0),
                                           ("1h30m", 5400.0), (None, None)])
def test_parse_duration(text, seconds):
    assert cu.parse_duration(text) == seconds


def test_parse_duration_rejects_nonsense():
    with pytest.raises(cu.ParameterError, match="time_budget='soon'"):
        cu.parse_duration("soon")


def test_time_budget_stops_at_an_epoch_boundary_and_resumes(sets, tmp_path, monkeypatch):
    """A budget of one epoch: the second would overrun, so training stops with a checkpoint;
    resuming without a budget ends where an uninterrupted run does."""
    train, val = sets
    clock = {"t": 0.0}
    monkeypatch.setattr(cpc_ad.training.time, "perf_counter", lambda: clock.__setitem__("t", clock["t"] + 1.0) or clock["t"])
    with pytest.raises(cu.TimeBudgetReached, match=r"stopped after epoch [12] of 3.*resume=True") as e:
        cu.train_model(build("cpcad", 0), train, val, config(3, time_budget=5.0), tmp_path / "a", progress=False)
    assert str(tmp_path / "a" / "last.pt") in str(e.value)
    stopped = int(str(e.value).split("epoch ")[1].split(" ")[0])
    assert torch.load(tmp_path / "a" / "last.pt", weights_only=True)["epoch"] == stopped
    progress = json.loads((tmp_path / "a" / "progress.json").read_text())
    assert progress["epoch"] == stopped and progress["epochs"] == 3
    monkeypatch.undo()
    resumed = cu.train_model(build("cpcad", 7), train, val, config(3), tmp_path / "a", resume=True, progress=False)
    straight = cu.train_model(build("cpcad", 0), train, val, config(3), tmp_path / "b", progress=False)
    assert [h["train_loss"] for h in resumed] == [h["train_loss"] for h in straight]


# ---- DistributedDataParallel under torchrun (CPU, gloo) ----

DDP_SCRIPT = """
import json, sys, torch
import cpc_utils as cu
rank, world = cu.init_distributed()
torch.set_num_threads(1)
root, out = sys.argv[1], sys.argv[2]
data = cu.load_category(root, "brick", 64, num_threads=1)
train, val = cu.split_train_val(data["train"], 0.25, 0)
cu.seed_everything(0)
model = cu.CPCAD(cu.CPCADConfig(width=8), cu.PatchGrid(64, 16, 8))
history = cu.train_model(model, train, val, cu.TrainConfig(epochs=30, batch_size=8, patience=100, device="cpu"),
                         out, progress=False)
if rank == 0:
    json.dump({"world": world, "history": history}, open(out + "/history.json", "w"))
"""


UNEVEN_SCRIPT = """
import json, sys, torch
import cpc_utils as cu
rank, world = cu.init_distributed()
torch.set_num_threads(1)
images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
train = cu.ImageSet(images, torch.zeros(8, 1, 32, 32, dtype=torch.bool), torch.zeros(8, dtype=torch.long),
                    ["good"] * 8, [str(i) for i in range(8)])
ref = cu.to_float(images).flatten(1)
model = cu.CPCAD(cu.CPCADConfig(width=8, pred_steps=2, num_negatives=4), cu.PatchGrid(32, 16, 8))
seen, forward = [], model.forward
def spy(x, generator=None):
    seen.extend(int((ref == row).all(1).nonzero()) for row in x.flatten(1))
    return forward(x, generator)
model.forward = spy
cu.train_model(model, train, None, cu.TrainConfig(epochs=3, batch_size=3, device="cpu"), progress=False)
json.dump(seen, open(sys.argv[1] + f"/seen{rank}.json", "w"))
"""


def test_uneven_shares_train_every_image_once_per_epoch(tmp_path):
    """8 images, batches of 3, 2 processes: shares of 2 and 1 images, so the processes draw
    different numbers of negatives. Each epoch the two still split one permutation between
    them: every image is trained exactly once per epoch (3 steps: 5 images on rank 0, 3 on rank 1)."""
    import subprocess
    import sys
    (tmp_path / "run.py").write_text(UNEVEN_SCRIPT)
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(cu.__file__).parent)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "run.py"), str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads((tmp_path / f"seen{r}.json").read_text()) for r in (0, 1)]
    assert [len(s) for s in seen] == [3 * 5, 3 * 3]
    for epoch in range(3):
        both = seen[0][5 * epoch:5 * epoch + 5] + seen[1][3 * epoch:3 * epoch + 3]
        assert sorted(both) == list(range(8)), (epoch, seen)


def test_two_processes_under_torchrun_learn_like_one(tmp_path):
    """torchrun --nproc_per_node 2 (gloo on CPU) at the same global batch of 8: it finishes, the
    loss falls far below chance, and the final losses match the 1-process run within 0.1. Not
    exactly: each process draws its negatives from its own half of the batch."""
    import subprocess
    import sys
    root = cu.make_demo_dataset(tmp_path / "data", ["brick"], n_train=64, n_test_good=2, n_per_defect=1, image_size=64)
    (tmp_path / "run.py").write_text(DDP_SCRIPT)
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for n in (1, 2):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
        proc = subprocess.run([*launcher, str(tmp_path / "run.py"), str(root), str(tmp_path / f"n{n}")],
                              capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[n] = json.loads((tmp_path / f"n{n}" / "history.json").read_text())
    assert runs[2]["world"] == 2 and len(runs[2]["history"]) == 30
    chance = math.log(64)
    one, two = runs[1]["history"][-1], runs[2]["history"][-1]
    assert two["train_loss"] < 0.75 * chance and two["val_loss"] < 0.75 * chance, two
    assert abs(two["train_loss"] - one["train_loss"]) < 0.1 and abs(two["val_loss"] - one["val_loss"]) < 0.1, (one, two)
    assert sorted(p.name for p in (tmp_path / "n2").iterdir()) == ["best.pt", "history.json", "last.pt", "progress.json"]
