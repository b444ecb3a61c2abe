"""Data section: finding the MVTec AD root, loading a category, errors that name the file
at fault, the train/validation split, and the embedded demo dataset."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cpc_utils as cu
import cpc_ad.data
import cpc_ad.demo
from conftest import FAKE_DEFECTS, FAKE_SIZE, FAKE_TEST_GOOD, FAKE_TRAIN, fake_defect_box, make_fake_mvtec


# ---- finding the root ----------------------------------------------------------------

@pytest.fixture
def no_env(monkeypatch, tmp_path):
    """No $MVTEC_ROOT and an empty working directory, so ./data/mvtec_ad is absent."""
    monkeypatch.delenv("MVTEC_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_find_root_expands_the_home_folder(fresh_mvtec, no_env, monkeypatch):
    """data_root = "~/mvtec" in a notebook (no shell expands it) and in $MVTEC_ROOT."""
    monkeypatch.setenv("HOME", str(fresh_mvtec.parent))
    assert cu.find_mvtec_root("~/mvtec") == fresh_mvtec
    monkeypatch.setenv("MVTEC_ROOT", "~/mvtec")
    assert cu.find_mvtec_root() == fresh_mvtec


def test_find_root_explicit_argument(fake_mvtec, no_env):
    assert cu.find_mvtec_root(fake_mvtec) == fake_mvtec
    assert cu.find_mvtec_root(str(fake_mvtec)) == fake_mvtec


def test_find_root_explicit_argument_nested_level(tmp_path, no_env):
    root = make_fake_mvtec(tmp_path / "download" / cu.NESTED_DIR, {"widget": "RGB"})
    assert cu.find_mvtec_root(tmp_path / "download") == root


def test_find_root_explicit_argument_never_falls_back(fake_mvtec, tmp_path, monkeypatch):
    """A typo in data_root must fail even when $MVTEC_ROOT points at valid data."""
    monkeypatch.setenv("MVTEC_ROOT", str(fake_mvtec))
    typo = tmp_path / "mvtec_typo"
    with pytest.raises(FileNotFoundError) as e:
        cu.find_mvtec_root(typo)
    assert str(typo) in str(e.value) and str(fake_mvtec) not in str(e.value)


def test_find_root_env_then_local(tmp_path, monkeypatch, no_env):
    local = make_fake_mvtec(no_env / cu.LOCAL_ROOT, {"local_cat": "RGB"})
    assert cu.find_mvtec_root(None).resolve() == local.resolve()  # no env: ./data/mvtec_ad
    env = make_fake_mvtec(tmp_path / "env_root", {"env_cat": "RGB"})
    monkeypatch.setenv("MVTEC_ROOT", str(env))
    assert cu.find_mvtec_root(None) == env                        # env beats ./data


def test_find_root_env_nested_level(tmp_path, monkeypatch, no_env):
    nested = make_fake_mvtec(tmp_path / "env_root" / cu.NESTED_DIR, {"widget": "RGB"})
    monkeypatch.setenv("MVTEC_ROOT", str(tmp_path / "env_root"))
    assert cu.find_mvtec_root(None) == nested


def test_candidate_roots_order(monkeypatch):
    """A configured root (argument, else $MVTEC_ROOT) is the only candidate, with its nested level."""
    monkeypatch.setenv("MVTEC_ROOT", "/some/env")
    assert cu.candidate_roots(None) == [Path("/some/env"), Path("/some/env") / cu.NESTED_DIR]
    assert cu.candidate_roots("/explicit") == [Path("/explicit"), Path("/explicit") / cu.NESTED_DIR]
    monkeypatch.delenv("MVTEC_ROOT")
    roots = cu.candidate_roots(None)
    assert roots[:2] == [Path(cu.KAGGLE_ROOTS[0]), Path(cu.KAGGLE_ROOTS[0]) / cu.NESTED_DIR]
    assert roots[-2:] == [Path(cu.LOCAL_ROOT), Path(cu.LOCAL_ROOT) / cu.NESTED_DIR]
    assert len(roots) == 2 * (len(cu.KAGGLE_ROOTS) + 1)


@pytest.fixture
def no_demo_writing(monkeypatch):
    """make_demo_dataset fails the test if called."""
    def fail(*args, **kw):
        raise AssertionError("the demo data must not be written here")
    monkeypatch.setattr(cpc_ad.demo, "make_demo_dataset", fail)


def test_wrong_mvtec_root_env_is_an_error_not_a_fallback(tmp_path, monkeypatch, no_env, demo_root,
                                                         no_demo_writing, capsys):
    """A typo in $MVTEC_ROOT must fail even when ./data/mvtec_ad and the demo data exist."""
    make_fake_mvtec(no_env / cu.LOCAL_ROOT, {"local_cat": "RGB"})
    typo = tmp_path / "typo"
    monkeypatch.setenv("MVTEC_ROOT", str(typo))
    for call in (lambda: cu.find_mvtec_root(None), lambda: cu.resolve_data_root(None, demo_dir=demo_root),
                 lambda: cu.load_category(None, "local_cat")):
        with pytest.raises(FileNotFoundError) as e:
            call()
        msg = str(e.value)
        assert f"$MVTEC_ROOT={typo}" in msg and "does not exist" in msg and "expected layout" in msg
        assert cu.LOCAL_ROOT not in msg and str(demo_root) not in msg
    assert "demo" not in capsys.readouterr().out


def test_wrong_data_root_is_an_error_not_a_fallback(tmp_path, no_env, demo_root, no_demo_writing):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        cu.resolve_data_root(empty, demo_dir=demo_root)
    msg = str(e.value)
    assert f"data_root={str(empty)!r}" in msg and str(empty / cu.NESTED_DIR) in msg
    assert "does not exist" not in msg and "train/good" in msg


def test_missing_root_names_every_path_and_the_layout(no_env):
    with pytest.raises(FileNotFoundError) as e:
        cu.find_mvtec_root(None)
    msg = str(e.value)
    for path in cu.candidate_roots(None):
        assert str(path) in msg
    assert "does not exist" in msg
    assert "train/good" in msg and "ground_truth/<defect>" in msg


def test_resolve_data_root_uses_existing_demo_data(demo_root, no_env, no_demo_writing, capsys):
    before = {p: p.stat().st_mtime_ns for p in demo_root.rglob("*.png")}
    assert cu.resolve_data_root(None, demo_dir=demo_root) == demo_root
    assert {p: p.stat().st_mtime_ns for p in demo_root.rglob("*.png")} == before  # not rewritten
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and f"using the demo data in {demo_root}" in lines[0]
    assert "writing" not in lines[0] and "data_root" in lines[0] and "MVTEC_ROOT" in lines[0]


def test_resolve_data_root_writes_missing_demo_data(tmp_path, no_env, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cpc_ad.demo, "make_demo_dataset", lambda out, *a, **kw: calls.append(Path(out)))
    assert cu.resolve_data_root("", demo_dir=tmp_path / "demo") == tmp_path / "demo"
    assert calls == [tmp_path / "demo"]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and f"writing and using the demo data in {tmp_path / 'demo'}" in lines[0]


def test_list_categories(fake_mvtec, tmp_path):
    assert cu.list_categories(fake_mvtec) == ["gadget", "widget"]
    assert cu.list_categories(tmp_path / "nowhere") == []


# ---- loading -------------------------------------------------------------------------

def test_load_category_shapes_dtypes_labels(fake_widget):
    train, test = fake_widget["train"], fake_widget["test"]
    n_defect = sum(FAKE_DEFECTS.values())
    assert len(train) == FAKE_TRAIN and len(test) == FAKE_TEST_GOOD + n_defect
    assert train.images.shape == (FAKE_TRAIN, 3, FAKE_SIZE, FAKE_SIZE) and train.images.dtype == torch.uint8
    assert test.masks.shape == (len(test), 1, FAKE_SIZE, FAKE_SIZE) and test.masks.dtype == torch.bool
    assert test.labels.dtype == torch.long
    assert train.labels.tolist() == [0] * FAKE_TRAIN and not train.masks.any()
    # test folders in sorted order: crack, dent, good
    assert test.defect_types == ["crack"] * 2 + ["dent"] + ["good"] * 2
    assert test.labels.tolist() == [1, 1, 1, 0, 0]
    assert [Path(p).parent.name for p in test.paths] == test.defect_types
    assert not test.masks[test.labels == 0].any()


def test_load_category_masks_and_pixels_match_files(fake_widget, fake_mvtec):
    test = fake_widget["test"]
    for k in range(3):  # crack 0, crack 1, dent 0
        i = int(Path(test.paths[k]).stem)
        expected = torch.zeros(FAKE_SIZE, FAKE_SIZE, dtype=torch.bool)
        expected[fake_defect_box(i)] = True
        assert torch.equal(test.masks[k, 0], expected)
    on_disk = np.array(Image.open(test.paths[0]))              # (H, W, 3)
    assert torch.equal(test.images[0], torch.from_numpy(on_disk).permute(2, 0, 1))


def test_load_category_resizes(fake_mvtec):
    data = cu.load_category(fake_mvtec, "widget", image_size=16, num_threads=1)
    assert data["train"].images.shape[-2:] == (16, 16)
    assert data["test"].masks.shape[-2:] == (16, 16)
    # a 6x6 square at rows 4..9, cols 8..13 of 32 px -> nearest at 16 px keeps rows 2..4, cols 4..6
    expected = torch.zeros(16, 16, dtype=torch.bool)
    expected[2:5, 4:7] = True
    assert torch.equal(data["test"].masks[0, 0], expected)


def test_masks_resized_with_nearest(tmp_path):
    """Upsampling by 2 with nearest neighbour repeats every mask pixel as a 2x2 block, and
    downsampling a mask of isolated pixels keeps them binary (bilinear would blur them away)."""
    rng = np.random.default_rng(0)
    bits = rng.random((16, 16)) < 0.5
    Image.fromarray((bits * 255).astype(np.uint8)).save(tmp_path / "m.png")
    up = cu.read_mask(tmp_path / "m.png", 32)
    assert up.shape == (1, 32, 32) and up.dtype == torch.bool
    assert np.array_equal(up[0].numpy(), np.kron(bits, np.ones((2, 2), bool)))

    grid = np.zeros((32, 32), bool)
    grid[1::2, 1::2] = True  # a quarter of the pixels, never two side by side
    Image.fromarray((grid * 255).astype(np.uint8)).save(tmp_path / "g.png")
    down = cu.read_mask(tmp_path / "g.png", 16)
    assert down.all()  # nearest samples the odd pixels; a 25 % bilinear average would be False


@pytest.mark.parametrize("on", [1, 255])
def test_mask_non_zero_is_defect(fresh_mvtec, on):
    """Masks written as 0/1 (not MVTec's 0/255) load as the same defect region."""
    mask = fresh_mvtec / "widget" / "ground_truth" / "crack" / "000_mask.png"
    Image.fromarray((np.asarray(Image.open(mask)) > 0).astype(np.uint8) * on).save(mask)
    test = cu.load_category(fresh_mvtec, "widget", image_size=FAKE_SIZE, num_threads=1)["test"]
    expected = torch.zeros(FAKE_SIZE, FAKE_SIZE, dtype=torch.bool)
    expected[fake_defect_box(0)] = True
    assert test.paths[0].endswith("000.png") and torch.equal(test.masks[0, 0], expected)


def test_mask_16bit_and_colour_non_zero_is_defect(tmp_path):
    bits = np.zeros((8, 8), bool)
    bits[2:5, 3:6] = True
    Image.fromarray(bits.astype(np.uint16) * 1).save(tmp_path / "m16.png")   # 16 bit, 0/1
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[bits, 2] = 1                                                          # barely blue
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    for name in ("m16.png", "rgb.png"):
        assert np.array_equal(cu.read_mask(tmp_path / name, 8)[0].numpy(), bits), name


def _palette(bits: np.ndarray, colours: list[tuple], transparent: int | None = None) -> Image.Image:
    im = Image.fromarray(bits.astype(np.uint8), "P")  # index 1 = defect, index 0 = background
    im.putpalette([c for colour in colours for c in colour])
    if transparent is not None:
        im.info["transparency"] = transparent
    return im


MASK_ENCODINGS = {  # name -> the mask of `bits` as a tool may write it
    "alpha only, RGB white": lambda b: Image.fromarray(np.dstack([np.full(b.shape + (3,), 255, np.uint8),
                                                                   b.astype(np.uint8) * 255]), "RGBA"),
    "alpha, dark defect": lambda b: Image.fromarray(np.dstack([np.zeros(b.shape + (3,), np.uint8),
                                                                 b.astype(np.uint8) * 200]), "RGBA"),
    "grey + alpha": lambda b: Image.fromarray(np.dstack([np.full(b.shape, 255, np.uint8), b.astype(np.uint8) * 255]),
                                              "LA"),
    "palette, index 0 white, defect red": lambda b: _palette(b, [(255, 255, 255), (255, 0, 0)]),
    "palette, index 0 white, defect black": lambda b: _palette(b, [(255, 255, 255), (0, 0, 0)]),
    "palette, both white": lambda b: _palette(b, [(255, 255, 255), (255, 255, 255)]),
    "palette, index 0 black": lambda b: _palette(b, [(0, 0, 0), (255, 255, 255)]),
    "palette, index 0 transparent": lambda b: _palette(b, [(255, 255, 255), (255, 255, 255)], transparent=0),
    "RGB on black": lambda b: Image.fromarray(np.where(b[..., None], [200, 30, 30], 0).astype(np.uint8)),
}


@pytest.mark.parametrize("encoding", MASK_ENCODINGS)
def test_masks_are_read_by_what_they_encode(tmp_path, encoding):
    """Issue 28.5: an RGBA mask whose defect is only in its alpha (RGB white everywhere), a
    palette mask whose index 0 is white, ...: the defect region, not every pixel."""
    bits = np.zeros((16, 16), bool)
    bits[4:9, 5:11] = True
    MASK_ENCODINGS[encoding](bits).save(tmp_path / "m.png")
    assert np.array_equal(cu.read_mask(tmp_path / "m.png", 16)[0].numpy(), bits)


def test_a_colour_mask_on_a_white_background_reads_its_most_common_colour_as_background(tmp_path):
    bits = np.zeros((16, 16), bool)
    bits[2:6, 2:6] = True
    Image.fromarray(np.where(bits[..., None], [255, 0, 0], 255).astype(np.uint8)).save(tmp_path / "m.png")
    with pytest.warns(UserWarning, match=r"no black or transparent pixel: its most common colour \(255, 255, 255\)"):
        assert np.array_equal(cu.read_mask(tmp_path / "m.png", 16)[0].numpy(), bits)


def test_a_jpeg_mask_is_read_at_half_intensity(tmp_path):
    """Second pass of issue 28: compression leaves faint non-zero values around a JPEG mask's
    defect; read as non-zero they would grow the defect region."""
    bits = np.zeros((64, 64), bool)
    bits[10:30, 20:40] = True
    Image.fromarray((bits * 255).astype(np.uint8)).save(tmp_path / "m.jpg", quality=75)
    Image.fromarray(np.dstack([bits * 255, bits * 30, bits * 30]).astype(np.uint8)).save(tmp_path / "c.jpg", quality=75)
    assert (np.asarray(Image.open(tmp_path / "m.jpg"))[~bits] > 0).any()  # the faint values are there
    for name in ("m.jpg", "c.jpg"):
        assert np.array_equal(cu.read_mask(tmp_path / name, 64)[0].numpy(), bits), name


def test_a_mask_marking_nearly_the_whole_image_is_warned(fresh_mvtec):
    """Issue 28.5: an inverted mask (white background, the defect black) is read as it is, with a warning."""
    mask = fresh_mvtec / "widget" / "ground_truth" / "crack" / "000_mask.png"
    Image.fromarray(255 - np.asarray(Image.open(mask))).save(mask)
    with pytest.warns(UserWarning, match=r"1 defect masks mark more than 90% of their image as defect \(first: "
                                         + re.escape(str(mask)) + r", 96%\): is the mask inverted"):
        cu.load_category(fresh_mvtec, "widget", image_size=FAKE_SIZE, num_threads=1)


def test_a_category_without_ground_truth_has_image_labels_only(fresh_mvtec):
    """Issue 28.14: no ground_truth/ folder: loaded, its test set says it has no pixel labels, and
    evaluation gives image metrics with pixel AUROC and AUPRO None; subsets keep the flag."""
    import shutil
    shutil.rmtree(fresh_mvtec / "widget" / "ground_truth")
    test = cu.load_category(fresh_mvtec, "widget", image_size=FAKE_SIZE, num_threads=1)["test"]
    assert not test.pixel_labels and not test.masks.any() and sorted(test.labels.tolist()) == [0, 0, 1, 1, 1]
    assert not test.subset([0, 2]).pixel_labels and not cu.concat_sets([test, test]).pixel_labels
    grid = cu.PatchGrid(FAKE_SIZE, 8, 8)
    maps = torch.rand(len(test), 1, grid.grid, grid.grid, generator=torch.Generator().manual_seed(0))
    metrics = cu.evaluate_maps(maps, test, grid, ("max",))["metrics"]
    assert metrics["pixel_auroc"] is None and metrics["aupro"] is None and 0 <= metrics["image_auroc"] <= 1


def test_extensions_any_case(fresh_mvtec):
    """000_mask.PNG / .Png is the mask of 000.png, and 000.JPG finds 000_mask.png."""
    gt, test_dir = fresh_mvtec / "widget" / "ground_truth", fresh_mvtec / "widget" / "test"
    (gt / "crack" / "000_mask.png").rename(gt / "crack" / "000_mask.PNG")
    (gt / "crack" / "001_mask.png").rename(gt / "crack" / "001_mask.Png")
    Image.open(test_dir / "dent" / "000.png").save(test_dir / "dent" / "000.JPG", quality=100)
    (test_dir / "dent" / "000.png").unlink()
    test = cu.load_category(fresh_mvtec, "widget", image_size=FAKE_SIZE, num_threads=1)["test"]
    assert [Path(p).name for p in test.paths[:3]] == ["000.png", "001.png", "000.JPG"]
    for k, i in enumerate([0, 1, 0]):
        expected = torch.zeros(FAKE_SIZE, FAKE_SIZE, dtype=torch.bool)
        expected[fake_defect_box(i)] = True
        assert torch.equal(test.masks[k, 0], expected)


def test_grayscale_becomes_three_equal_channels(fake_mvtec):
    data = cu.load_category(fake_mvtec, "gadget", image_size=FAKE_SIZE, num_threads=1)
    imgs = data["train"].images
    assert imgs.shape[1] == 3
    assert torch.equal(imgs[:, 0], imgs[:, 1]) and torch.equal(imgs[:, 1], imgs[:, 2])
    gray = np.array(Image.open(data["train"].paths[0]))
    assert torch.equal(imgs[0, 0], torch.from_numpy(gray))


def test_rgb_channels_differ(fake_widget):
    imgs = fake_widget["train"].images
    assert not torch.equal(imgs[:, 0], imgs[:, 1])


def test_rgba_image_drops_alpha(tmp_path):
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    x = cu.read_image(tmp_path / "a.png", 8)
    assert x.shape == (3, 8, 8) and x.dtype == torch.uint8
    assert torch.equal(x, torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1))


def test_rgba_image_in_a_category(fresh_mvtec):
    path = fresh_mvtec / "widget" / "train" / "good" / "000.png"
    rgba = np.dstack([np.asarray(Image.open(path)), np.full((FAKE_SIZE, FAKE_SIZE), 7, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(path)
    data = cu.load_category(fresh_mvtec, "widget", image_size=FAKE_SIZE, num_threads=1)
    assert data["train"].images.shape == (FAKE_TRAIN, 3, FAKE_SIZE, FAKE_SIZE)
    assert torch.equal(data["train"].images[0], torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1))


def test_16bit_grayscale_scaled_to_8bit(tmp_path):
    """A 16-bit PNG opens as "I;16" (or "I"); PIL's convert("RGB") would clip it all to 255."""
    gradient = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040)     # 0 .. 65520
    gradient[-1, -1] = 65535
    Image.fromarray(gradient).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode in ("I;16", "I")
    x = cu.read_image(tmp_path / "g16.png", 8)
    expected = torch.from_numpy(np.rint(gradient / 257).astype(np.uint8))
    assert x.shape == (3, 8, 8) and torch.equal(x[0], expected) and torch.equal(x[1], x[2])
    assert x[0, 0, 0] == 0 and x[0, -1, -1] == 255 and (x < 255).float().mean() > 0.9


@pytest.mark.parametrize("mode, high, scale", [("I", 65520, 1 / 257), ("I", 255, 1), ("F", 1, 255), ("F", 255, 1)])
def test_32bit_int_and_float_grayscale(tmp_path, mode, high, scale):
    """A 32-bit integer image is read as 16 bit, or as 8 bit when its values all fit 0..255 (not
    divided by 257 into black); float in [0, 1] is scaled by 255, in [0, 255] read as it is."""
    a = np.linspace(0, high, 64).reshape(8, 8).astype(np.int32 if mode == "I" else np.float32)
    Image.fromarray(a, mode).save(tmp_path / "x.tif")
    with Image.open(tmp_path / "x.tif") as im:
        assert im.mode == mode
    x = cu.read_image(tmp_path / "x.tif", 8)
    expected = np.rint(a.astype(np.float64) * scale).astype(np.uint8)
    assert torch.equal(x[0], torch.from_numpy(expected)) and torch.equal(x[1], x[2]) and x.max() == 255


@pytest.mark.parametrize("mode, low, high", [("F", -1, 1), ("F", -20, 300), ("F", 0, 65535), ("I", -5, 200),
                                             ("I", 0, 70000)])
def test_grayscale_of_no_known_scale_is_an_error_naming_the_file(tmp_path, mode, low, high):
    """Float in [-1, 1] or 0..65535, integers below 0 or above 16 bit: no scale is safe to guess
    (clipping made [-1, 1] almost black and 16-bit floats white, silently)."""
    a = np.linspace(low, high, 64).reshape(8, 8).astype(np.int32 if mode == "I" else np.float32)
    Image.fromarray(a, mode).save(tmp_path / "x.tif")
    with pytest.raises(ValueError, match=rf"cannot read image .*x\.tif: .*pixel values span {low}\.*0*\.\.{high}"):
        cu.read_image(tmp_path / "x.tif", 8)


def test_exif_orientation_is_applied_to_images_and_masks(tmp_path):
    """A phone's portrait photo: stored 80 wide x 48 high, tagged "rotate 90 degrees clockwise to
    show" (orientation 6). Read upright, 48 x 80: the stored left half (white) is on top."""
    stored = np.zeros((48, 80), np.uint8)
    stored[:, :40] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).convert("RGB").save(tmp_path / "photo.jpg", exif=exif, quality=95)
    Image.fromarray(stored).save(tmp_path / "photo_mask.png", exif=exif)
    x = cu.read_image(tmp_path / "photo.jpg", 16).float()
    assert x[:, :8].mean() > 200 and x[:, 8:].mean() < 50  # top white, bottom black
    assert cpc_ad.data._read_image_sized(tmp_path / "photo.jpg", 16)[1] == (48, 80)
    m = cu.read_mask(tmp_path / "photo_mask.png", 16, (tmp_path / "photo.jpg", (48, 80)))  # sizes agree upright
    assert m[0, :8].all() and not m[0, 8:].any()


# ---- errors that name what is wrong --------------------------------------------------

def test_unknown_category_lists_available(fake_mvtec):
    with pytest.raises(FileNotFoundError) as e:
        cu.load_category(fake_mvtec, "bottle", image_size=FAKE_SIZE)
    msg = str(e.value)
    assert "'bottle'" in msg and str(fake_mvtec) in msg and "gadget, widget" in msg


@pytest.mark.parametrize("where", ["train/good/003.png", "test/dent/000.png"])
def test_corrupt_image_names_the_file(fresh_mvtec, where):
    bad = fresh_mvtec / "widget" / where
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ValueError) as e:
        cu.load_category(fresh_mvtec, "widget", image_size=FAKE_SIZE, num_threads=1)
    assert str(bad) in str(e.value)


def test_corrupt_mask_names_the_file(fresh_mvtec):
    bad = fresh_mvtec / "widget" / "ground_truth" / "crack" / "001_mask.png"
    bad.write_bytes(b"\x89PNG truncated")
    with pytest.raises(ValueError) as e:
        cu.load_category(fresh_mvtec, "widget", image_size=FAKE_SIZE, num_threads=1)
    assert str(bad) in str(e.value)


def test_mask_size_differs_from_image(fresh_mvtec):
    mask = fresh_mvtec / "widget" / "ground_truth" / "dent" / "000_mask.png"
    Image.fromarray(np.zeros((FAKE_SIZE, FAKE_SIZE + 8), np.uint8)).save(mask)   # 40 wide, 32 high
    with pytest.raises(ValueError) as e:
        cu.load_category(fresh_mvtec, "widget", image_size=16, num_threads=1)
    msg = str(e.value)
    assert str(mask) in msg and str(fresh_mvtec / "widget" / "test" / "dent" / "000.png") in msg
    assert f"{FAKE_SIZE + 8}x{FAKE_SIZE}" in msg and f"{FAKE_SIZE}x{FAKE_SIZE}" in msg


def test_defect_image_without_mask_names_the_image(fresh_mvtec):
    (fresh_mvtec / "widget" / "ground_truth" / "dent" / "000_mask.png").unlink()
    with pytest.raises(FileNotFoundError) as e:
        cu.load_category(fresh_mvtec, "widget", image_size=FAKE_SIZE, num_threads=1)
    msg = str(e.value)
    assert str(fresh_mvtec / "widget" / "test" / "dent" / "000.png") in msg
    assert "000_mask.png" in msg


def test_empty_train_good_names_the_folder(fresh_mvtec):
    folder = fresh_mvtec / "widget" / "train" / "good"
    for f in folder.iterdir():
        f.unlink()
    with pytest.raises(FileNotFoundError) as e:
        cu.load_category(fresh_mvtec, "widget", image_size=FAKE_SIZE, num_threads=1)
    assert str(folder) in str(e.value)


def test_missing_test_folder_names_it(fresh_mvtec):
    import shutil
    shutil.rmtree(fresh_mvtec / "widget" / "test")
    with pytest.raises(FileNotFoundError) as e:
        cu.load_category(fresh_mvtec, "widget", image_size=FAKE_SIZE, num_threads=1)
    assert str(fresh_mvtec / "widget" / "test") in str(e.value)


@pytest.mark.parametrize("remove", ["good", "defects"])
def test_test_split_needs_normal_and_defect_images(fresh_mvtec, remove):
    import shutil
    test_dir = fresh_mvtec / "widget" / "test"
    for d in [test_dir / "good"] if remove == "good" else [test_dir / k for k in FAKE_DEFECTS]:
        shutil.rmtree(d)
    with pytest.raises(ValueError) as e:
        cu.load_category(fresh_mvtec, "widget", image_size=FAKE_SIZE, num_threads=1)
    n_normal, n_defect = (0, sum(FAKE_DEFECTS.values())) if remove == "good" else (FAKE_TEST_GOOD, 0)
    msg = str(e.value)
    assert str(test_dir) in msg and "AUROC needs both" in msg
    assert f"{n_normal} normal (test/good) and {n_defect} defect images" in msg


def test_non_image_files_are_ignored(fresh_mvtec):
    (fresh_mvtec / "widget" / "train" / "good" / "notes.txt").write_text("not an image")
    (fresh_mvtec / "widget" / "train" / "good" / ".DS_Store").write_bytes(b"\0")
    with pytest.warns(UserWarning, match=r"ignoring 1 files that are not images .*notes\.txt"):  # said, not silent
        data = cu.load_category(fresh_mvtec, "widget", image_size=FAKE_SIZE, num_threads=1)
    assert len(data["train"]) == FAKE_TRAIN


def test_macos_metadata_ignored_with_one_warning(fresh_mvtec):
    """._* AppleDouble files and __MACOSX folders (as a macOS zip leaves them) are not data."""
    cat = fresh_mvtec / "widget"
    for folder in ("train/good", "test/crack", "ground_truth/crack"):
        (cat / folder / "._000.png").write_bytes(b"\0\5\26\7 AppleDouble, not a png")
    macosx = cat / "test" / "__MACOSX"
    macosx.mkdir()
    Image.open(cat / "test" / "good" / "000.png").save(macosx / "000.png")
    (cat / "ground_truth" / "__MACOSX").mkdir()
    with pytest.warns(UserWarning) as record:
        data = cu.load_category(fresh_mvtec, "widget", image_size=FAKE_SIZE, num_threads=1)
    assert len(record) == 1
    assert "5 macOS metadata" in str(record[0].message) and str(cat) in str(record[0].message)
    assert len(data["train"]) == FAKE_TRAIN
    assert len(data["test"]) == FAKE_TEST_GOOD + sum(FAKE_DEFECTS.values())
    assert set(data["test"].defect_types) == {"good", *FAKE_DEFECTS}


def test_a_test_good_folder_in_other_case_is_named(fresh_mvtec):
    """test/Good would be a defect type "Good" (with masks it would silently count as defects)."""
    test = fresh_mvtec / "widget" / "test"
    (test / "good").rename(test / "Good")
    with pytest.raises(ValueError, match=r"test/Good: the normal test images' folder must be named test/good"):
        cu.load_category(fresh_mvtec, "widget", image_size=FAKE_SIZE, num_threads=1)


def test_images_in_subfolders_are_named_in_a_warning(fresh_mvtec):
    """train/good/batch2/*.png is not read (the layout is train/good/*.png): said, not silent."""
    cat = fresh_mvtec / "widget"
    for folder in ("train/good/batch2", "test/crack/more"):
        (cat / folder).mkdir()
        Image.open(cat / "train" / "good" / "000.png").save(cat / folder / "100.png")
    with pytest.warns(UserWarning, match=r"ignoring 2 images in subfolders \(first: .*test/crack/more/100\.png\)"):
        data = cu.load_category(fresh_mvtec, "widget", image_size=FAKE_SIZE, num_threads=1)
    assert len(data["train"]) == FAKE_TRAIN


def test_files_of_other_types_are_named_in_a_warning(fresh_mvtec):
    """train/good/007.webp is not read: said; Thumbs.db and dotfiles are not data, not mentioned."""
    good = fresh_mvtec / "widget" / "train" / "good"
    Image.open(good / "000.png").save(good / "007.webp")
    (good / "Thumbs.db").write_bytes(b"x")
    (good / ".DS_Store").write_bytes(b"x")
    with pytest.warns(UserWarning) as record:
        data = cu.load_category(fresh_mvtec, "widget", image_size=FAKE_SIZE, num_threads=1)
    assert len(record) == 1 and "ignoring 1 files that are not images" in str(record[0].message)
    assert f"(first: {good / '007.webp'})" in str(record[0].message) and len(data["train"]) == FAKE_TRAIN


def test_a_defect_image_with_no_defect_pixel_is_named_in_a_warning(fresh_mvtec):
    """An empty mask (or a defect lost in resizing) leaves an anomalous image with no defect
    pixel: it is still loaded as a defect image, with a warning naming the mask."""
    mask = fresh_mvtec / "widget" / "ground_truth" / "dent" / "000_mask.png"
    Image.fromarray(np.zeros((FAKE_SIZE, FAKE_SIZE), np.uint8)).save(mask)
    with pytest.warns(UserWarning, match=rf"1 defect images have no defect pixel at {FAKE_SIZE}x{FAKE_SIZE} px "
                                         rf"\(first: {mask}\)"):
        data = cu.load_category(fresh_mvtec, "widget", image_size=FAKE_SIZE, num_threads=1)
    assert data["test"].labels.sum() == sum(FAKE_DEFECTS.values())


# ---- train / validation split --------------------------------------------------------

def test_split_train_val_seeded_disjoint_complete(fake_widget):
    train = fake_widget["train"]
    tr, va = cu.split_train_val(train, val_fraction=0.34, seed=3)
    assert len(va) == 2 and len(tr) == FAKE_TRAIN - 2
    assert set(tr.paths).isdisjoint(va.paths) and set(tr.paths) | set(va.paths) == set(train.paths)
    tr2, va2 = cu.split_train_val(train, val_fraction=0.34, seed=3)
    assert va2.paths == va.paths and torch.equal(va2.images, va.images)
    others = {tuple(cu.split_train_val(train, 0.34, seed=s)[1].paths) for s in range(6)}
    assert len(others) > 1  # the seed matters
    for p, img in zip(va.paths, va.images):  # images travel with their paths
        assert torch.equal(img, train.images[train.paths.index(p)])


def test_split_train_val_never_touches_test(fake_widget):
    test = fake_widget["test"]
    before = test.images.clone()
    tr, va = cu.split_train_val(fake_widget["train"], 0.5, seed=0)
    assert all("/train/good/" in p.replace(os.sep, "/") for p in tr.paths + va.paths)
    assert not set(va.paths) & set(test.paths)
    assert torch.equal(test.images, before)


def test_split_train_val_edge_cases(fake_widget):
    train = fake_widget["train"]
    tr, va = cu.split_train_val(train, 0.0)
    assert va is None and tr is train
    with pytest.raises(ValueError, match="leaves no training images"):
        cu.split_train_val(train, 1.0)


def test_image_set_subset(fake_widget):
    test = fake_widget["test"]
    sub = test.subset([4, 0])
    assert sub.paths == [test.paths[4], test.paths[0]]
    assert sub.defect_types == ["good", "crack"] and sub.labels.tolist() == [0, 1]
    assert torch.equal(sub.masks[1], test.masks[0])


# ---- synthetic anomalies (the validation set) -----------------------------------------

def _photo_images(n: int, size: int, grey: bool) -> torch.Tensor:
    """(n, 3, size, size) uint8 crops of a real photograph (colour, or three equal channels)."""
    import skimage.data
    im = skimage.data.astronaut()[::2, ::2]                       # (256, 256, 3)
    if grey:
        im = np.repeat(im.mean(-1, keepdims=True).astype(np.uint8), 3, axis=2)
    crops = [im[20 * i:20 * i + size, 30 * i:30 * i + size] for i in range(n)]
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("grey", [False, True])
def test_synthetic_anomalies_masks_are_the_changed_pixels(grey):
    images = _photo_images(3, 64, grey)
    syn = cu.synthetic_anomalies(images, seed=0)
    K = len(cu.SYNTHETIC_KINDS)
    assert syn.images.shape == (3 * K, 3, 64, 64) and syn.images.dtype == torch.uint8
    assert syn.masks.shape == (3 * K, 1, 64, 64) and syn.masks.dtype == torch.bool
    assert syn.labels.tolist() == [1] * (3 * K)
    assert syn.defect_types == [k for k in cu.SYNTHETIC_KINDS for _ in range(3)]
    assert syn.paths[:2] == [f"{cu.SYNTHETIC_KINDS[0]}/0", f"{cu.SYNTHETIC_KINDS[0]}/1"]
    source = images.repeat(K, 1, 1, 1)                            # the clean image of every anomaly
    changed = (syn.images != source).any(1, keepdim=True)
    assert torch.equal(changed, syn.masks)                        # outside unchanged, inside changed
    assert syn.masks.flatten(1).any(1).all()
    assert syn.masks.float().mean() < 0.15                        # a region, not the image
    same = torch.equal(syn.images[:, 0], syn.images[:, 1]) and torch.equal(syn.images[:, 1], syn.images[:, 2])
    assert same == grey                                           # grayscale stays grayscale


def test_synthetic_anomalies_deterministic_and_seeded():
    images = _photo_images(2, 48, grey=False)
    a = cu.synthetic_anomalies(images, seed=1)
    b = cu.synthetic_anomalies(images, seed=1)
    c = cu.synthetic_anomalies(images, seed=2)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.masks, c.masks)
    # a subset of kinds draws the same anomalies as the full set: draws depend on (seed, kind, image)
    one = cu.synthetic_anomalies(images, seed=1, kinds=["thin_line"])
    k = cu.SYNTHETIC_KINDS.index("thin_line")
    assert torch.equal(one.images, a.images[2 * k:2 * k + 2])


def test_synthetic_anomalies_rejects_bad_input():
    images = _photo_images(1, 32, grey=False)
    with pytest.raises(ValueError, match="unknown synthetic anomaly kinds"):
        cu.synthetic_anomalies(images, kinds=["scratch"])
    with pytest.raises(ValueError, match="uint8"):
        cu.synthetic_anomalies(images.float())
    with pytest.raises(ValueError, match="changed no pixel visibly"):
        cu.synthetic_anomalies(torch.full((1, 3, 32, 32), 128, dtype=torch.uint8), kinds=["shifted_block"])


def _weave(n: int, size: int = 64) -> torch.Tensor:
    """(n, 3, size, size) uint8: 1-px stripes of two colours 4 levels apart, a weave so fine that
    a flat fill of its mean colour changes no pixel by more than 2 levels (invisible)."""
    x = np.empty((n, size, size, 3), np.uint8)
    x[:] = (120, 96, 70)
    x[:, :, 1::2] = (124, 100, 73)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def test_a_kind_that_cannot_show_on_an_image_is_replaced_by_another_and_recorded():
    images = _weave(4)
    with pytest.raises(ValueError, match="flat_fill on image 0: 50 random draws changed no pixel visibly"):
        cu.synthetic_anomalies(images, seed=0, kinds=["flat_fill"])  # no other kind asked for
    syn = cu.synthetic_anomalies(images, seed=0, kinds=cu.LEGACY_KINDS)  # the other new kinds cannot show either
    K, n = len(cu.LEGACY_KINDS), len(images)
    assert len(syn) == K * n and syn.labels.tolist() == [1] * (K * n)
    flat = cu.LEGACY_KINDS.index("flat_fill")
    replaced = syn.defect_types[flat * n:(flat + 1) * n]           # the kinds actually drawn
    assert all(k in cu.LEGACY_KINDS and k != "flat_fill" for k in replaced)
    assert syn.substituted == {f"flat_fill/{i} drawn as {k}": "flat_fill" for i, k in enumerate(replaced)}
    assert syn.paths[flat * n:(flat + 1) * n] == list(syn.substituted)
    # every anomaly visibly changed its image, exactly inside its (non-empty) mask
    source = images.repeat(K, 1, 1, 1)
    diff = (syn.images.short() - source.short()).abs().amax(1, keepdim=True)  # (M, 1, H, W)
    assert torch.equal(diff > 0, syn.masks) and syn.masks.flatten(1).any(1).all()
    assert all(d[m].float().mean() >= 3 for d, m in zip(diff, syn.masks))
    # seeded, and the slots that needed no replacement are drawn as before
    again = cu.synthetic_anomalies(images, seed=0, kinds=cu.LEGACY_KINDS)
    assert torch.equal(again.images, syn.images) and again.defect_types == syn.defect_types
    others = [k for k in cu.LEGACY_KINDS if k != "flat_fill"]
    alone = cu.synthetic_anomalies(images, seed=0, kinds=others)
    keep = [i for i, p in enumerate(syn.paths) if p not in syn.substituted]
    assert torch.equal(alone.images, syn.images[keep]) and alone.substituted == {}


def test_make_validation_set_records_the_replaced_defects():
    val = cu.ImageSet(_weave(3), torch.zeros(3, 1, 64, 64, dtype=torch.bool), torch.zeros(3, dtype=torch.long),
                      ["good"] * 3, [f"train/good/{i:03d}.png" for i in range(3)])
    vs = cu.make_validation_set(val, seed=1)
    # the weave averages to its mean colour, and so do its blur and its border's median: a flat
    # fill, a smoothed region and a missing part (filled with that median) change nothing visibly
    assert len(vs.substituted) == 9
    assert set(vs.substituted.values()) == {"flat_fill", "smoothed_region", "missing_part"}
    for path, kind in vs.substituted.items():
        i = vs.paths.index(path)
        assert path.startswith("train/good/") and f"#{kind} drawn as " in path
        assert vs.defect_types[i] == path.rsplit(" ", 1)[1] and vs.labels[i] == 1 and vs.masks[i].any()
    first = vs.paths.index(next(iter(vs.substituted)))
    assert vs.subset([0, first]).substituted == {vs.paths[first]: "flat_fill"}  # subset keeps its own
    assert vs.subset([0, 1]).substituted == {}


def test_make_validation_set(fake_widget):
    _, val = cu.split_train_val(fake_widget["train"], val_fraction=0.34, seed=0)
    vs = cu.make_validation_set(val, seed=0, kinds=("flat_fill", "foreign_patch"))
    n = len(val)
    assert len(vs) == 3 * n and vs.labels.tolist() == [0] * n + [1] * 2 * n
    assert vs.defect_types == ["good"] * n + ["flat_fill"] * n + ["foreign_patch"] * n
    assert vs.paths[:n] == val.paths and vs.paths[n] == f"{val.paths[0]}#flat_fill"
    assert not vs.masks[:n].any() and vs.masks[n:].flatten(1).any(1).all()
    assert torch.equal(vs.images[:n], val.images)
    with pytest.raises(ValueError, match="normal images only"):
        cu.make_validation_set(fake_widget["test"])


NEW_KINDS = ("rotated_block", "smoothed_region", "missing_part", "extra_part")


def test_synthetic_legacy_kinds_draw_as_before_with_the_new_kinds_after_them():
    assert cu.SYNTHETIC_KINDS == cu.LEGACY_KINDS + NEW_KINDS  # a kind's draws are seeded by its index
    images = _photo_images(3, 48, grey=False)
    legacy = cu.synthetic_anomalies(images, seed=3, kinds=cu.LEGACY_KINDS)
    full = cu.synthetic_anomalies(images, seed=3)
    assert torch.equal(legacy.images, full.images[:len(legacy)]) and torch.equal(legacy.masks, full.masks[:len(legacy)])
    assert legacy.defect_types == full.defect_types[:len(legacy)]


@pytest.mark.parametrize("grey", [False, True])
def test_synthetic_new_kinds_masks_are_the_changed_pixels_and_stay_regions(grey):
    images = _photo_images(4, 64, grey)
    syn = cu.synthetic_anomalies(images, seed=5, kinds=NEW_KINDS)
    assert syn.defect_types == [k for k in NEW_KINDS for _ in range(4)] and syn.substituted == {}
    diff = (syn.images.short() - images.repeat(len(NEW_KINDS), 1, 1, 1).short()).abs().amax(1, keepdim=True)
    assert torch.equal(diff > 0, syn.masks)                       # (M, 1, H, W): exactly the changed pixels
    fraction = syn.masks.flatten(1).float().mean(1)               # (M,)
    assert (fraction > 0).all() and (fraction < 0.15).all()       # each one a region, not the image
    same = torch.equal(syn.images[:, 0], syn.images[:, 1]) and torch.equal(syn.images[:, 1], syn.images[:, 2])
    assert same == grey                                           # grayscale stays grayscale


def _texture(size: int = 96, seed: int = 0) -> np.ndarray:
    """(size, size, 3) float32: seeded noise, a texture with no two places alike."""
    return np.random.default_rng(seed).uniform(0.2, 0.8, (size, size, 3)).astype(np.float32)


def test_synthetic_new_kinds_do_what_they_say():
    from cpc_ad.synthetic import _edit, _rotated
    img = _texture()
    # a quarter turn about the region's centre moves whole pixels: the square shows np.rot90 of itself
    square = np.zeros(img.shape[:2], bool)
    square[40:51, 30:41] = True
    turned = _rotated(img, square, np.pi / 2).reshape(11, 11, 3)
    assert np.allclose(turned, np.rot90(img[40:51, 30:41], k=-1), atol=1e-6)
    for seed in range(4):
        rng = np.random.default_rng(seed)
        # smoothed_region: the region keeps its mean colour and loses its fine detail
        out = _edit("smoothed_region", img, rng, subtle=False)
        m = (out != img).any(-1)
        assert abs(out[m].mean() - img[m].mean()) < 0.03 and out[m].std() < 0.5 * img[m].std()
        # missing_part: an object on a plain background loses a piece to the background colour
        obj = np.full_like(img, 0.1)
        obj[16:80, 16:80] = img[16:80, 16:80]
        out = _edit("missing_part", obj, rng, subtle=False)
        m = (out != obj).any(-1)
        assert m.any() and (np.abs(out[m] - 0.1) < 1e-3).all(-1).any()  # its core is the background
        assert (np.abs(out - 0.1) <= np.abs(obj - 0.1) + 1e-6).all()   # and every change is towards it
        # extra_part: the core of the region is an unflipped copy of the image 10-30% of its size away
        out = _edit("extra_part", img, rng, subtle=False)
        m = (np.abs(out - img) > 0.02).any(-1)                    # (H, W): without the faintest edge
        copies = [(dy, dx) for dy in range(-32, 33) for dx in range(-32, 33) if (dy, dx) != (0, 0)
                  if (np.abs(out[m] - np.roll(img, (dy, dx), axis=(0, 1))[m]) < 0.01).all(-1).mean() > 0.3]
        assert len(copies) == 1 and 0.08 * 96 <= np.hypot(*copies[0]) <= 0.32 * 96


def _photo_files(folder: Path, n: int, size: int, load: int) -> cu.ImageSet:
    """n crops of a photograph written as size px PNG files (the second one grayscale), loaded at
    `load` px as load_category loads them: an all-normal ImageSet whose paths are the files."""
    import skimage.data
    im = skimage.data.astronaut()                                 # (512, 512, 3)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        x = np.asarray(Image.fromarray(im[40 * i:40 * i + 256, 50 * i:50 * i + 256]).resize((size, size)))
        paths.append(str(folder / f"{i:03d}.png"))
        Image.fromarray(x.mean(-1).astype(np.uint8) if i == 1 else x).save(paths[-1])
    images = torch.stack([cu.read_image(p, load) for p in paths])
    return cu.ImageSet(images, torch.zeros(n, 1, load, load, dtype=torch.bool), torch.zeros(n, dtype=torch.long),
                       ["good"] * n, paths)


def _check_anomalies(vs: cu.ImageSet, val: cu.ImageSet) -> None:
    """The anomalies of a validation set: masks exactly the pixels changed from their normal
    image, never empty, each a region (not the image), visible (3 grey levels on average), a
    grayscale source kept grayscale."""
    n = len(val)
    assert torch.equal(vs.images[:n], val.images) and vs.labels.tolist() == [0] * n + [1] * (len(vs) - n)
    source = val.images.repeat((len(vs) - n) // n, 1, 1, 1)
    diff = (vs.images[n:].short() - source.short()).abs().amax(1, keepdim=True)  # (M, 1, H, W)
    assert torch.equal(diff > 0, vs.masks[n:]) and vs.masks[n:].flatten(1).any(1).all()
    assert (vs.masks[n:].flatten(1).float().mean(1) < 0.15).all()
    assert all(d[m].float().mean() >= 3 for d, m in zip(diff, vs.masks[n:]))
    grey = [j for j in range(len(vs) - n) if j % n == 1]
    assert all(torch.equal(vs.images[n + j, 0], vs.images[n + j, 2]) for j in grey)


def test_native_validation_set_masks_are_the_changed_pixels_at_the_working_size(tmp_path):
    val = _photo_files(tmp_path / "big", 3, 256, load=64)
    vs = cu.make_validation_set(val, seed=0, native=True)
    assert len(vs) == 3 * (1 + len(cu.SYNTHETIC_KINDS)) and vs.images.shape[2:] == (64, 64)
    assert vs.paths[3] == f"{val.paths[0]}#{cu.SYNTHETIC_KINDS[0]}"
    _check_anomalies(vs, val)
    again = cu.make_validation_set(val, seed=0, native=True)
    assert torch.equal(again.images, vs.images) and again.paths == vs.paths       # seeded
    assert not torch.equal(cu.make_validation_set(val, seed=0).images, vs.images)  # drawn at 256 px, not 64
    # a file already at the working size is drawn on exactly as the loaded image is
    small = _photo_files(tmp_path / "small", 2, 64, load=64)
    assert torch.equal(cu.make_validation_set(small, seed=1, native=True).images,
                       cu.make_validation_set(small, seed=1).images)


def test_native_validation_set_above_the_size_cap_keeps_the_loaded_pixels_elsewhere(tmp_path, monkeypatch):
    import cpc_ad.synthetic
    val = _photo_files(tmp_path, 2, 256, load=64)
    monkeypatch.setattr(cpc_ad.synthetic, "NATIVE_MAX_SIDE", 160)  # drawn on a 160 px copy of the 256 px files
    vs = cu.make_validation_set(val, seed=2, kinds=("thin_line", "missing_part"), native=True)
    _check_anomalies(vs, val)


def test_native_validation_set_draws_a_thin_line_fainter_at_the_working_size(tmp_path):
    """The point of native drawing: a crack 1-3 px wide at 256 px is a blur of a fraction of a
    pixel at 64 px, as a real one is, not a hard 1-px line of full contrast."""
    val = _photo_files(tmp_path, 4, 256, load=64)

    def contrast(vs: cu.ImageSet) -> float:  # mean change of the changed pixels, in grey levels
        diff = (vs.images[4:].short() - val.images.short()).abs().amax(1).float()  # (4, H, W)
        return float(np.mean([d[m[0]].mean() for d, m in zip(diff, vs.masks[4:])]))

    native = cu.make_validation_set(val, seed=0, kinds=("thin_line",), native=True)
    working = cu.make_validation_set(val, seed=0, kinds=("thin_line",))
    assert native.substituted == {} and contrast(native) < 0.6 * contrast(working)


def test_native_validation_set_names_a_missing_or_changed_file(tmp_path):
    val = _photo_files(tmp_path, 2, 128, load=32)
    os.remove(val.paths[1])
    with pytest.raises(ValueError, match=re.escape(val.paths[1])):
        cu.make_validation_set(val, native=True)
    Image.fromarray(np.zeros((128, 128, 3), np.uint8)).save(val.paths[1])  # back, but not the image loaded
    with pytest.raises(ValueError, match=re.escape(val.paths[1]) + ".*changed"):
        cu.make_validation_set(val, native=True)


# ---- demo data -----------------------------------------------------------------------

def test_demo_registry():
    kinds = {c: spec.kind for c, spec in cu.DEMO_CATEGORIES.items()}
    assert {"brick", "gravel", "tissue"} <= set(kinds)
    assert sum(k == "texture" for k in kinds.values()) >= 4 and sum(k == "object" for k in kinds.values()) >= 4
    tune, conf = set(cu.DEMO_TUNING), set(cu.DEMO_CONFIRMATION)
    assert not tune & conf and tune | conf == set(kinds) and len(tune) == len(conf)
    assert {"brick", "gravel"} <= tune and "tissue" in conf
    for half in (tune, conf):
        assert sum(kinds[c] == "texture" for c in half) >= 2 and sum(kinds[c] == "object" for c in half) >= 2
    for c in kinds:
        defects = cu.demo_defects(c)
        assert len(defects) >= 4 and len(set(defects)) == len(defects)
        assert {"foreign", "stain"} <= set(defects)                      # unpredictable
        assert {"blob", "crack"} <= set(defects)                         # predictable
        if kinds[c] == "object":
            assert {"missing", "extra"} <= set(defects)
    with pytest.raises(ValueError, match="unknown demo category"):
        cu.demo_defects("bottle_cap")


def test_demo_data_loads(demo_root):
    assert cu.list_categories(demo_root) == sorted(cu.DEMO_CATEGORIES)
    for cat, spec in cu.DEMO_CATEGORIES.items():
        defects = cu.demo_defects(cat)
        data = cu.load_category(demo_root, cat, image_size=64, num_threads=2)
        train, test = data["train"], data["test"]
        assert train.images.shape == (4, 3, 64, 64) and train.images.dtype == torch.uint8
        assert len(test) == 2 + len(defects)
        assert sorted(set(test.defect_types)) == sorted(set(defects) | {"good"})
        assert test.labels.sum() == len(defects)
        defect = test.labels == 1
        assert all(m.any() for m in test.masks[defect]) and not test.masks[~defect].any()
        assert test.masks.float().mean() < 0.2  # defects are small
        gray = torch.equal(train.images[:, 0], train.images[:, 1]) and torch.equal(train.images[:, 1], train.images[:, 2])
        assert gray == (not spec.colour), cat


def test_demo_objects_are_centred_with_jitter(demo_root):
    """An object sits near the centre of a plain background, in a slightly different pose each time."""
    for cat, spec in cu.DEMO_CATEGORIES.items():
        if spec.kind != "object":
            continue
        imgs = np.stack([np.asarray(Image.open(p), np.float32).reshape(256, 256, -1)
                         for p in sorted((demo_root / cat / "train" / "good").glob("*.png"))])  # (N, H, W, C)
        fg = (np.abs(imgs - np.median(imgs[:, :8, :8], axis=(1, 2))[:, None, None]) > 40).any(-1)  # (N, H, W)
        ys, xs = np.nonzero(fg[0])
        centre = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2   # of the bounding box
        assert abs(centre[0] - 128) < 20 and abs(centre[1] - 128) < 20, cat
        assert not fg[:, :5].any() and not fg[:, -5:].any(), cat    # background at the borders
        assert len({tuple(np.argwhere(f).mean(0).round(1)) for f in fg}) == len(fg)  # poses differ


def test_demo_data_defect_masks_on_disk(demo_root):
    for cat in cu.DEMO_CATEGORIES:
        for kind in cu.demo_defects(cat):
            mask = np.asarray(Image.open(demo_root / cat / "ground_truth" / kind / "000_mask.png"))
            assert mask.shape == (cu.DEMO_IMAGE_SIZE, cu.DEMO_IMAGE_SIZE), (cat, kind)
            assert set(np.unique(mask)) == {0, 255}, (cat, kind)


@pytest.mark.parametrize("category", list(cu.DEMO_CATEGORIES))
def test_demo_defects_change_exactly_the_mask(category):
    """The writer's defect images: the mask is exactly the pixels where the defective image
    differs from its clean original, and never empty; about half the draws are subtle."""
    spec = cu.DEMO_CATEGORIES[category]
    sources = cpc_ad.demo._demo_sources(spec)
    rng = np.random.default_rng(0)
    for defect in cu.demo_defects(category):
        for _ in range(2):
            clean, bad, mask = cpc_ad.demo._demo_defect_image(spec, defect, 64, sources, rng)
            assert clean.shape == bad.shape == (64, 64, 3 if spec.colour else 1)
            assert mask.any() and np.array_equal((clean != bad).any(-1), mask), defect


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_data_deterministic(tmp_path):
    kw = dict(categories=["tissue"], n_train=2, n_test_good=1, n_per_defect=1, image_size=64)
    a = _tree_bytes(cu.make_demo_dataset(tmp_path / "a", seed=5, **kw))
    b = _tree_bytes(cu.make_demo_dataset(tmp_path / "b", seed=5, **kw))
    c = _tree_bytes(cu.make_demo_dataset(tmp_path / "c", seed=6, **kw))
    assert len(a) == 2 + 1 + 2 * len(cu.demo_defects("tissue")) + 1  # + the DEMO_MANIFEST
    assert a == b
    assert a.keys() == c.keys() and a != c
    assert all(a[k] != c[k] for k in a if "/train/" in f"/{k}")


def test_demo_category_alone_equals_it_in_the_full_set(tmp_path):
    kw = dict(n_train=1, n_test_good=1, n_per_defect=1, image_size=48, seed=2)
    full = cu.make_demo_dataset(tmp_path / "full", **kw)
    for cat in ("capsule", "grass"):
        alone = cu.make_demo_dataset(tmp_path / cat, categories=[cat], **kw)
        assert _tree_bytes(alone / cat) == _tree_bytes(full / cat)


def test_demo_data_never_overwrites_or_mixes_in_a_users_files(tmp_path):
    """A category folder holding files demo-data did not write is refused before anything is
    written; its own earlier output (or an identical one) is rewritten, a larger one shrunk."""
    kw = dict(categories=["tissue"], n_test_good=1, n_per_defect=1, image_size=32)
    good = tmp_path / "d" / "tissue" / "train" / "good"
    good.mkdir(parents=True)
    (good / "000.png").write_bytes(b"mine")
    (good / "900.png").write_bytes(b"also mine")
    with pytest.raises(FileExistsError, match=r"000\.png was not written by demo-data \(and 1 more"):
        cu.make_demo_dataset(tmp_path / "d", n_train=2, **kw)
    assert sorted(p.name for p in (tmp_path / "d").rglob("*")) == ["000.png", "900.png", "good", "tissue", "train"]
    assert (good / "000.png").read_bytes() == b"mine"

    root = cu.make_demo_dataset(tmp_path / "own", n_train=3, **kw)
    (root / "tissue" / cu.DEMO_MANIFEST).unlink()  # as written before the manifest: identical bytes are taken over
    cu.make_demo_dataset(root, n_train=3, **kw)
    cu.make_demo_dataset(root, n_train=2, **kw)
    assert sorted(p.name for p in (root / "tissue" / "train" / "good").iterdir()) == ["000.png", "001.png"]


def test_demo_data_never_writes_through_a_linked_folder(tmp_path):
    """Second pass of issue 28: tissue/train/good linked to a user's photo folder: refused, the
    photos untouched (a search that skips links would find nothing there to protect)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "000.png").write_bytes(b"my photo")
    (tmp_path / "d" / "tissue" / "train").mkdir(parents=True)
    (tmp_path / "d" / "tissue" / "train" / "good").symlink_to(photos)
    with pytest.raises(FileExistsError, match=r"train/good is a link to another folder"):
        cu.make_demo_dataset(tmp_path / "d", categories=["tissue"], n_train=2, n_test_good=1, n_per_defect=1,
                             image_size=32)
    assert [p.name for p in photos.iterdir()] == ["000.png"] and (photos / "000.png").read_bytes() == b"my photo"


def test_demo_unknown_category_fails_before_writing(tmp_path):
    with pytest.raises(ValueError, match="unknown demo category"):
        cu.make_demo_dataset(tmp_path / "d", categories=["brick", "bottel"], n_train=1)
    assert not (tmp_path / "d").exists()


def test_split_held_out(fake_widget):
    train = cu.concat_sets([fake_widget["train"]] * 4)  # 24 images
    rest, calib, normals = cu.split_held_out(train, 0.34, seed=1)
    assert (len(rest), len(calib), len(normals)) == (16, 4, 4)
    assert sorted(rest.paths + calib.paths + normals.paths) == sorted(train.paths)
    again = cu.split_held_out(train, 0.34, seed=1)
    assert [s.paths for s in again] == [rest.paths, calib.paths, normals.paths]
    with pytest.raises(ValueError, match="holds out 2 of 24 train/good images"):
        cu.split_held_out(train, 0.1)
