"""The user's project folder: where params.yaml is read and every piece of state (MLflow store, Optuna DB, Ray
results, reports, artifacts) is written. It is `--project DIR`, else $SCDGM_PROJECT, else the current directory;
never the folder scdgm is installed in."""
from __future__ import annotations

import os
from pathlib import Path

from scdgm.errors import ScdgmError

PROJECT_ENV = "SCDGM_PROJECT"

# The state a project accumulates, by name inside the project folder (`scdgm init` ignores them in git).
MLFLOW_DB = "mlflow.db"  # MLflow's SQLite store, unless MLFLOW_TRACKING_URI names another
MLFLOW_ARTIFACTS = "mlartifacts"  # the runs' artifacts next to it
OPTUNA_DB = "optuna.db"  # Optuna's studies, unless tune.storage names another
RAY_RESULTS = "ray_results"  # Ray Tune's trial folders
REPORTS = "reports"  # tune's outputs, evaluation metrics, history and figures, the registration
ARTIFACTS = "artifacts"  # model directories of the pipeline
MODEL_CACHE = ".scdgm/models"  # registered models that `scdgm serve` downloaded, keyed by store, name and version
STATE = (MLFLOW_DB, MLFLOW_ARTIFACTS, OPTUNA_DB, RAY_RESULTS, REPORTS, ARTIFACTS, ".scdgm")


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


def project_path(*parts: str | Path) -> Path:
    """An absolute path inside the project folder (trials run elsewhere, so paths handed on must be absolute);
    an absolute part stays as it is."""
    return project_dir().joinpath(*parts)


def optuna_storage() -> str:
    """The Optuna storage used when none is configured: SQLite at an absolute path inside the project."""
    return f"sqlite:///{project_path(OPTUNA_DB)}"
