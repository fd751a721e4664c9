"""Where the project's MLflow store is and how to reach it: the tracking URI (MLFLOW_TRACKING_URI, else
`sqlite:///<project>/mlflow.db`), a reachability check for tracking servers and a client on it. Both the
pipelines (tracking runs) and serving (resolving models:/ URIs) stand on this. Database URLs, MLflow's and
Optuna's alike, go through `normalize_database_url`.
"""
from __future__ import annotations

import logging
import os
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from scdgm.errors import ScdgmError
from scdgm.project import MLFLOW_DB, project_path

if TYPE_CHECKING:
    from mlflow import MlflowClient


POSTGRES_DRIVER = "postgresql+psycopg2"
"""PostgreSQL URLs without a driver use psycopg2, which scdgm installs (SQLAlchemy 2.1 would pick psycopg 3,
and no SQLAlchemy reads `postgres://`)."""


def normalize_database_url(url: str) -> str:
    """`url` with a PostgreSQL driver when it names none: `postgresql://` and `postgres://` become
    `postgresql+psycopg2://`; other URLs (an explicit `postgresql+DRIVER://`, SQLite, MySQL) stay as given."""
    scheme, separator, rest = url.partition("://")
    if separator and scheme.lower() in ("postgresql", "postgres"):
        return f"{POSTGRES_DRIVER}://{rest}"
    return url


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set (relative SQLite paths made absolute, PostgreSQL given its driver), else
    `sqlite:///<project>/mlflow.db`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        return f"sqlite:///{project_path(MLFLOW_DB)}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:  # a plain folder: MLflow's file store, refused by MLflow 3 unless explicitly allowed
        return str(Path(uri).resolve())
    return normalize_database_url(uri)


def ensure_reachable(uri: str) -> None:
    """Fail early with one line when a tracking server (http/https URI) does not answer."""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10):
            return
    except OSError as exc:
        raise ScdgmError(f"MLflow tracking server {uri} is not reachable ({exc.__class__.__name__})") from None


def client(uri: str | None = None) -> MlflowClient:
    """An MlflowClient on `uri` (the resolved tracking URI by default); also sets the fluent API's URI."""
    import mlflow  # here: mlflow takes seconds to import, and only tracking and models:/ URIs need it

    uri = uri or tracking_uri()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no INFO chatter (database set-up, downloads)
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri)
