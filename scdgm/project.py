"""The user's project folder: where params.yaml is read and every piece of state (MLflow store, Optuna DB, Ray
results, reports, artifacts) is written. It is `--project DIR`, else $SCDGM_PROJECT, else the current directory;
never the folder scdgm is installed in."""
from __future__ import annotations

import os
from pathlib import Path

from scdgm.errors import ScdgmError

PROJECT_ENV = "SCDGM_PROJECT"


def project_dir() -> Path:
    """The current project folder as an absolute path ($SCDGM_PROJECT or the working directory)."""
    chosen = os.environ.get(PROJECT_ENV) or os.getcwd()
    path = Path(chosen).expanduser().resolve()
    if not path.is_dir():
        raise ScdgmError(f"project folder {path} does not exist (from ${PROJECT_ENV} or --project)")
    return path


def use_project(path: str | Path) -> Path:
    """Make `path` the project for this process and the processes it starts (Ray workers, DVC stages)."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_dir():
        raise ScdgmError(f"--project {path}: no such folder")
    os.environ[PROJECT_ENV] = str(resolved)
    return resolved


def project_path(*parts: str) -> Path:
    """An absolute path inside the project folder (trials run elsewhere, so paths handed on must be absolute)."""
    return project_dir().joinpath(*parts)
