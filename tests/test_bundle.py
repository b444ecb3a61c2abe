"""The model bundle: thresholds from normal data, save_bundle / load_bundle, and the
`python -m cpc_utils score` command, on a tiny model trained for one epoch on demo data."""
from __future__ import annotations

import csv
import glob
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cpc_utils as cu
import cpc_ad.bundle
import cpc_ad.inference

ROOT = Path(__file__).resolve().parent.parent
TARGET_FPR = 0.01
SC = cu.ScoringConfig(detector="knn_stats_pixel_pos", reduce="top10", test_negatives=64, knn_bank=256)


@pytest.fixture(scope="module")
def brick(tmp_path_factory) -> Path:
    """One demo category in miniature: 8 train, 2 good + 1 image per defect type, 64 px."""
    return cu.make_demo_dataset(tmp_path_factory.mktemp("data"), ["brick"], n_train=8, n_test_good=2,
                                n_per_defect=1, image_size=64)


@pytest.fixture(scope="module", params=[True, False], ids=["shared_encoder", "one_encoder_per_direction"])
def trained(request, brick, tmp_path_factory) -> dict:
    """A one-epoch model, its bundle, and the scores notebook 02 would compute in-process."""
    torch.manual_seed(0)
    data = cu.load_category(brick, "brick", 64)
    train, calib, normals = cu.split_held_out(data["train"], 0.5, 0)
    val = cu.make_validation_set(normals, 0)
    grid = cu.PatchGrid(64, 16, 8)
    # no auxiliary defect head: its weights would fix the descriptor sizes the crafted grids below
    # change, before the check that names them (bundles of the default: tests/test_head.py)
    model = cu.CPCAD(cu.cpcad_config("fast", grid, width=8, shared_encoder=request.param, defect_head=False), grid)
    sc = SC  # a chosen detector that reads the learned features and the raw pixels at their place
    cu.train_model(model, train, calib, cu.TrainConfig(epochs=1, batch_size=4, device="cpu"), progress=False)
    scoring = cu.prepare_scoring(model, train.images, calib.images, sc, device="cpu")
    sg = scoring["grid"]
    maps = {}
    for name, images in (("test", data["test"].images), ("val", val.images)):
        raw = cu.raw_scores(model, images, scoring, 16, "cpu")
        maps[name] = cu.detector_maps(raw, scoring["calibration"], sc.detector)
    normal = val.labels == 0
    val_scores = cu.image_scores(maps["val"], sc.reduce)
    threshold = cu.normal_threshold(val_scores[normal], TARGET_FPR, "image scores")
    pixel_threshold = cu.normal_threshold(cu.patches_to_pixels(maps["val"], sg)[normal], TARGET_FPR, "pixel scores")
    path = tmp_path_factory.mktemp("bundle") / "model.pt"
    cu.save_bundle(path, model, scoring, threshold, pixel_threshold, cu.data_fingerprint(brick, "brick"),
                   colour=cpc_ad.bundle.colour_mode(train.images))
    return {"path": path, "test": data["test"], "val": val, "val_scores": val_scores, "threshold": threshold,
            "scores": cu.image_scores(maps["test"], sc.reduce), "pixel_maps": cu.patches_to_pixels(maps["test"], sg),
            "shared_encoder": request.param}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def score_error(*argv: str) -> str:
    """Run the score command in-process; return its one-line error (it must fail)."""
    with pytest.raises(SystemExit) as e:
        cu.main(["score", *map(str, argv), "--device", "cpu"])
    message = str(e.value)
    assert message.startswith("python -m cpc_utils score: ") and "\n" not in message, message
    return message


# ---- thresholds ----------------------------------------------------------------------

@pytest.mark.parametrize("n, target", [(200, 0.01), (200, 0.05), (37, 0.1), (8, 0.01)])
def test_threshold_is_the_tightest_with_at_most_the_target_fpr(n, target):
    scores = np.random.default_rng(n).normal(size=n)
    rule = cu.normal_threshold(scores, target)
    assert (scores > rule["value"]).mean() <= target and rule["fpr_on_normals"] <= target
    lower = np.sort(scores)[np.sort(scores) < rule["value"]]
    assert not len(lower) or (scores > lower[-1]).mean() > target  # one notch lower breaks the target
    assert rule["n_normals"] == n and rule["target_fpr"] == target


def test_threshold_with_few_normals_is_their_max_and_says_its_expected_fpr():
    rule = cu.normal_threshold(torch.tensor([1.0, 3.0, 2.0]), 0.01)
    assert rule["value"] == 3.0 and rule["fpr_on_normals"] == 0 and rule["expected_fpr"] == 0.25


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")]])
def test_threshold_needs_finite_scores(bad):
    with pytest.raises(ValueError, match="finite"):
        cu.normal_threshold(np.array(bad), 0.01)


def test_threshold_metrics():
    m = cu.threshold_metrics(np.array([0, 0, 0, 1, 1]), np.array([0.1, 0.6, 0.2, 0.9, 0.3]), 0.5)
    assert m == {"precision": 0.5, "recall": 0.5, "fpr": 1 / 3, "true_positives": 1, "false_positives": 1}
    assert cu.threshold_metrics(np.zeros(2), np.zeros(2), 0.5)["precision"] is None  # nothing flagged


# ---- the bundle ------------------------------------------------------------------------

def test_bundle_scores_as_the_notebook_and_holds_its_provenance(trained, brick):
    bundle = cu.load_bundle(trained["path"])
    result = bundle.score(trained["test"].images)
    torch.testing.assert_close(result["scores"], trained["scores"])
    torch.testing.assert_close(result["pixel_maps"], trained["pixel_maps"])
    assert torch.equal(result["anomalous"], trained["scores"] > bundle.threshold)
    assert bundle.model.cfg.shared_encoder is trained["shared_encoder"] and bundle.image_size == 64
    assert bundle.threshold_rule == trained["threshold"] and bundle.threshold_rule["target_fpr"] == TARGET_FPR
    assert set(bundle.references) == {"knn_stats"} and bundle.pixels.kinds == ("pixel_pos",)  # only what it reads
    assert bundle.scoring == SC and bundle.pixels is not None and bundle.score_grid == cu.PatchGrid(64, 16, 4)
    assert bundle.info["format_version"] == cu.BUNDLE_VERSION and bundle.info["code_version"] == cu.code_version()
    assert bundle.info["data"] == cu.data_fingerprint(brick, "brick")
    # the threshold keeps validation normals' false-positive rate at or below the target
    normal = trained["val"].labels == 0
    assert cu.threshold_metrics(trained["val"].labels[normal], trained["val_scores"][normal],
                                bundle.threshold)["fpr"] <= TARGET_FPR
    with pytest.raises(ValueError, match=r"uint8 images \(N, 3, 64, 64\)"):
        bundle.score(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_bundle_scores_in_the_runs_precision(trained, tmp_path, monkeypatch):
    """A bundle remembers the precision its run computed in and scores in it on a GPU (fp32
    elsewhere), instead of autocasting an fp32 model to bf16/fp16."""
    b = torch.load(trained["path"], weights_only=True)
    assert b["precision"] == "fp32"  # save_bundle's default: what a CPU run computes in
    torch.save({**b, "precision": "bf16"}, tmp_path / "bf16.pt")
    bundle = cu.load_bundle(tmp_path / "bf16.pt")
    assert bundle.info["precision"] == "bf16"
    seen = []

    def stop(*args, **kwargs):
        seen.append(args[7])
        raise RuntimeError("stop")

    monkeypatch.setattr(cpc_ad.bundle, "score_patches", stop)
    for device in ("cpu", "cuda"):  # score_patches is replaced: no GPU needed to see what it is given
        bundle.device = torch.device(device)
        with pytest.raises(RuntimeError, match="stop"):
            bundle.score(trained["test"].images[:1])
    assert seen == ["fp32", "bf16"]
    with pytest.raises(cu.ParameterError, match="precision='auto'"):
        cu.save_bundle(tmp_path / "auto.pt", bundle.model, {"bank": bundle.bank, "references": {}, "calibration": None},
                       b["threshold"], b["pixel_threshold"], precision="auto")
    assert not (tmp_path / "auto.pt").exists()


def test_score_command_in_a_fresh_process_matches_in_process_scores(trained, tmp_path):
    test, out = trained["test"], tmp_path / "out"
    folder = Path(test.paths[0]).parent.parent  # <category>/test
    proc = subprocess.run([sys.executable, "-m", "cpc_utils", "score", str(trained["path"]), str(folder),
                           "--out", str(out), "--device", "cpu", "--batch-size", "3"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(test)} of {len(test)} images scored" in proc.stdout
    rows = read_csv(out / "scores.csv")
    assert len(rows) == len(test) and all(not r["error"] for r in rows)
    expected = {str(Path(p).resolve()): float(s) for p, s in zip(test.paths, trained["scores"])}
    got = {str(Path(r["path"]).resolve()): float(r["image_score"]) for r in rows}
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=1e-5, atol=1e-6)
    for r in rows:
        assert r["verdict"] == ("anomalous" if float(r["image_score"]) > float(r["threshold"]) else "normal")
        mask = np.asarray(Image.open(out / r["mask"]))
        assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
        assert Image.open(out / r["heatmap"]).size == (64, 64)
        assert 0 <= int(r["max_pixel_x"]) < 64 and 0 <= int(r["max_pixel_y"]) < 64


def test_threshold_override_changes_the_verdicts(trained, tmp_path):
    image = Path(trained["test"].paths[0])
    cu.main(["score", str(trained["path"]), str(image), "--out", str(tmp_path), "--device", "cpu",
             "--threshold=-1e9", "--pixel-threshold", "1e9"])
    (row,) = read_csv(tmp_path / "scores.csv")
    assert row["verdict"] == "anomalous" and float(row["threshold"]) == -1e9
    assert not np.asarray(Image.open(tmp_path / row["mask"])).any()


def test_output_names_are_unique_also_where_case_is_ignored(tmp_path):
    for order in (["a.jpg", "a.png", "a_png.png"], ["a_png.png", "a.jpg", "a.png", "A.PNG", "a_jpg.png"]):
        names = cpc_ad.inference._output_names([tmp_path / n for n in order])
        assert len({n.as_posix().casefold() for n in names}) == len(order), names
        assert all(n.suffix == ".png" for n in names)


def copy_images(trained, folder: Path, n: int = 2) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{k}.png" for k in range(n)]
    for p, src in zip(paths, trained["test"].paths):
        p.write_bytes(Path(src).read_bytes())
    return paths


def files_below(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_out_inside_the_scored_folder_is_never_read_as_input(trained, tmp_path, capsys):
    copy_images(trained, tmp_path / "photos")
    out = tmp_path / "photos" / "scored"
    for _ in range(2):  # the second run finds the first one's heatmaps and masks in photos/, and skips them
        cu.main(["score", str(trained["path"]), str(tmp_path / "photos"), "--out", str(out), "--device", "cpu"])
        assert sorted(Path(r["path"]).name for r in read_csv(out / "scores.csv")) == ["0.png", "1.png"]
    assert "4 images inside --out" in capsys.readouterr().out
    assert "every image found" in score_error(trained["path"], out / "heatmaps", "--out", out)


def test_an_earlier_score_output_among_the_inputs_is_not_scored(trained, tmp_path, capsys):
    """photos/v1 from an earlier run: its heatmaps and masks are not photos, and a second run
    into photos/v2 says it leaves them out instead of scoring them."""
    copy_images(trained, tmp_path / "photos")
    for run in ("v1", "v2"):
        cu.main(["score", str(trained["path"]), str(tmp_path / "photos"), "--out", str(tmp_path / "photos" / run),
                 "--device", "cpu"])
        assert sorted(Path(r["path"]).name for r in read_csv(tmp_path / "photos" / run / "scores.csv")) == ["0.png", "1.png"]
    assert "4 images inside earlier score outputs" in capsys.readouterr().out
    assert "inside an earlier score output" in score_error(trained["path"], tmp_path / "photos" / "v1", "--out", tmp_path / "o")


@pytest.mark.parametrize("where", ["masks", "heatmaps", ""])
def test_an_out_holding_other_files_is_refused_before_scoring(trained, tmp_path, where):
    """--out whose masks/ (or heatmaps/, or itself) holds the input images: refused, inputs kept."""
    inputs = copy_images(trained, tmp_path / "out" / where)
    before = files_below(tmp_path)
    message = score_error(trained["path"], *inputs, tmp_path / "elsewhere.png", "--out", tmp_path / "out")
    assert files_below(tmp_path) == before
    assert "no such file" in message or f"--out {tmp_path / 'out'} is not empty" in message
    message = score_error(trained["path"], *inputs, "--out", tmp_path / "out")
    assert "not empty and not an earlier score output" in message or "is never read as input" in message
    assert files_below(tmp_path) == before


def test_an_out_that_is_a_file_is_refused_before_scoring(trained, tmp_path, monkeypatch):
    (tmp_path / "out").write_text("a file")
    monkeypatch.setattr(cu.Bundle, "score", lambda *a, **k: pytest.fail("scored before checking --out"))
    message = score_error(trained["path"], trained["test"].paths[0], "--out", tmp_path / "out")
    assert f"--out {tmp_path / 'out'} is a file" in message and (tmp_path / "out").read_text() == "a file"


def test_a_reused_out_holds_only_the_new_outputs_and_the_users_files(trained, tmp_path):
    a, b = copy_images(trained, tmp_path / "first")
    c = copy_images(trained, tmp_path / "second", 1)[0]
    out = tmp_path / "out"
    cu.main(["score", str(trained["path"]), str(a), str(b), "--out", str(out), "--device", "cpu"])
    (out / "notes.txt").write_text("mine")  # the user's, added later: kept
    cu.main(["score", str(trained["path"]), str(c), "--out", str(out), "--device", "cpu"])
    assert sorted(files_below(out)) == [".cpc_utils_score", "heatmaps/0.png", "masks/0.png", "notes.txt", "scores.csv"]
    assert [r["path"] for r in read_csv(out / "scores.csv")] == [str(c)]
    (out / "masks" / "extra.png").write_text("the user's file where score would write")
    (tmp_path / "extra.png").write_bytes(c.read_bytes())
    assert "masks/extra.png was not written by score" in score_error(trained["path"], tmp_path / "extra.png", "--out", out)
    assert (out / "masks" / "extra.png").read_text() == "the user's file where score would write"
    assert (out / "masks" / "0.png").exists()  # refused before anything was deleted


def test_a_tiny_image_is_scored_with_a_warning_and_its_enlargement(trained, tmp_path, capsys):
    Image.open(trained["test"].paths[0]).resize((20, 30)).save(tmp_path / "tiny.png")
    with pytest.warns(UserWarning, match=r"tiny.png is 20x30 px, enlarged 3.2 times to the model's 64x64"):
        cu.main(["score", str(trained["path"]), str(tmp_path / "tiny.png"), "--out", str(tmp_path / "out"),
                 "--device", "cpu"])
    (row,) = read_csv(tmp_path / "out" / "scores.csv")
    assert row["upsampled"] == "3.2" and not row["error"]
    assert "1 enlarged over 2 times" in capsys.readouterr().out


def test_a_non_finite_score_is_an_error_row_and_a_failed_exit(trained, tmp_path, monkeypatch):
    score = cu.Bundle.score

    def nan_first(self, images, *a, **k):
        r = score(self, images, *a, **k)
        r["scores"][0] = float("nan")
        return r
    monkeypatch.setattr(cu.Bundle, "score", nan_first)
    a, b = copy_images(trained, tmp_path / "in")
    message = score_error(trained["path"], a, b, "--out", tmp_path / "out")
    assert "1 of 2 images got a non-finite score" in message
    rows = {Path(r["path"]).name: r for r in read_csv(tmp_path / "out" / "scores.csv")}
    assert rows["0.png"]["verdict"] == "error" and "not finite" in rows["0.png"]["error"]
    assert rows["0.png"]["image_score"] == "nan" and not rows["0.png"]["heatmap"]
    assert rows["1.png"]["verdict"] in ("normal", "anomalous") and not rows["1.png"]["error"]
    assert not (tmp_path / "out" / "heatmaps" / "0.png").exists()
    with pytest.raises(ValueError, match="the threshold is nan: expected a finite number"):  # the API too
        cu.score_files(trained["path"], [b], tmp_path / "o", threshold=float("nan"))


def test_a_portrait_jpeg_is_scored_upright(trained, tmp_path):
    stored = np.asarray(Image.open(trained["test"].paths[0]).convert("RGB").resize((80, 48)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    Image.fromarray(stored).save(tmp_path / "portrait.jpg", exif=exif, quality=95)
    cu.main(["score", str(trained["path"]), str(tmp_path / "portrait.jpg"), "--out", str(tmp_path / "out"),
             "--device", "cpu"])
    (row,) = read_csv(tmp_path / "out" / "scores.csv")
    assert (row["width"], row["height"]) == ("48", "80")
    assert Image.open(tmp_path / "out" / row["heatmap"]).size == (48, 80)


def test_overlay_memory_is_bounded(tmp_path):
    """A 1500 x 1500 overlay once took 84 bytes per pixel (float64 at full size; 4 GB for 6000 x 6000)."""
    import tracemalloc
    image = np.zeros((1500, 1500, 3), np.uint8)
    pixel_map = np.linspace(0, 1, 1500 * 1500, dtype=np.float32).reshape(1500, 1500)
    cu.overlay_heatmap(image[:8, :8], pixel_map[:8, :8], 0.0, 1.0, pixel_map[:8, :8] > 0.5)  # imports, caches
    tracemalloc.start()
    try:
        out = cu.overlay_heatmap(image, pixel_map, 0.0, 1.0, pixel_map > 0.5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1500 * 1500, f"{peak / 2**20:.0f} MiB"
    assert out.dtype == np.uint8 and out.shape == (1500, 1500, 3)


# ---- errors ----------------------------------------------------------------------------

def test_unreadable_image_is_listed_and_the_others_scored(trained, tmp_path, capsys):
    folder = tmp_path / "new"
    (folder / "sub").mkdir(parents=True)
    good = Path(trained["test"].paths[0])
    (folder / "a.png").write_bytes(good.read_bytes())
    Image.open(good).convert("L").resize((80, 48)).save(folder / "sub" / "b.JPG")  # grayscale, another size
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "._a.png").write_bytes(b"macOS metadata")  # skipped, not an error
    (folder / "notes.txt").write_text("not an image either")  # skipped: not an image extension
    message = score_error(trained["path"], folder, "--out", tmp_path / "out")
    assert "1 of 3 images could not be read" in message
    rows = {Path(r["path"]).name: r for r in read_csv(tmp_path / "out" / "scores.csv")}
    assert set(rows) == {"a.png", "b.JPG", "broken.png"}
    assert "broken.png" in rows["broken.png"]["error"] and rows["broken.png"]["image_score"] == ""
    assert not rows["a.png"]["error"] and not rows["b.JPG"]["error"]
    assert (rows["b.JPG"]["width"], rows["b.JPG"]["height"]) == ("80", "48")
    assert np.asarray(Image.open(tmp_path / "out" / rows["b.JPG"]["mask"])).shape == (48, 80)
    assert "resized to 64x64 as in training" in capsys.readouterr().out


def test_bundle_errors_are_one_line(trained, tmp_path):
    image = trained["test"].paths[0]
    out = tmp_path / "out"
    assert "no model bundle at /no/such/model.pt" in score_error("/no/such/model.pt", image, "--out", out)
    data = trained["path"].read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    assert f"cannot read model bundle {truncated}" in score_error(truncated, image, "--out", out)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    assert f"cannot read model bundle {garbage}" in score_error(garbage, image, "--out", out)
    checkpoint = tmp_path / "last.pt"
    torch.save({"model": {}, "epoch": 1}, checkpoint)
    assert f"{checkpoint} is not a model bundle" in score_error(checkpoint, image, "--out", out)
    bundle = torch.load(trained["path"], weights_only=True)
    newer = tmp_path / "newer.pt"
    torch.save({**bundle, "format_version": 99}, newer)
    assert f"model bundle {newer} has format version 99" in score_error(newer, image, "--out", out)
    assert not out.exists()


def _nan_first_weight(b: dict) -> dict:
    state = dict(b["state_dict"])
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name].clone().view(-1).index_fill(0, torch.tensor([0]), float("nan")).view_as(state[name])
    return {**b, "state_dict": state}


CRAFTED = {  # name: (edit of the saved dict, what the one-line error must say)
    "nan_weights": (_nan_first_weight, "non-finite values in weights"),
    "nan_bank": (lambda b: {**b, "bank": torch.full_like(b["bank"], float("nan"))}, "non-finite values in bank"),
    "nan_threshold": (lambda b: {**b, "threshold": {**b["threshold"], "value": float("nan")}},
                      "threshold value nan, expected a finite number"),
    "inf_pixel_threshold": (lambda b: {**b, "pixel_threshold": {**b["pixel_threshold"], "value": float("inf")}},
                            "pixel_threshold value inf, expected a finite number"),
    "no_threshold_value": (lambda b: {**b, "threshold": {k: v for k, v in b["threshold"].items() if k != "value"}},
                           "has no threshold value"),
    "no_threshold": (lambda b: {k: v for k, v in b.items() if k != "threshold"}, "has no 'threshold'"),
    "threshold_not_a_dict": (lambda b: {**b, "threshold": 0.5}, "has a float as 'threshold', expected dict"),
    "empty_bank": (lambda b: {**b, "bank": b["bank"][:, :0]}, "has an empty bank"),
    "empty_references": (lambda b: {**b, "references": {k: v[:, :0] for k, v in b["references"].items()}},
                         "has an empty references['knn_stats']"),
    "no_references": (lambda b: {**b, "references": {}}, "has no knn_stats references"),
    "nan_calibration": (lambda b: {**b, "calibration": {**b["calibration"], "std": {
        k: float("nan") for k in b["calibration"]["std"]}}}, "calibration std['knn_stats'] nan"),
    "no_calibration": (lambda b: {**b, "calibration": None}, "has no calibration"),
    "no_pixel_source": (lambda b: {**b, "pixel_source": None}, "has pixel_source NoneType, expected float32 (N, 3, 32, 32)"),
    "pixel_grid": (lambda b: {**b, "grid": {**b["grid"], "patch_size": 32, "stride": 16}},
                   "has pixel_source torch.float32 (4, 3, 32, 32), expected float32 (N, 3, 16, 16)"),
    "uint8_pixel_source": (lambda b: {**b, "pixel_source": b["pixel_source"].to(torch.uint8)},
                           "has pixel_source torch.uint8 (4, 3, 32, 32), expected float32"),
    "nan_pixel_source": (lambda b: {**b, "pixel_source": b["pixel_source"] * float("nan")},
                         "has non-finite values in pixel_source"),
    "auto_detector": (lambda b: {**b, "scoring": {**b["scoring"], "detector": "auto"}}, "has detector 'auto', expected one of"),
    # a grid the weights load into, but whose patches give other descriptor sizes
    "grid_patch_size": (lambda b: {**b, "grid": {**b["grid"], "patch_size": 32, "stride": 16},  # (pixels: below)
                                   "scoring": {**b["scoring"], "detector": "knn_stats"}, "pixel_source": None},
                        "on 32 px patches (the grid"),
    # ... or another score grid than the calibration's
    "grid_stride": (lambda b: {**b, "grid": {**b["grid"], "stride": 16}},
                    "calibration mean['knn_stats'] is (1, 13, 13), expected (1, 7, 7)"),
    "grid_image_size": (lambda b: {**b, "grid": {**b["grid"], "image_size": 128}},
                        "has image_size 64 but a grid for 128 px images"),
    "bad_colour": (lambda b: {**b, "colour": "sepia"}, "has colour 'sepia', expected None or one of grayscale"),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_crafted_bundles_are_refused_at_load_naming_the_file(trained, tmp_path, case):
    edit, expected = CRAFTED[case]
    path = tmp_path / f"{case}.pt"
    torch.save(edit(torch.load(trained["path"], weights_only=True)), path)
    with pytest.raises(ValueError, match="model bundle") as e:
        cu.load_bundle(path)
    assert str(path) in str(e.value) and expected in str(e.value), str(e.value)
    message = score_error(path, trained["test"].paths[0], "--out", tmp_path / "out")
    assert str(path) in message and expected in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--threshold", "--pixel-threshold"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "high"])
def test_threshold_override_must_be_a_finite_number(trained, tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as e:
        cu.main(["score", str(trained["path"]), trained["test"].paths[0], "--out", str(tmp_path / "out"),
                 "--device", "cpu", f"{option}={value}"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"python -m cpc_utils score: error: argument {option}: expected a finite number, got {value!r}")
    assert not (tmp_path / "out").exists()


def test_input_errors_are_one_line(trained, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "._x.png").write_bytes(b"")
    assert "no images" in score_error(trained["path"], tmp_path / "empty", "--out", tmp_path / "out")
    assert "no such file or folder" in score_error(trained["path"], tmp_path / "nothing*.png", "--out", tmp_path / "o")


def test_find_images_reads_files_folders_and_globs(tmp_path):
    for name in ("a/1.png", "a/2.TIFF", "a/b/3.jpg", "a/__MACOSX/4.png", "a/._5.png", "a/6.txt", "c/7.bmp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = cu.find_images([tmp_path / "a", str(tmp_path / "c" / "*.bmp"), tmp_path / "a" / "1.png"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/1.png", "a/2.TIFF", "a/b/3.jpg", "c/7.bmp"]


class Payload:
    """What a foreign bundle may carry: unpickling it calls print, i.e. runs code."""
    def __reduce__(self):
        return print, ("the payload ran",)


def test_a_pickled_or_foreign_bundle_is_refused_without_torchs_unsafe_hint(trained, tmp_path, capsys):
    """Issue 28.12: torch's own message advises loading the file unsafely (weights_only off): the
    one thing not to do with a file of unknown origin. The refusal names what the file holds instead."""
    pickled = tmp_path / "pickled.pt"
    torch.save({**torch.load(trained["path"], weights_only=True), "extra": Payload()}, pickled)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    message = score_error(pickled, trained["test"].paths[0], "--out", tmp_path / "out")
    assert (f"refusing model bundle {pickled}: it holds Python objects, not only tensors and plain types "
            "(GLOBAL ") in message and "nothing in it was run" in message
    assert f"cannot read model bundle {garbage}" in score_error(garbage, trained["test"].paths[0], "--out", tmp_path / "o")
    for path in (pickled, garbage):
        with pytest.raises(ValueError) as e:
            cu.load_bundle(path)
        assert "weights_only" not in str(e.value) and e.value.__cause__ is None, str(e.value)
    assert "weights_only" not in message and "payload ran" not in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


# ---- what a bundle knows of its training images ---------------------------------------------

@pytest.fixture(scope="module")
def degenerate(tmp_path_factory) -> Path:
    """A bundle whose training and calibration images are one image repeated: its score
    calibration has no spread (untrained: the calibration is what this is about)."""
    torch.manual_seed(0)
    same = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8).repeat(6, 1, 1, 1)
    grid = cu.PatchGrid(64, 16, 8)
    model = cu.CPCAD(cu.cpcad_config("fast", grid, width=8), grid)
    scoring = cu.prepare_scoring(model, same, same, SC, device="cpu")
    assert scoring["calibration"].check()["status"] == "degenerate"
    maps = cu.detector_maps(cu.score_patches(model, same, scoring["bank"], scoring["references"], 16, "cpu",
                                             grid=scoring["grid"]), scoring["calibration"], "knn_stats")
    path = tmp_path_factory.mktemp("degenerate") / "model.pt"
    cu.save_bundle(path, model, scoring, cu.normal_threshold(cu.image_scores(maps, "top10"), TARGET_FPR),
                   cu.normal_threshold(cu.patches_to_pixels(maps, scoring["grid"]), TARGET_FPR), colour="colour")
    return path


def test_a_degenerate_calibration_is_said_and_fails_the_command(degenerate, trained, tmp_path):
    """All training images alike: training warned, but score called images anomalous at a
    meaningless threshold and said nothing. Loading warns; the command scores, writes its
    outputs, and exits 1 with one line naming the bundle."""
    with pytest.warns(UserWarning, match=rf"model bundle {degenerate}: degenerate calibration.*verdicts mean little"):
        assert "degenerate calibration" in cu.load_bundle(degenerate).calibration_note
    with pytest.warns(UserWarning, match="degenerate calibration"):
        message = score_error(degenerate, trained["test"].paths[0], "--out", tmp_path / "out")
    assert f"model bundle {degenerate}: degenerate calibration" in message and "verdicts mean little" in message
    (row,) = read_csv(tmp_path / "out" / "scores.csv")
    assert row["verdict"] in ("normal", "anomalous") and (tmp_path / "out" / row["heatmap"]).is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cu.load_bundle(trained["path"]).calibration_note is None


def test_colour_mode():
    grey = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8).expand(2, 3, 8, 8)
    colour = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert cpc_ad.bundle.colour_mode(grey) == "grayscale" and cpc_ad.bundle.colour_mode(colour) == "colour"
    assert cpc_ad.bundle.colour_mode(torch.cat([grey, colour])) == "mixed"
    with pytest.raises(ValueError, match=r"uint8 images \(N, 3, H, W\)"):
        cpc_ad.bundle.colour_mode(colour.float())


def test_images_of_the_other_colour_mode_are_said_once(trained, tmp_path, capsys):
    """A grayscale model (the demo brick) flags colour images whatever they show: score says
    how many there are in one line (not once per batch) and in its final line."""
    assert cu.load_bundle(trained["path"]).info["colour"] == "grayscale"
    photos = tmp_path / "photos"
    copy_images(trained, photos, 3)
    for k in (1, 2):  # two of three get a colour tint
        rgb = np.asarray(Image.open(photos / f"{k}.png").convert("RGB")).copy()
        rgb[..., 0] //= 2
        Image.fromarray(rgb).save(photos / f"{k}.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cu.main(["score", str(trained["path"]), str(photos), "--out", str(tmp_path / "out"), "--device", "cpu",
                 "--batch-size", "1"])
    assert not [w for w in caught if "colour" in str(w.message)]
    lines = capsys.readouterr().out.splitlines()
    said = [line for line in lines if "images are colour" in line]
    assert len(said) == 1 and said[0].startswith(f"2 of 3 images are colour while the model {trained['path']} was "
                                                 "trained on grayscale images: their scores are not comparable")
    assert "2 colour images for a model trained on grayscale ones" in lines[-1]
    r = cu.score_files(trained["path"], [photos / "0.png"], tmp_path / "out2", device="cpu", progress=False)
    assert r["other_colour"] == 0 and r["colour"] == "grayscale"


def test_bundle_score_warns_of_the_other_colour_mode_and_old_bundles_know_none(trained, tmp_path):
    b = torch.load(trained["path"], weights_only=True)
    torch.save({**b, "colour": "colour"}, tmp_path / "colour.pt")
    grey = trained["test"].images[:2]
    with pytest.warns(UserWarning, match="2 of 2 images are grayscale while the model .* trained on colour images"):
        result = cu.load_bundle(tmp_path / "colour.pt").score(grey)
    assert result["other_colour"].tolist() == [True, True]
    torch.save({k: v for k, v in b.items() if k != "colour"}, tmp_path / "old.pt")
    old = cu.load_bundle(tmp_path / "old.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert old.info["colour"] is None and not old.score(grey)["other_colour"].any()
    with pytest.raises(cu.ParameterError, match="colour='sepia'"):
        cu.save_bundle(tmp_path / "x.pt", old.model, {"bank": old.bank, "references": {}, "calibration": None,
                                                     "config": old.scoring}, b["threshold"], b["pixel_threshold"],
                       colour="sepia")


# ---- what score reads and what it may replace -------------------------------------------

FIND = ("import json, sys, cpc_utils as cu\n"
        "print(json.dumps([[p.as_posix() for p in cu.find_images([a])] for a in sys.argv[1:]]))")


def test_find_images_follows_each_real_folder_once(tmp_path):
    """photos/sub/up -> .. and photos/sub/loop -> .: Python's recursive glob followed them
    without end (one loop alone gave sub/up/sub/up/.../1.png); pathlib's rglob followed no
    symlinked folder at all. Each real folder is searched once, a linked one included.
    In a subprocess with a timeout, so that a loop fails the test instead of hanging it."""
    photos = tmp_path / "photos"
    for name in ("0.png", "sub/1.png", "sub/.hidden/2.png"):
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        (photos / name).write_bytes(b"")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "3.png").write_bytes(b"")
    (photos / "sub" / "up").symlink_to("..")
    (photos / "sub" / "loop").symlink_to(".")
    (photos / "linked").symlink_to(tmp_path / "elsewhere")
    patterns = ["", "/**/*.png", "/**", "/*/*.png", "/sub/**/.*/*.png"]
    proc = subprocess.run([sys.executable, "-c", FIND, *(f"{photos}{p}" for p in patterns)], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    found = [[Path(f).relative_to(photos).as_posix() for f in files] for files in json.loads(proc.stdout)]
    every = ["0.png", "linked/3.png", "sub/.hidden/2.png", "sub/1.png"]  # a folder: all, hidden ones too
    assert found == [every, ["0.png", "linked/3.png", "sub/1.png"], every, ["linked/3.png", "sub/1.png"],
                     ["sub/.hidden/2.png"]]


@pytest.mark.parametrize("pattern", ["a/*.png", "a/**/*.png", "**/*.png", "a/?.png", "a/[12].*", "a/.*",
                                     "a/**/.h*/*.png", "*/b/*", "a/b/3.jpg", "a/b/../*.png", "none/**/*"])
def test_glob_matches_as_python_glob_where_there_are_no_links(tmp_path, pattern):
    for name in ("a/1.png", "a/2.TIFF", "a/.x.png", "a/b/3.jpg", "a/.hidden/4.png", "a/b/.h/5.png", "c/b/6.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    expected = sorted(glob.glob(f"{tmp_path}/{pattern}", recursive=True))
    assert [str(p) for p in cpc_ad.inference._glob(f"{tmp_path}/{pattern}")] == expected


@pytest.mark.parametrize("link", ["heatmaps", "masks/sub", "masks/sub/0.png", cu.SCORE_MANIFEST])
def test_score_never_writes_or_deletes_through_a_link_in_out(trained, tmp_path, monkeypatch, link):
    """A link inside --out (an output folder, a subfolder mirroring the inputs', a planned
    file, the manifest) leads to files that are not score's: score once followed heatmaps/ to
    the user's folder and deleted or replaced the files there. Refused before scoring, naming
    the link; what it points to and --out stay as they were."""
    photos = tmp_path / "photos"
    copy_images(trained, photos, 1)
    copy_images(trained, photos / "sub")  # names: 0.png, sub/0.png, sub/1.png
    out = tmp_path / "out"
    cu.main(["score", str(trained["path"]), str(photos), "--out", str(out), "--device", "cpu"])
    mine = tmp_path / "mine"  # the user moves an output away, adds a file of theirs, and links it back
    (out / link).rename(mine)
    if mine.is_dir():
        (mine / "notes.txt").write_text("mine")
    (out / link).symlink_to(mine, target_is_directory=mine.is_dir())
    before = files_below(tmp_path)
    monkeypatch.setattr(cu.Bundle, "score", lambda *a, **k: pytest.fail("scored before checking --out"))
    message = score_error(trained["path"], photos, "--out", out)
    assert f"--out {out}: {out / link} is a symbolic link" in message
    assert files_below(tmp_path) == before and (out / link).is_symlink()


def test_a_users_file_where_score_needs_a_folder_is_refused_before_anything_is_deleted(trained, tmp_path):
    """heatmaps/sub is the user's file and score must write heatmaps/sub/1.png: it once
    deleted the earlier outputs and failed only when writing there."""
    photos = tmp_path / "photos"
    copy_images(trained, photos, 1)
    out = tmp_path / "out"
    cu.main(["score", str(trained["path"]), str(photos), "--out", str(out), "--device", "cpu"])
    (out / "heatmaps" / "sub").write_text("the user's notes")
    copy_images(trained, photos / "sub")
    before = files_below(out)
    message = score_error(trained["path"], photos, "--out", out)
    assert f"{out / 'heatmaps' / 'sub'} was not written by score and stands where score needs a folder" in message
    assert files_below(out) == before


@pytest.mark.parametrize("target", ["nowhere", "out"])
def test_an_out_that_is_a_broken_or_looping_link_is_one_line(trained, tmp_path, target):
    (tmp_path / "out").symlink_to(tmp_path / target)
    message = score_error(trained["path"], trained["test"].paths[0], "--out", tmp_path / "out")
    assert f"--out {tmp_path / 'out'} is a broken symbolic link (to {tmp_path / target})" in message


def test_a_link_among_the_inputs_to_out_is_not_read(trained, tmp_path, capsys):
    """Folders are now searched through links: photos/latest -> ../out must not make score's
    own outputs inputs of the next run."""
    photos = tmp_path / "photos"
    copy_images(trained, photos)
    (photos / "latest").symlink_to(tmp_path / "out")
    for _ in range(2):
        cu.main(["score", str(trained["path"]), str(photos), "--out", str(tmp_path / "out"), "--device", "cpu"])
        assert sorted(Path(r["path"]).name for r in read_csv(tmp_path / "out" / "scores.csv")) == ["0.png", "1.png"]
    assert "4 images inside --out" in capsys.readouterr().out
