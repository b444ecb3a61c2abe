"""The parts train_model is made of (cpc_ad.training): early stopping, the time budget, the
checkpoint files and a process's share of a batch, each on its own."""
from __future__ import annotations

import json

import pytest
import torch

import cpc_ad.training as training


def test_early_stopping_counts_epochs_without_a_strictly_better_loss():
    stop = training._EarlyStopping(patience=2)
    assert [stop.improved(v) for v in (3.0, 2.0, 2.0, 2.5)] == [True, True, False, False]
    assert stop.best == 2.0 and stop.bad_epochs == 2 and stop.exhausted
    assert stop.improved(1.0) and stop.bad_epochs == 0 and not stop.exhausted


def test_time_budget_lets_the_first_epoch_run_and_stops_before_an_overrun(monkeypatch):
    one = training._Distribution(0, 1)
    assert not training._TimeBudget(None).reached(5, 0, [{"seconds": 1e9}], one)
    clock = iter([0.0, 95.0])  # the start, then the check before the second epoch
    monkeypatch.setattr(training.time, "perf_counter", lambda: next(clock))
    budget = training._TimeBudget(100.0)
    assert not budget.reached(0, 0, [], one)  # the first epoch of a call reads no clock
    assert budget.reached(1, 0, [{"seconds": 10.0}], one)
    assert budget.message(1, 3, "; kept").startswith("stopped after epoch 1 of 3: another epoch (up to 10 s) "
                                                     "would overrun time_budget=100 s; kept")


def test_checkpointer_writes_only_on_rank_0_and_keeps_the_best_in_memory_without_a_folder(tmp_path):
    model = torch.nn.Linear(2, 1)
    files = training._Checkpointer(tmp_path, rank=0)
    files.keep_best(model, 1)
    files.save_epoch({"epoch": 1}, {"epoch": 1, "train_loss": 2.0, "seconds": 0.5}, epochs=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt", "progress.json"]
    assert json.loads((tmp_path / "progress.json").read_text()) == {
        "epoch": 1, "epochs": 3, "train_loss": 2.0, "val_loss": None, "seconds": 0.5}
    assert files.has_last() and not training._Checkpointer(tmp_path, rank=1).writes
    files.clear_stale()
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]

    memory = training._Checkpointer(None, rank=0)
    memory.keep_best(model, 1)
    best = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    memory.load_best(model, torch.device("cpu"))
    assert all(torch.equal(best[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("rank, world, share", [(0, 1, [5, 1, 3]), (0, 2, [5, 3]), (1, 2, [1]), (2, 4, None)])
def test_a_process_trains_on_every_world_th_image_of_a_batch(rank, world, share):
    got = training._Distribution(rank, world).share(torch.tensor([5, 1, 3]))
    assert (got.tolist() if got is not None else None) == share
