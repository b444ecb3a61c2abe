"""The project as a user gets it: a wheel, installed (not editable) into a fresh virtual
environment, runs notebook 02 from a folder outside the repository.

Nothing is downloaded. The wheel is built without build isolation from a copy of the source
(so the repository gets no build/ or egg-info), and the fresh environment borrows the third-party
packages of the environment running the tests through a .pth file naming that environment's
site-packages: a path line of a .pth file goes onto sys.path, but the .pth files inside that
folder are not processed, so the editable install of the repository does not come along. The
test checks that `cpc_utils` and `cpc_ad` are the installed copies, in the kernel too. Because
the borrowed folder holds every package of the test environment, a second test checks that the
wheel's declared dependencies (and theirs) provide every module the package imports.

Also: no code of the project loads with torch.load without weights_only=True.
"""
from __future__ import annotations

import ast
import importlib.metadata as md
import importlib.util
import json
import math
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import time
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "02_cpc_anomaly_detection.ipynb"
# what a source checkout holds besides the source: never copied for the build
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "venv", "data", "results", "build", "dist", "*.egg-info",
                                    "__pycache__", ".pytest_cache", ".ipynb_checkpoints", "tmp")
KERNEL = "cpc-install-test"  # a kernelspec of the fresh environment's own, naming its interpreter
CHECK_TAG = "INSTALL-CHECK"
CHECK_CELL = f"""import json as _json, sys as _sys
import cpc_ad as _cpc_ad
print({CHECK_TAG!r}, _json.dumps({{"executable": _sys.executable, "prefix": _sys.prefix,
                                    "cpc_utils": cu.__file__, "cpc_ad": _cpc_ad.__file__}}))"""
NB02_TINY = dict(category="brick", epochs=1, image_size=64, patch_size=16, stride=8, width=8, batch_size=4,
                 num_heatmaps=1, test_negatives=128, val_fraction=0.5, seed=0, device="cpu")


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _run(cmd: list, what: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, (f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n"
                                  f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def _clean_env(**extra) -> dict:
    """The environment without anything that could put the repository on sys.path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH", "VIRTUAL_ENV",
                        "COVERAGE_PROCESS_START", "JUPYTER_PATH")}
    env.update(PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", **extra)
    return env


def _inside(path: str | Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory) -> Path:
    """`pip wheel` of a copy of the source, offline and without build isolation."""
    for module, why in (("pip", "pip builds and installs the wheel"),
                        ("setuptools", "setuptools is the build backend (pyproject.toml), used without build "
                                       "isolation so that nothing is downloaded")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed in this environment: {why}")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCE)
    # of results/, what the wheel carries: the reference folder's own files (the published study's
    # table), not the runs in its subfolders
    shutil.copytree(ROOT / "results" / "reference", src / "results" / "reference",
                    ignore=lambda folder, names: [n for n in names if (Path(folder) / n).is_dir()])
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", tmp / "dist", src], "building the wheel", cwd=tmp, env=_clean_env())
    wheels = list((tmp / "dist").glob("*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _wheel_metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        return Parser().parsestr(z.read(name).decode())


def test_wheel_holds_the_package_and_nothing_else(built_wheel):
    """The package, the façade, and as package data the notebooks (the sweep runs notebook 02)
    and the published study's table: no tests, scripts, data or results, nothing left over from
    an earlier build."""
    with zipfile.ZipFile(built_wheel) as z:
        names = set(z.namelist())
    tops = {n.split("/")[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert len(dist_info) == 1 and tops - dist_info == {"cpc_utils.py", "cpc_ad"}, sorted(tops)
    # every module of the package as it was built (the copy, not the tree being edited meanwhile)
    source = built_wheel.parent.parent / "src"
    expected = ({"cpc_utils.py", "cpc_ad/reference/published_study.csv"}
                | {f"cpc_ad/{p.name}" for p in (source / "cpc_ad").glob("*.py")}
                | {f"cpc_ad/notebooks/{p.name}" for p in (source / "notebooks").glob("*.ipynb")})
    assert {"cpc_ad/__init__.py", "cpc_ad/notebooks/02_cpc_anomaly_detection.ipynb"} <= expected
    held = {n for n in names if n.split("/")[0] not in dist_info}
    assert held == expected, f"the wheel lacks {sorted(expected - held)}, and holds {sorted(held - expected)} besides"
    assert _canon(_wheel_metadata(built_wheel)["Name"]) == "cpc-ad"
    assert built_wheel.name == f"cpc_ad-{_wheel_metadata(built_wheel)['Version']}-py3-none-any.whl"


def _imported_modules(path: Path) -> dict[str, int]:
    """Top-level names of the modules `path` needs (absolute imports not guarded by an
    `except ImportError`), each with the line of its first import."""
    tree = ast.parse(path.read_text())
    optional = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                h.type is not None and {getattr(t, "id", None) for t in
                                        (h.type.elts if isinstance(h.type, ast.Tuple) else [h.type])}
                & {"ImportError", "ModuleNotFoundError"} for h in node.handlers):
            optional |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found = {}
    for node in ast.walk(tree):
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            found.setdefault(name.split(".")[0], node.lineno)
    return found


def _providers() -> dict[str, set[str]]:
    """Importable top-level name -> the distributions (canonical names) installed here that provide it."""
    out: dict[str, set[str]] = {}
    for dist in md.distributions():
        names = set((dist.read_text("top_level.txt") or "").split())
        for f in dist.files or ():
            first = f.parts[0] if f.parts else ""
            if first and first not in ("..", "__pycache__") and not first.endswith((".dist-info", ".egg-info", ".pth")):
                names.add(first.split(".")[0] if len(f.parts) == 1 else first)
        for name in names:
            out.setdefault(name, set()).add(_canon(dist.metadata["Name"]))
    return out


def _requirement_name(req: str) -> str:
    return _canon(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))


def test_declared_dependencies_provide_every_import(built_wheel):
    """`pip install` of the wheel brings its Requires-Dist and theirs, nothing else: every
    third-party module that cpc_utils.py and cpc_ad/ import must come with one of those."""
    declared = {_requirement_name(r) for r in _wheel_metadata(built_wheel).get_all("Requires-Dist") or []
                if not re.search(r"\bextra\s*==", r)}
    closure, todo = set(), list(declared)
    while todo:  # the dependencies of the dependencies, as installed here
        name = todo.pop()
        if name in closure:
            continue
        closure.add(name)
        try:
            reqs = md.distribution(name).requires or []
        except md.PackageNotFoundError:
            continue
        todo += [_requirement_name(r) for r in reqs if not re.search(r"\bextra\s*==", r)]
    providers = _providers()
    source = built_wheel.parent.parent / "src"
    own = {"cpc_utils", "cpc_ad", "__future__"}
    problems = []
    for path in [source / "cpc_utils.py", *sorted((source / "cpc_ad").glob("*.py"))]:
        for module, line in _imported_modules(path).items():
            if module in own or module in sys.stdlib_module_names:
                continue
            if not providers.get(module):
                problems.append(f"{path.relative_to(source)}:{line} imports {module}, which no installed "
                                f"distribution provides")
            elif not providers[module] & closure:
                problems.append(f"{path.relative_to(source)}:{line} imports {module} (from "
                                f"{', '.join(sorted(providers[module]))}), not among the dependencies in pyproject.toml")
    assert not problems, "\n".join(problems)


def test_installed_wheel_runs_notebook02_outside_the_repository(built_wheel, tmp_path):
    """The wheel in a fresh venv: the demo data from its CLI, then a copy of notebook 02 at tiny
    settings through papermill, with a kernel on the fresh venv's interpreter, all from tmp_path."""
    for module in ("papermill", "nbformat", "ipykernel"):  # in requirements.txt; the notebooks need them
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: running notebook 02 needs it (see requirements.txt)")
    import nbformat

    t0 = time.perf_counter()
    venv, run = tmp_path / "venv", tmp_path / "run"
    run.mkdir()
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    env = _clean_env()
    _run([sys.executable, "-m", "venv", "--without-pip", venv], "creating the venv", env=env, cwd=tmp_path)
    # installed by this environment's pip, as the fresh interpreter's own package, before the .pth below
    # exists: pip sees an empty environment and copies the wheel's files into the venv
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", built_wheel],
         "installing the wheel", env=env, cwd=tmp_path)
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        "asking the venv for its site-packages", env=env, cwd=run).stdout.strip())
    assert _inside(purelib, venv) and (purelib / "cpc_utils.py").is_file() and (purelib / "cpc_ad").is_dir()
    assert not (purelib / "cpc_utils.py").is_symlink()  # a copy, not a link into the repository

    # the third-party packages of this environment, never the repository itself
    borrowed = [p for p in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                                          *site.getsitepackages()])
                if Path(p).is_dir() and Path(p).resolve() != ROOT]
    if site.ENABLE_USER_SITE and Path(site.getusersitepackages()).is_dir():
        borrowed.append(site.getusersitepackages())
    (purelib / "_cpc_install_test_borrowed.pth").write_text("".join(f"{p}\n" for p in borrowed))
    spec = venv / "share" / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "cpc-utils installed (test)", "language": "python"}))

    probe = _run([python, "-c", "import json, sys, cpc_utils, cpc_ad, torch, papermill; print(json.dumps("
                                "{'prefix': sys.prefix, 'cpc_utils': cpc_utils.__file__, 'cpc_ad': cpc_ad.__file__, "
                                "'torch': torch.__file__, 'editable': [m for m in sys.modules if 'editable' in m], "
                                "'notebook': str(cpc_utils.project_file('notebooks/02_cpc_anomaly_detection.ipynb')), "
                                "'published': str(cpc_utils.PUBLISHED_STUDY)}))"],
                 "importing the installed package", env=env, cwd=run)
    where = json.loads(probe.stdout.strip().splitlines()[-1])
    assert Path(where["prefix"]).resolve() == venv.resolve(), where
    for key in ("cpc_utils", "cpc_ad", "notebook", "published"):  # the package data too: no repository needed
        assert _inside(where[key], purelib) and not _inside(where[key], ROOT), where
    assert Path(where["notebook"]).is_file() and Path(where["published"]).is_file(), where
    assert not where["editable"], where
    assert not _inside(where["torch"], venv), where  # borrowed, not installed

    env = _clean_env(MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    data, out = run / "data", run / "out"
    _run([python, "-m", "cpc_utils", "demo-data", data, "--categories", "brick"], "writing the demo data",
         env=env, cwd=run)
    assert (data / "brick" / "train" / "good").is_dir()

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(CHECK_CELL))
    copy, executed = run / NOTEBOOK.name, run / f"executed_{NOTEBOOK.name}"
    nbformat.write(nb, copy)
    args = dict(input=str(copy), output=str(executed), cwd=str(run), kernel=KERNEL,
                parameters={**NB02_TINY, "data_root": str(data), "output_dir": str(out)})
    runner = ("import json, sys; import papermill as pm; a = json.loads(sys.argv[1]); "
              "pm.execute_notebook(a['input'], a['output'], parameters=a['parameters'], kernel_name=a['kernel'], "
              "cwd=a['cwd'], progress_bar=False)")
    _run([python, "-c", runner, json.dumps(args)], "notebook 02 with the installed package", timeout=600,
         env=env, cwd=run)

    shown = "".join(o.get("text", "") for c in nbformat.read(executed, as_version=4).cells
                    if c.cell_type == "code" for o in c.get("outputs", []))
    line = next((ln for ln in shown.splitlines() if ln.startswith(CHECK_TAG)), None)
    assert line, f"the check cell printed nothing:\n{shown[-3000:]}"
    kernel = json.loads(line[len(CHECK_TAG):])
    assert Path(kernel["prefix"]).resolve() == venv.resolve(), kernel  # the kernel ran the fresh venv's python
    assert Path(kernel["executable"]).parent == python.parent, kernel
    for key in ("cpc_utils", "cpc_ad"):
        assert _inside(kernel[key], purelib) and not _inside(kernel[key], ROOT), kernel

    assert (out / "model.pt").is_file() and (out / "metrics.json").is_file(), sorted(p.name for p in run.rglob("*"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert isinstance(metrics["image_auroc"], float) and math.isfinite(metrics["image_auroc"]), metrics["image_auroc"]
    assert metrics["category"] == "brick" and metrics["epochs_trained"] == 1
    assert Path(metrics["data_root"]).resolve() == data.resolve()
    print(f"install + demo data + notebook 02: {time.perf_counter() - t0:.1f} s")


def _code_files() -> list[Path]:
    files = [ROOT / "cpc_utils.py", *sorted((ROOT / "cpc_ad").glob("*.py")), *sorted((ROOT / "scripts").glob("*.py")),
             *sorted((ROOT / "notebooks").glob("*.ipynb"))]
    return [f for f in files if f.is_file()]


def _python_sources(path: Path) -> list[str]:
    if path.suffix != ".ipynb":
        return [path.read_text()]
    cells = json.loads(path.read_text())["cells"]
    return ["\n".join(line for line in "".join(c["source"]).splitlines() if not line.lstrip().startswith(("%", "!")))
            for c in cells if c["cell_type"] == "code"]


def test_torch_load_only_with_weights_only_true():
    """A checkpoint or bundle holds tensors and plain types only: the project never unpickles
    arbitrary objects, so weights_only is never set false, and every torch.load says True."""
    files = _code_files()
    assert ROOT / "cpc_utils.py" in files and any(f.suffix == ".ipynb" for f in files)
    unsafe = [f"{f.relative_to(ROOT)}:{n}" for f in files for n, line in enumerate(f.read_text().splitlines(), 1)
              if re.search(r"weights_only\s*=\s*False", line)]
    assert not unsafe, f"weights_only set false in {unsafe}"
    loads = []
    for f in files:
        for source in _python_sources(f):
            for node in ast.walk(ast.parse(source)):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                    kw = {k.arg: k.value for k in node.keywords}
                    ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                    loads.append((f"{f.relative_to(ROOT)}:{node.lineno}", ok))
    assert loads, "no torch.load found: has the loading code moved?"
    assert all(ok for _, ok in loads), f"torch.load without weights_only=True: {[w for w, ok in loads if not ok]}"
