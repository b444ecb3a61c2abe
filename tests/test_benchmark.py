"""scripts/benchmark.py (`make bench`) with tiny settings: every section runs, the JSON has its
keys and the markdown states every target; plus its two measuring helpers."""
from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

import cpc_utils as cu

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
SECTIONS = {"meta", "ceiling", "encoders", "reference", "cpcad", "scaling", "paper_resolution", "targets"}
ROW_KEYS = {"encoder", "grid", "patches_per_step", "step_s", "patches_per_s", "flops_per_patch",
            "achieved_flops_per_s", "fraction_of_ceiling", "peak_train_bytes", "score_images_per_s",
            "score_latency_s", "bank_s", "peak_score_bytes"}


@pytest.fixture(scope="module")
def bench():
    """The script imported as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("benchmark", None)


@pytest.fixture
def one_thread():
    """The smoke test checks the plumbing, not speed: one thread is quickest on a busy CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_quick_run_writes_json_and_markdown(bench, tmp_path, one_thread):
    root = cu.make_demo_dataset(tmp_path / "demo", ["brick"], n_train=20, n_test_good=2, n_per_defect=1)
    out = tmp_path / "bench"
    # one encoder keeps it quick: the others take the same path (tests/test_encoders.py builds them)
    bench.main(["--quick", "--device", "cpu", "--data-root", str(root), "--out-dir", str(out),
                "--encoders", "resnet18v2"])

    res = json.loads((out / "cpu.json").read_text())
    assert set(res) == SECTIONS
    assert res["meta"]["quick"] and res["meta"]["device"] == "cpu"
    assert res["ceiling"]["fp32"]["flops_per_s"] > 0
    assert [(r["encoder"], r["grid"]) for r in res["encoders"]] == [("resnet18v2", "paper"), ("resnet18v2", "demo")]
    for row in res["encoders"]:
        assert ROW_KEYS <= set(row)
        assert row["flops_per_patch"] > 0 and 0 < row["fraction_of_ceiling"]
    assert {r["grid"] for r in res["reference"]} == {"paper", "demo"}
    assert set(res["cpcad"]["runs"]) == {"independent", "shared", "shared, same time"}
    assert res["cpcad"]["runs"]["shared, same time"]["epochs"] == 4 * res["cpcad"]["runs"]["shared"]["epochs"]
    assert res["cpcad"]["runs"]["independent"]["encoders"] == 4
    assert res["cpcad"]["runs"]["shared"]["encoders"] == 1
    assert [r["train_images"] for r in res["scaling"]["rows"]] == [4, 8]
    assert all("epoch_s_extrapolated" in r for r in res["paper_resolution"])

    md = (out / "cpu.md").read_text()
    assert len(res["targets"]) == 6
    for t in res["targets"]:  # every target measured, even with tiny settings, and judged by its own threshold
        op, threshold = t["target"].split()[0], float(t["target"].split()[1].rstrip("x"))
        assert t["measured"] is not None, t
        assert t["passed"] == (t["measured"] >= threshold if op == ">=" else t["measured"] <= threshold), t
        assert t["name"] in md and t["target"] in md and t["measured_text"] in md


def test_default_settings_are_not_quick_and_serialise(bench):
    cpu = torch.device("cpu")
    cfg = bench.BenchConfig.default_for(cpu)
    assert cfg.quick is False and cfg.width == 64 and cfg.scaling_sizes == (25, 50, 100)
    json.dumps(bench._meta(cfg, cpu))  # the config travels in the JSON


def test_peak_memory_sees_a_large_cpu_tensor(bench):
    with bench.PeakMemory(torch.device("cpu")) as mem:
        x = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, written, so resident
        time.sleep(0.05)                   # several sampling intervals
        del x
    assert mem.peak >= 48 * 2 ** 20


def test_targets_pass_and_fail(bench):
    res = {"encoders": [{"encoder": "resnet18v2", "grid": "paper", "fraction_of_ceiling": 0.7,
                         "score_latency_s": 0.3}],
           "cpcad": {"speedup": 3.5, "auroc_drop": 0.05},
           "scaling": {"time_per_image_spread": 1.1, "memory_growth": 1.0}}
    got = [t["passed"] for t in bench.targets(res, torch.device("cpu"))]
    assert got == [True, True, False, False, True, True]
    assert all(t["passed"] is None for t in bench.targets({}, torch.device("cpu")))
