"""Per-class selection (`cpc_ad/selection.py`): the criterion, the spread, the tie rule, and that
nothing of the test split enters the choice; and the pipeline's record of it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cpc_utils as cu
from test_pipeline import TINY


def val_metrics(image: dict[str, float], aupro: float, pixel: float = 0.9) -> dict:
    return {**{f"image_auroc_{r}": v for r, v in image.items()}, "aupro": aupro, "pixel_auroc": pixel}


def test_the_criterion_is_the_mean_of_validation_image_auroc_and_aupro():
    assert cu.criterion(val_metrics({"max": 0.8, "mean": 0.6, "top10": 0.7}, 0.5), "max") == pytest.approx(0.65)
    rows = cu.candidate_table({"knn_stats": val_metrics({"max": 0.8, "mean": 0.6, "top10": 0.7}, 0.5)}, {},
                              ("max", "mean"))
    assert [(r["detector"], r["reduce"], r["parts"]) for r in rows] == [("knn_stats", "max", 1), ("knn_stats", "mean", 1)]
    assert rows[1]["criterion"] == pytest.approx(0.55) and rows[0]["test_image_auroc"] is None  # no test: none


def rows_of(criteria: dict[tuple[str, str], float]) -> list[dict]:
    return [{"detector": d, "reduce": r, "parts": len(cu.DETECTOR_PARTS[d]), "criterion": c}
            for (d, r), c in criteria.items()]


def test_the_best_wins_unless_a_simpler_one_is_within_the_spread():
    rows = rows_of({("knn_stats_pixel", "max"): 0.90, ("knn_stats", "max"): 0.88, ("pixel", "top10"): 0.80})
    chosen, why = cu.choose(rows, spread=0.01)
    assert chosen["detector"] == "knn_stats_pixel" and why.startswith("highest validation criterion")
    chosen, why = cu.choose(rows, spread=0.03)  # the two-part fusion is not resolvably better: one part wins
    assert (chosen["detector"], chosen["reduce"]) == ("knn_stats", "max")
    assert "within one bootstrap standard error (0.030)" in why and "fewer parts" in why
    chosen, _ = cu.choose(rows, spread=0.2)  # among equally simple ones, the higher criterion
    assert chosen["detector"] == "knn_stats"


def test_the_choice_never_reads_the_test_split():
    val = {"knn_stats": val_metrics({"max": 0.9, "mean": 0.7, "top10": 0.8}, 0.6),
           "pixel": val_metrics({"max": 0.7, "mean": 0.6, "top10": 0.65}, 0.7)}
    for test_auroc in (0.1, 0.99):  # whatever test says, the same choice
        test = {d: val_metrics({"max": test_auroc, "mean": test_auroc, "top10": test_auroc}, test_auroc) for d in val}
        chosen, why = cu.choose(cu.candidate_table(val, test, cu.REDUCES), 0.0)
        assert (chosen["detector"], chosen["reduce"]) == ("knn_stats", "max") and chosen["test_image_auroc"] == test_auroc


def test_the_spread_is_small_for_a_clear_separation_and_larger_for_a_noisy_one():
    rng = np.random.default_rng(0)
    n, H = 40, 16
    labels = torch.tensor([0] * 20 + [1] * 20)
    masks = torch.zeros(n, 1, H, H, dtype=torch.bool)
    masks[20:, :, 4:8, 4:8] = True
    clean = torch.from_numpy(rng.normal(0, 1, (n, 1, H, H))).float() + 5 * masks
    noisy = torch.from_numpy(rng.normal(0, 1, (n, 1, H, H))).float() + 0.5 * masks
    spread = {name: cu.bootstrap_spread(labels, maps.flatten(1).amax(1), masks, maps, n=20)
              for name, maps in (("clean", clean), ("noisy", noisy))}
    assert 0 <= spread["clean"] < 0.01 < spread["noisy"] < 0.2


def test_the_selection_table_marks_the_choice_and_says_when_pixels_won():
    rows = cu.candidate_table({"pixel": val_metrics({"max": 0.9, "mean": 0.7, "top10": 0.8}, 0.6)},
                              {"pixel": val_metrics({"max": 0.8, "mean": 0.7, "top10": 0.75}, 0.5)}, cu.REDUCES)
    selection = {"mode": "validation", "detector": "pixel", "reduce": "max", "why": "highest", "candidates": rows}
    table = cu.selection_table(selection)
    assert "| **pixel (max)** ← | 1 | 0.750 | 0.900 | 0.600 | 0.800 |" in table
    assert "the learned features did not help" in table
    assert "did not help" not in cu.selection_table({**selection, "mode": "fixed"})


# ---- the pipeline ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chosen(tmp_path_factory):
    root = cu.make_demo_dataset(tmp_path_factory.mktemp("tiny"), ["brick"], n_train=8, n_test_good=2,
                                n_per_defect=1, image_size=64)
    out = tmp_path_factory.mktemp("runs") / "brick"
    result = cu.run_cpcad(data_root=str(root), category="brick", output_dir=str(out), progress=False, **TINY)
    return root, out, result


def test_a_run_chooses_on_validation_and_records_every_candidate(chosen):
    _, out, result = chosen
    m = json.loads((out / "metrics.json").read_text())
    s = m["selection"]
    assert s["mode"] == "validation" and s["criterion"] == cu.CRITERION and s["spread"] > 0
    pairs = {(r["detector"], r["reduce"]) for r in s["candidates"]}
    assert pairs == {(d, r) for d in cu.CANDIDATES for r in cu.REDUCES}  # every candidate, every reduction
    row = next(r for r in s["candidates"] if (r["detector"], r["reduce"]) == (s["detector"], s["reduce"]))
    best = max(r["criterion"] for r in s["candidates"])
    assert row["criterion"] >= best - s["spread"] and all(r["parts"] >= row["parts"] for r in s["candidates"]
                                                          if r["criterion"] >= best - s["spread"])
    # the headline is the chosen candidate's test number, pure CPC-AD and raw pixels beside it
    assert (m["detector"], m["image_reduce"]) == (s["detector"], s["reduce"])
    assert m["image_auroc"] == row["test_image_auroc"] and m["val_image_auroc"] == row["val_image_auroc"]
    assert m["baseline_image_auroc"] == m[f"baseline_image_auroc_{s['reduce']}"]
    assert m["cpcad_image_auroc"] == m["cpcad_image_auroc_mean"]
    assert m["fixed_image_auroc"] == m["fixed_image_auroc_top10"]
    # two folds: every held-out normal gives the threshold a score, none calibrated by itself
    data = result.data
    assert s["validation"]["normals"] == len(data.normals) + len(data.calib) == m["threshold_rule"]["n_normals"]
    assert sum(data.val_folds) == len(data.val) and data.val.paths[:len(data.normals)] == data.normals.paths
    bundle = cu.load_bundle(out / "model.pt")
    assert (bundle.scoring.detector, bundle.scoring.reduce) == (s["detector"], s["reduce"])
    assert bundle.threshold == m["threshold"]


def test_detector_forces_and_candidates_restrict_the_choice(chosen, tmp_path):
    root, _, _ = chosen
    forced = cu.run_cpcad(data_root=str(root), category="brick", output_dir=str(tmp_path / "forced"),
                          detector="pixel", reduce="max", progress=False, **TINY)
    s = forced.record.selection
    assert s["mode"] == "fixed" and (s["detector"], s["reduce"]) == ("pixel", "max") and len(s["candidates"]) == 1
    # the raw-pixel detector is the baseline, map for map
    assert torch.equal(forced.ours.maps, forced.baseline.maps)
    bundle = cu.load_bundle(tmp_path / "forced" / "model.pt")
    scored = bundle.score(forced.data.test.images)["scores"]
    torch.testing.assert_close(scored, forced.ours.scores["max"])
    few = cu.run_cpcad(data_root=str(root), category="brick", output_dir=str(tmp_path / "few"),
                       candidates=["pixel", "pixel_pos"], progress=False, **TINY)
    assert {r["detector"] for r in few.record.selection["candidates"]} == {"pixel", "pixel_pos"}
    assert few.record.selection["mode"] == "validation"
    with pytest.raises(ValueError, match="unknown candidates"):
        cu.run_cpcad(data_root=str(root), category="brick", output_dir=str(tmp_path / "bad"),
                     candidates=["pixels"], progress=False, **TINY)
