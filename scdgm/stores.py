"""Where the project's MLflow store is and how to reach it: the tracking URI (MLFLOW_TRACKING_URI, else
`sqlite:///<project>/mlflow.db`), a reachability check for tracking servers and a client on it, whose writes to a
database store a stop signal does not cut. Both the pipelines (tracking runs) and serving (resolving models:/
URIs) stand on this. Database URLs, MLflow's and Optuna's alike, go through `normalize_database_url`.
"""
from __future__ import annotations

import functools
import logging
import os
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse

from scdgm.errors import ScdgmError, uninterrupted
from scdgm.project import MLFLOW_DB, project_path

if TYPE_CHECKING:
    from mlflow import MlflowClient


T = TypeVar("T")

POSTGRES_DRIVER = "postgresql+psycopg2"
"""PostgreSQL URLs without a driver use psycopg2, which scdgm installs (SQLAlchemy 2.1 would pick psycopg 3,
and no SQLAlchemy reads `postgres://`)."""


DATABASE_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mssql")
"""URI schemes (before any `+driver`) of the SQLAlchemy stores MLflow keeps runs in: a stop signal must not cut
their transactions."""


def is_database(uri: str) -> bool:
    """Whether tracking URI `uri` is a database store (SQLite, PostgreSQL, MySQL, MSSQL), not a server or folder."""
    scheme, separator, _ = uri.partition("://")
    return bool(separator) and scheme.split("+")[0].lower() in DATABASE_SCHEMES


@contextmanager
def database_writes(uri: str) -> Iterator[None]:
    """Hold stop signals to the block's end when `uri` is a database store: for MLflow's fluent functions
    (logging a model, registering a version), which write through clients of their own."""
    if not is_database(uri):
        yield
        return
    with uninterrupted():
        yield


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
    """An MlflowClient on `uri` (the resolved tracking URI by default); also sets the fluent API's URI. On a
    database store the writes scdgm makes through it wait out a stop signal (`hold_writes`)."""
    import mlflow  # here: mlflow takes seconds to import, and only tracking and models:/ URIs need it

    uri = uri or tracking_uri()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no INFO chatter (database set-up, downloads)
    mlflow.set_tracking_uri(uri)
    mlflow_client = mlflow.MlflowClient(tracking_uri=uri)
    if is_database(uri):
        hold_writes(mlflow_client)
    return mlflow_client


def hold_writes(mlflow_client: MlflowClient) -> None:
    """Make the writes scdgm makes through `mlflow_client` (experiments, runs, tags, batches of params and metrics,
    dataset inputs, registry aliases) run `uninterrupted`: a stop signal waits for the write's transaction to end
    instead of cutting it in two, which on SQLite keeps the store locked against the write that then marks the
    run KILLED. Stores behind a tracking server need none of this: the server ends its own transactions."""
    for write in (mlflow_client.create_experiment, mlflow_client.create_run, mlflow_client.update_run,
                  mlflow_client.set_terminated, mlflow_client.delete_run, mlflow_client.set_tag,
                  mlflow_client.log_batch, mlflow_client.log_inputs, mlflow_client.set_registered_model_alias):
        setattr(mlflow_client, write.__name__, _held(write))


def _held(write: Callable[..., T]) -> Callable[..., T]:
    """`write`, run `uninterrupted`."""

    @functools.wraps(write)
    def held(*args: Any, **kwargs: Any) -> T:
        with uninterrupted():
            return write(*args, **kwargs)

    return held
