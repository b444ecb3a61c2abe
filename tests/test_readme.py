"""The README's commands, and those of the pages under docs/ it links to, run as written.

Every command in README.md and docs/*.md (their code blocks and their inline `code`) is found
here and run:
`make` targets as a dry run (`make -n`), the demo-data command for real into a temporary
folder, a papermill command by its notebook and the parameters it sets, the selection study and its levers with `--report` on a copy of their
committed runs (their tables.md must come out the same), every `scripts/sweep.py` command with `--dry-run` (arguments, parameters and
categories checked, nothing trained) against a tiny tree standing in for its data,
`scripts/train.py` (also under torchrun) for real with tiny settings, `python -m cpc_utils --help`
for real, and the score command for real with an untrained model's bundle standing in for a
trained one. A command that is none of these is an error, so a new command in the README or in
docs/ must be covered here. Also: the README stays short (at most 1,300 words: the rest is in
docs/), and every relative link in these pages points to a file that exists.
"""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cpc_utils as cu
from conftest import make_fake_mvtec

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # the README and the pages it links to
DOCS = "\n".join(p.read_text() for p in PAGES)
README_MAX_WORDS = 1300  # `wc -w README.md`: the front page; everything else goes to docs/


def readme_commands(text: str = DOCS) -> list[str]:
    """Shell commands in the README and docs/*.md: lines of ```bash blocks (continuations
    joined, comments dropped) and inline spans that start like a command."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if line:
                commands.append(" ".join(line.split()))
    for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", text):
        span = " ".join(span.split())
        if re.match(r"(make \w|python -m |\.venv/bin/python |python scripts/|MVTEC_ROOT=\S+ )", span):
            commands.append(span)
    return list(dict.fromkeys(commands))


COMMANDS = readme_commands()


def test_the_readme_has_its_commands():
    assert "make demo" in COMMANDS and "make test" in COMMANDS and "python -m cpc_utils demo-data data/demo" in COMMANDS
    assert sum("scripts/sweep.py" in c for c in COMMANDS) >= 3
    assert any(c.startswith("python -m cpc_utils score ") for c in COMMANDS)
    front = readme_commands(README)  # the front page keeps its two commands
    assert "make demo" in front and "make test" in front, front


def test_the_readme_is_short():
    words = len(README.split())  # what `wc -w README.md` counts
    assert words <= README_MAX_WORDS, f"README.md has {words} words (at most {README_MAX_WORDS}): move detail to docs/"


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown page: lower case, punctuation dropped,
    spaces as hyphens."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_to_files_that_exist(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links or page.name != "README.md"
    broken = []
    for link in links:
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # https:, mailto:: not a file
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link} (no {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path})")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link} (no heading #{anchor} in {path.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("readme")
    mvtec = make_fake_mvtec(tmp / "mvtec", {c: "rgb" for c in ("bottle", "carpet", "cable")})
    demo = cu.make_demo_dataset(tmp / "demo", cu.DEMO_CATEGORIES, n_train=8, n_test_good=2, n_per_defect=1,
                                image_size=32)
    grid = cu.PatchGrid(32, 16, 8)
    model = cu.CPCAD(cu.cpcad_config("fast", grid, width=8), grid)
    train = cu.load_category(demo, "brick", 32)["train"]
    rule = cu.normal_threshold(np.zeros(8), 0.01)
    scoring = cu.prepare_scoring(model, train.images, train.images, cu.scoring_config(detector="knn_stats", reduce="top10",
                                                                                          test_negatives=32, knn_bank=64),
                                 device="cpu")
    bundle = cu.save_bundle(tmp / "model.pt", model, scoring, rule, rule)
    return {"mvtec": mvtec, "demo": demo, "tmp": tmp, "bundle": bundle}


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs_as_written(command, trees, tmp_path):
    words = shlex.split(command.replace("$((SLURM_ARRAY_TASK_ID + 1))/$SLURM_ARRAY_TASK_COUNT", "1/4"))
    env = {"PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg"}
    while "=" in words[0]:  # VAR=value prefixes: the data root becomes the stand-in tree
        name, value = words.pop(0).split("=", 1)
        env[name] = str(trees["mvtec"]) if name == "MVTEC_ROOT" else value
    if words[0] == "make":
        proc = subprocess.run(["make", "-n", *words[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return
    if words[0].endswith("papermill"):  # the notebook exists and takes every parameter given (-p name value)
        import papermill as pm
        assert (ROOT / words[1]).is_file(), f"{command}: no notebook {words[1]}"
        known = pm.inspect_notebook(str(ROOT / words[1]))
        given = [words[i + 1] for i, w in enumerate(words) if w in ("-p", "--parameters")]
        assert given and set(given) <= set(known), f"{command}: {set(given) - set(known)} are not parameters of {words[1]}"
        return
    if words[0] == "torchrun":  # the same launcher, as a module of this Python
        words = ["python", "-m", "torch.distributed.run", *words[1:]]
    assert words[0] in ("python", ".venv/bin/python"), f"command in README.md or docs/ not covered by this test: {command}"
    if "scripts/train.py" in words:  # for real, with tiny settings after the README's own (the last wins)
        args = [str(trees["demo"]) if a == "data/demo" else str(tmp_path / a) if a.startswith("results/") else a
                for a in words[1:]]
        tiny = ["--image_size", "64", "--width", "8", "--epochs", "1", "--test_negatives", "64", "--val_fraction", "0.5"]
        proc = subprocess.run([sys.executable, *args, *tiny], cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env={**env, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert list(tmp_path.rglob("metrics.json")), proc.stdout[-2000:]
        return
    stand_in = "sweep.py" in command or words[1:4] == ["-m", "cpc_utils", "score"]  # read the demo data
    args = [a.replace("data/demo", str(trees["demo"] if stand_in else tmp_path / "demo")) for a in words[1:]]
    if args[:3] == ["-m", "cpc_utils", "score"]:  # a stand-in bundle; results go to tmp_path
        args = [str(trees["bundle"]) if a.endswith("model.pt") else a.replace("results/", f"{tmp_path}/results/")
                for a in args]
        proc = subprocess.run([sys.executable, *args, "--device", "cpu"], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr
        out = Path(args[args.index("--out") + 1])
        rows = (out / "scores.csv").read_text().splitlines()
        assert len(rows) == 1 + len(cu.find_images([trees["demo"] / "brick" / "test"])), rows
        assert len(list((out / "masks").rglob("*.png"))) == len(rows) - 1
        return
    if args == ["-m", "cpc_utils", "--help"]:  # the command line answers, naming its commands
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == 0, proc.stderr
        assert all(c in proc.stdout for c in ("demo-data", "summary", "score")), proc.stdout
        return
    if args[:3] == ["-m", "cpc_utils", "demo-data"]:
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr
        assert cu.list_categories(tmp_path / "demo") == sorted(cu.DEMO_CATEGORIES)
        return
    if args[0] == "scripts/selection_study.py":  # the arguments parse; the committed record rebuilds its tables
        study = ROOT / "results" / "study"
        for f in [*study.glob("selection/runs/*/seed*.json"), *study.glob("levers/*/runs/*/seed*.json")]:
            (tmp_path / f.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)  # what git holds, never
            (tmp_path / f.relative_to(ROOT)).write_bytes(f.read_bytes())                # the run folders beside it
        record = ROOT / (args[args.index("--out") + 1] if "--out" in args else "results/study/selection")
        copy = tmp_path / record.relative_to(ROOT)
        proc = subprocess.run([sys.executable, *args, "--report", "--out", str(copy)], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        made = copy.parent / "levers" / "tables.md" if "--levers" in args else copy / "tables.md"
        assert made.read_text() == (ROOT / made.relative_to(tmp_path)).read_text(), f"{made.name} is not what its runs give"
        return
    assert args[0] == "scripts/sweep.py", f"command in README.md or docs/ not covered by this test: {command}"
    if "--data-root" not in args:
        env.setdefault("MVTEC_ROOT", str(trees["mvtec"]))  # never the demo fallback in the repository's data/
    proc = subprocess.run([sys.executable, *args, "--dry-run", "--results", str(tmp_path / "results")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"\[1/\d+\] \S+: would run", proc.stdout), proc.stdout
    assert not (tmp_path / "results").exists()  # a dry run writes nothing
