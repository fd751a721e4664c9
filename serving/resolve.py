"""Model URI → local scdgm model directory: a folder, `models:/NAME@ALIAS`, `models:/NAME/VERSION`,
`models:/MODEL_ID` (an MLflow 3 logged model) or `runs:/RUN_ID/PATH`.

MLflow artifacts are downloaded once into a cache keyed by what they are (registered versions and runs never
change), through a temporary folder renamed into place, so uvicorn workers and Ray replicas share one copy.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from scdgm import stores
from scdgm.errors import ScdgmError
from scdgm.formats import MODEL_DIR_ARTIFACT, MODEL_FILES, is_model_directory
from scdgm.project import MODEL_CACHE, project_path

if TYPE_CHECKING:
    from mlflow import MlflowClient

"""Files that make a folder a scdgm model directory (see models.base.GenerativeModel.save)."""
NAME = r"[^/@]+"
REGISTERED_ALIAS = re.compile(rf"^models:/(?P<name>{NAME})@(?P<alias>{NAME})$")
REGISTERED_VERSION = re.compile(rf"^models:/(?P<name>{NAME})/(?P<version>\d+)$")
LOGGED_MODEL = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]+)$")
RUN_ARTIFACT = re.compile(r"^runs:/(?P<run_id>[0-9a-f]+)/(?P<path>.+)$")
URI_FORMS = "a model directory, models:/NAME@ALIAS, models:/NAME/VERSION, models:/MODEL_ID or runs:/RUN_ID/PATH"


@dataclass(frozen=True)
class ResolvedModel:
    """Where the model lies locally, and the name and version /v1/model reports for it."""

    directory: Path
    name: str
    version: str | None
    uri: str


def default_cache_dir() -> Path:
    """$SCDGM_CACHE_DIR, else the project's model cache (`<project>/.scdgm/models`)."""
    explicit = os.environ.get("SCDGM_CACHE_DIR")
    return Path(explicit) if explicit else project_path(MODEL_CACHE)


def _store_key(store: str) -> str:
    """A short, stable folder name for a tracking store: version 1 of a name differs between stores."""
    return hashlib.sha256(store.encode()).hexdigest()[:12]


def find_model_directory(root: Path) -> Path:
    """The scdgm model inside a downloaded pyfunc model (`artifacts/model_dir/`, see pipelines.pyfunc), or
    `root` itself when it is a model directory."""
    for candidate in (root / "artifacts" / MODEL_DIR_ARTIFACT, root):
        if is_model_directory(candidate):
            return candidate
    raise ScdgmError(
        f"{root}: neither a scdgm pyfunc model (no artifacts/{MODEL_DIR_ARTIFACT}/) nor a model directory"
    )


def resolve_model(uri: str, tracking_uri: str | None = None, cache_dir: str | Path | None = None) -> ResolvedModel:
    """Turn `uri` into a local model directory, downloading from MLflow when needed; errors are one line."""
    uri = uri.strip()
    if "://" not in uri and not uri.startswith(("models:/", "runs:/")):
        return _local_directory(uri)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    for pattern, resolver in ((REGISTERED_ALIAS, _registered), (REGISTERED_VERSION, _registered),
                              (LOGGED_MODEL, _logged_model), (RUN_ARTIFACT, _run_artifact)):
        match = pattern.match(uri)
        if match:
            return resolver(uri, match.groupdict(), tracking_uri, cache)
    raise ScdgmError(f"--model-uri {uri!r}: unsupported form; give {URI_FORMS}")


def _local_directory(uri: str) -> ResolvedModel:
    path = Path(uri).expanduser().resolve()
    if not path.exists():
        raise ScdgmError(f"--model-uri {uri}: no such directory")
    if not is_model_directory(path):
        raise ScdgmError(f"--model-uri {uri}: not a scdgm model directory (needs {', '.join(MODEL_FILES)})")
    return ResolvedModel(directory=path, name=path.name, version=None, uri=str(path))


def _client(tracking_uri: str | None) -> tuple[MlflowClient, str]:
    """A client on `tracking_uri` (the project's store by default), checked to answer, and its URI."""
    uri = tracking_uri or stores.tracking_uri()
    stores.ensure_reachable(uri)
    return stores.client(uri), uri


def _registered(uri: str, parts: dict[str, str], tracking_uri: str | None, cache: Path) -> ResolvedModel:
    from mlflow.exceptions import MlflowException  # here: mlflow takes seconds to import; local models skip it

    mlflow_client, store = _client(tracking_uri)
    name = parts["name"]
    try:
        if "alias" in parts:
            version = mlflow_client.get_model_version_by_alias(name, parts["alias"]).version
        else:
            version = mlflow_client.get_model_version(name, parts["version"]).version
    except MlflowException as exc:
        raise ScdgmError(f"{uri}: not found in the MLflow registry at {store} ({_first_line(exc)})") from None
    target = cache / "registered" / _store_key(store) / _safe(name) / str(version)
    directory = _download(f"models:/{name}/{version}", store, target)
    return ResolvedModel(directory=directory, name=name, version=str(version), uri=uri)


def _logged_model(uri: str, parts: dict[str, str], tracking_uri: str | None, cache: Path) -> ResolvedModel:
    _, store = _client(tracking_uri)
    directory = _download(uri, store, cache / "logged" / _store_key(store) / parts["model_id"])
    return ResolvedModel(directory=directory, name=parts["model_id"], version=None, uri=uri)


def _run_artifact(uri: str, parts: dict[str, str], tracking_uri: str | None, cache: Path) -> ResolvedModel:
    _, store = _client(tracking_uri)
    directory = _download(uri, store, cache / "runs" / _store_key(store) / parts["run_id"] / _safe(parts["path"]))
    return ResolvedModel(directory=directory, name=parts["path"].strip("/"), version=parts["run_id"], uri=uri)


def _download(artifact_uri: str, store: str, target: Path) -> Path:
    """The model directory of `artifact_uri`, downloaded once and renamed into place as `target`."""
    if is_model_directory(target):
        return target
    import mlflow  # here: mlflow takes seconds to import; local models skip it
    from mlflow.exceptions import MlflowException

    # Not scdgm.files.atomic_path: the model directory lies somewhere inside the download, and only that
    # folder is renamed into place (a concurrent worker's finished copy is kept, never replaced).
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(staging), tracking_uri=store)
        os.replace(find_model_directory(Path(local)), target)
    except MlflowException as exc:
        raise ScdgmError(f"{artifact_uri}: cannot download it from {store} ({_first_line(exc)})") from None
    except OSError:
        if not is_model_directory(target):  # a concurrent worker that finished first is fine; anything else is not
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:300]
