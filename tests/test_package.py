"""The package's shape: small modules, one concern each, no import cycles, a façade that only
re-exports, and scripts that use public names only (docs/module.md)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import cpc_utils as cu

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted((ROOT / "cpc_ad").glob("*.py"))


def top_level_imports(path: Path) -> set[str]:
    """The package modules `path` imports at its top (lazy imports inside functions excluded)."""
    tree = ast.parse(path.read_text())
    return {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module}


def test_modules_are_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in MODULES}
    assert len(sizes) >= 15 and all(n <= 600 for n in sizes.values()), sizes


def test_no_import_cycles():
    graph = {p.stem: top_level_imports(p) for p in MODULES}
    assert all(d in graph for deps in graph.values() for d in deps)
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join(path + (module,))}"
        if module not in done:
            for d in graph[module]:
                visit(d, path + (module,))
            done.add(module)

    for module in graph:
        visit(module, ())


def public_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if not n.startswith("_")}


def test_the_facade_reexports_every_public_name_and_holds_nothing_else():
    tree = ast.parse((ROOT / "cpc_utils.py").read_text())
    for node in tree.body[1:]:  # after the docstring: imports from the package and the __main__ guards only
        assert isinstance(node, ast.ImportFrom) and node.module.startswith("cpc_ad.") or (
            isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'"), ast.unparse(node)[:80]
    for path in MODULES:
        if path.stem not in ("__init__", "cli"):
            missing = {n for n in public_names(path) if not hasattr(cu, n)}
            assert not missing, f"cpc_utils does not re-export {path.stem}.{sorted(missing)}"


def test_scripts_and_notebooks_use_public_names_only():
    for path in [*(ROOT / "scripts").glob("*.py"), *(ROOT / "notebooks").glob("*.ipynb")]:
        private = set(re.findall(r"\bcu\._[a-z]\w*", path.read_text()))
        assert not private, f"{path.name} uses private names {sorted(private)}"
