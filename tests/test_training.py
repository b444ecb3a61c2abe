"""Training section: the one training loop, its checkpoints, exact resume, NaN handling,
early stopping, the device choice and atomic writes."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import cpc_utils as cu

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
    return sorted(p.name for p in folder.iterdir() if p.name not in ("last.pt", "best.pt"))


# ---- the loop ------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MODELS))
def test_history_and_checkpoints(name, sets, tmp_path, monkeypatch):
    train, val = sets
    saved, save_atomic = [], cu.save_atomic

    def spy(obj, path, *args, **kwargs):
        saved.append((Path(path).name, obj["epoch"]))
        return save_atomic(obj, path, *args, **kwargs)

    monkeypatch.setattr(cu, "save_atomic", spy)
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
    last = torch.load(tmp_path / "last.pt", weights_only=False)
    assert last["epoch"] == 3 and without_seconds(last["history"]) == without_seconds(history)
    best = torch.load(tmp_path / "best.pt", weights_only=False)
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
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=False)
    assert_same_weights(a["model"], b["model"])
    assert torch.equal(a["generator"], b["generator"])


def test_resume_without_checkpoint_starts_fresh(sets, tmp_path):
    train, val = sets
    history = cu.train_model(build("cpcad", 0), train, val, config(2), tmp_path, resume=True, progress=False)
    assert [h["epoch"] for h in history] == [1, 2]


def test_resume_finished_run_trains_no_more(sets, tmp_path):
    train, val = sets
    cu.train_model(build("cpcad", 0), train, val, config(2), tmp_path, progress=False)
    history = cu.train_model(build("cpcad", 1), train, val, config(2), tmp_path, resume=True, progress=False)
    assert [h["epoch"] for h in history] == [1, 2]


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
    state = torch.load(tmp_path / "last.pt", weights_only=False)
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
    last = torch.load(tmp_path / "nan" / "last.pt", weights_only=False)
    assert last["epoch"] == 1 and len(last["history"]) == 1
    reference = build("cpcad", 0)
    cu.train_model(reference, train, val, config(1), tmp_path / "ref", progress=False)
    good = torch.load(tmp_path / "ref" / "last.pt", weights_only=False)
    assert_same_weights(last["model"], good["model"])
    model.load_state_dict(last["model"])  # loadable into the model


@pytest.mark.parametrize("with_val", [True, False])
def test_infinite_learning_rate_raises_without_writing_nan_weights(with_val, sets, tmp_path):
    """One step per epoch: the first step turns the weights into NaN. That must fail before
    a checkpoint with NaN weights replaces the last good one."""
    train, val = sets
    with pytest.raises(FloatingPointError):
        cu.train_model(build("cpcad", 0), train, val if with_val else None,
                       config(3, lr=float("inf"), batch_size=len(train)), tmp_path, progress=False)
    for name in ("last.pt", "best.pt"):
        if (tmp_path / name).exists():
            state = torch.load(tmp_path / name, weights_only=False)
            assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point()), name


@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping(patience, sets, tmp_path):
    """With lr=0 the validation loss never improves after epoch 1 (validation is repeatable)."""
    train, val = sets
    history = cu.train_model(build("cpcad", 0), train, val, config(10, lr=0.0, patience=patience), tmp_path,
                             progress=False)
    assert len(history) == patience + 1 < 10
    assert len({h["val_loss"] for h in history}) == 1
    assert torch.load(tmp_path / "best.pt", weights_only=False)["epoch"] == 1


@pytest.mark.parametrize("name", list(MODELS))
def test_best_weights_without_checkpoint_dir(name, sets, monkeypatch):
    """Without checkpoint_dir the run still ends on the best validation epoch's weights (kept in
    memory): validation losses scripted to be best at epoch 2 of 4, compared with a 2-epoch run."""
    train, val = sets
    scripted = iter([3.0, 1.0, 2.0, 2.5])
    monkeypatch.setattr(cu, "validation_loss", lambda *args, **kwargs: next(scripted))
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
    stale = cu.CPCAD(cu.CPCADConfig(width=8, test_negatives=16), grid)
    cu.save_atomic({"model": stale.state_dict(), "epoch": 1}, tmp_path / "best.pt")
    torch.manual_seed(1)
    model = cu.CPCAD(cu.CPCADConfig(width=8, test_negatives=16), grid)
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
