"""Where the project's own files are, installed or in a clone: the notebooks (the sweep runs
notebook 02 through papermill) and the published study's table (`report.load_published`).

Git keeps each of them once, where a reader of the repository looks for it (`notebooks/`,
`results/reference/`); the wheel carries them inside the package (pyproject.toml maps those
folders into `cpc_ad/` when it is built), so an installed package needs no repository, on
Kaggle say. A clone, or an editable install of one, reads the repository's files. Standard
library only: the sweep's `--help` names the notebook before torch is imported.
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_REPOSITORY = _PACKAGE.parent  # a clone's root, when the package runs from one
# a repository folder -> its copy inside the installed package (pyproject.toml's package-dir)
_PACKAGED = {"notebooks": "notebooks", "results/reference": "reference"}


def project_file(path: str) -> Path:
    """The file at `path` in the repository (e.g. "notebooks/02_cpc_anomaly_detection.ipynb"):
    the installed package's copy when it carries one, else the repository's. Returned whether it
    exists or not (the caller reads it, and its error names it); only a folder the wheel does
    not carry is a ValueError, since no installed package could ever find that file."""
    folder, _, name = path.rpartition("/")
    if folder not in _PACKAGED:
        raise ValueError(f"{path}: the wheel carries the files of {', '.join(_PACKAGED)} only")
    installed = _PACKAGE / _PACKAGED[folder] / name
    return installed if installed.is_file() else _REPOSITORY / path
