"""MLflow tracking: where runs go, what a run records (params, per-epoch metrics, lineage, artifacts, tags,
the model as pyfunc) and the record a model directory keeps of the run that produced it.

The store is SQLite at an absolute path inside the project (`sqlite:///<project>/mlflow.db`, artifacts in
`<project>/mlartifacts`) unless MLFLOW_TRACKING_URI names another store or a tracking server. Paths are
absolute so Ray trials (which run in other working directories) and DVC stages all write to one store.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import yaml

import scdgm
from scdgm.errors import ScdgmError, Terminated, uninterrupted
from scdgm.files import write_json_atomic
from scdgm.formats import RUN_RECORD, WEIGHTS_FILE
from scdgm.pipelines import pyfunc
from scdgm.pipelines.config import flatten
from scdgm.project import MLFLOW_ARTIFACTS, project_dir, project_path
from scdgm.stores import client, database_writes, tracking_uri
from scdgm.stores import ensure_reachable as ensure_reachable  # re-exported: the jobs check the store through here

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from scdgm.models.base import EpochCallback

DEFAULT_EXPERIMENT = "scdgm"
MODEL_ARTIFACT = "model"
"""Name of the logged pyfunc model in a run: `runs:/<run id>/model`."""
SKIPPED_MODEL_FILES = {WEIGHTS_FILE, RUN_RECORD}
"""Files of a model directory not logged as plain run artifacts (the weights travel inside the pyfunc model)."""
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
EPOCH_METRIC_PREFIXES = ("train_", "validation_")
"""Per-epoch metric names start with these (then the loss term); `lr` is logged per epoch too."""
SERVER_SCHEMES = ("http", "https", "databricks")

# Tag names, shared by train runs, sweep parents and trials.
TAG_KIND = "scdgm.model_kind"
TAG_COMMIT = "mlflow.source.git.commit"
TAG_DIRTY = "scdgm.git_dirty"
TAG_VERSION = "scdgm.version"
TAG_ROLE = "scdgm.role"
TAG_SWEEP = "scdgm.sweep"
TAG_TRIAL = "ray.trial_id"
TAG_PRUNED = "scdgm.pruned"


def experiment_name(params: dict[str, Any] | None = None) -> str:
    """The MLflow experiment: MLFLOW_EXPERIMENT_NAME, else params.yaml's `tracking.experiment`, else 'scdgm'."""
    section = (params or {}).get("tracking") or {}
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or section.get("experiment") or DEFAULT_EXPERIMENT


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: next to a SQLite file, `<project>/mlartifacts` for other local
    databases, and whatever the server decides (None) for a tracking server."""
    scheme = urlparse(uri).scheme
    if scheme in SERVER_SCHEMES:
        return None
    if scheme == "sqlite":
        return str(Path(uri[len("sqlite:///"):]).parent / MLFLOW_ARTIFACTS)
    return str(project_path(MLFLOW_ARTIFACTS))


def experiment_id(name: str, uri: str | None = None) -> str:
    """Id of experiment `name`, created (with the project's artifact location) when missing."""
    uri = uri or tracking_uri()
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise ScdgmError(f"MLflow experiment {name!r} is deleted; restore it or choose another name")
        return experiment.experiment_id
    try:
        return mlflow_client.create_experiment(name, artifact_location=artifact_location(uri))
    except Exception:  # noqa: BLE001 - another process created it between our lookup and create
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def lineage_tags() -> dict[str, str]:
    """The scdgm version, and the user's project commit with whether its working tree differs from it (when
    the project is in a git repository; git runs in the project folder, never in scdgm's own)."""
    tags = {TAG_VERSION: scdgm.__version__}
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}  # no inherited GIT_DIR

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=project_dir(), env=environment, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--verify", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return tags
    return {**tags, TAG_COMMIT: commit, TAG_DIRTY: str(dirty).lower()}


@dataclass
class DataLineage:
    """Which data a run used: absolute path, content hash (and where the hash came from) and shape."""

    path: str
    md5: str
    md5_source: str
    n_obs: int
    n_vars: int

    def params(self) -> dict[str, Any]:
        """The lineage as run parameters (`data.*`)."""
        return {f"data.{k}": v for k, v in asdict(self).items()}


def _file_md5(path: Path) -> str:
    digest = hashlib.md5()  # noqa: S324 - a content fingerprint, as DVC uses, not security
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dvc_recorded_outs() -> Iterator[tuple[Path, dict[str, Any]]]:
    """(absolute path, out entry) of every output recorded in dvc.lock and in *.dvc files of data/."""
    lock = project_dir() / "dvc.lock"
    if lock.exists():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for stage in stages.values():
            for out in stage.get("outs", []) or []:
                yield (project_dir() / out["path"]).resolve(), out
    for dvc_file in (project_dir() / "data").rglob("*.dvc") if (project_dir() / "data").exists() else []:
        for out in (yaml.safe_load(dvc_file.read_text()) or {}).get("outs", []) or []:
            yield (dvc_file.parent / out["path"]).resolve(), out


def dataset_lineage(path: str | Path, n_obs: int, n_vars: int) -> DataLineage:
    """Lineage of the data file at `path`: DVC's recorded md5 when DVC tracks this very file (same size),
    else an md5 computed here."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ScdgmError(f"{path}: data file not found")
    size = path.stat().st_size
    try:
        for out_path, out in _dvc_recorded_outs():
            if out_path == path and out.get("md5") and out.get("size") == size:
                return DataLineage(str(path), str(out["md5"]), "dvc", n_obs, n_vars)
    except (yaml.YAMLError, KeyError, TypeError, AttributeError):
        pass  # an unreadable DVC record is no lineage; fall back to hashing the file
    return DataLineage(str(path), _file_md5(path), "computed", n_obs, n_vars)


def log_lineage(mlflow_client: MlflowClient, run_id: str, lineage: DataLineage) -> None:
    """Record the data as run params and as an MLflow dataset input (name, digest, local source path)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    log_params(mlflow_client, run_id, lineage.params())
    dataset = Dataset(
        name=Path(lineage.path).stem,
        digest=lineage.md5[:36],
        source_type="local",
        source=json.dumps({"uri": lineage.path}),
        profile=json.dumps({"n_obs": lineage.n_obs, "n_vars": lineage.n_vars}),
    )
    mlflow_client.log_inputs(run_id, [DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, "training")])])


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:6000]


def log_params(mlflow_client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Log a (nested) configuration as flattened, dotted params, in batches MLflow accepts."""
    from mlflow.entities import Param

    items = [Param(k, _param_value(v)) for k, v in sorted(flatten(params).items())]
    for start in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[start : start + 100])


def log_metrics(mlflow_client: MlflowClient, run_id: str, metrics: dict[str, Any], step: int = 0) -> None:
    """Log the finite numeric entries of `metrics` at `step` in one call."""
    import math

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
    ]
    for start in range(0, len(items), 1000):
        mlflow_client.log_batch(run_id, metrics=items[start : start + 1000])


def log_final_metrics(mlflow_client: MlflowClient, run_id: str, metrics: dict[str, Any]) -> None:
    """Log training's final metrics; the best epoch's losses become `best_<name>`, so the per-epoch history
    of `<name>` stays one value per epoch."""
    renamed = {(f"best_{k}" if k.startswith(EPOCH_METRIC_PREFIXES) else k): v for k, v in metrics.items()}
    log_metrics(mlflow_client, run_id, renamed)


def epoch_logger(mlflow_client: MlflowClient, run_id: str) -> EpochCallback:
    """An epoch callback logging every per-epoch metric (loss terms on train and validation, lr) at step=epoch."""
    def log_epoch(epoch: int, metrics: dict[str, float]) -> None:
        log_metrics(mlflow_client, run_id, {k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)

    return log_epoch


def log_folder_files(mlflow_client: MlflowClient, run_id: str, folder: str | Path, artifact_path: str) -> None:
    """Log the files of a model directory or explanation folder (metrics.json, plots, loadings.csv,
    explanation.json...) as run artifacts under `artifact_path`; weights travel inside the pyfunc model."""
    folder = Path(folder)
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in SKIPPED_MODEL_FILES):
        relative = path.relative_to(folder).parent
        mlflow_client.log_artifact(run_id, str(path), artifact_path=str(Path(artifact_path) / relative))


@dataclass
class RunRecord:
    """What a model directory remembers of the run that produced it (written as mlflow_run.json)."""

    tracking_uri: str
    experiment_id: str
    run_id: str
    model_uri: str | None = None

    def write(self, model_dir: str | Path) -> None:
        """Write the record into `model_dir` atomically."""
        write_json_atomic(Path(model_dir) / RUN_RECORD, asdict(self))

    @staticmethod
    def read(model_dir: str | Path) -> RunRecord:
        """The record of `model_dir`; a clear error when the model was trained without tracking."""
        path = Path(model_dir) / RUN_RECORD
        if not path.exists():
            raise ScdgmError(f"{model_dir}: no {RUN_RECORD}; this model was not trained as an MLflow run")
        try:
            return RunRecord(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise ScdgmError(f"{path}: unreadable run record ({exc})") from None


def log_pyfunc_model(
    run_id: str, model_dir: str | Path, name: str = MODEL_ARTIFACT, explanation: str | Path | None = None
) -> str:
    """Log `model_dir` (with `explanation` attached) as a pyfunc model of run `run_id`, quietly; returns its
    `models:/<model id>` URI."""
    import mlflow

    pyfunc_logger = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_logger.level
    pyfunc_logger.setLevel(logging.ERROR)  # silences the cloudpickle notice: our class is pickled by reference
    try:
        with database_writes(mlflow.get_tracking_uri()), mlflow.start_run(run_id=run_id, log_system_metrics=False):
            return pyfunc.log_pyfunc(model_dir, name, explanation)
    finally:
        pyfunc_logger.setLevel(level)


class TrainingRun:
    """One tracked training: params, lineage and tags at the start, per-epoch metrics while training, then
    final metrics, the model directory's reports and the model as pyfunc. Ends FINISHED, or FAILED on error."""

    def __init__(self, mlflow_client: MlflowClient, run_id: str, uri: str) -> None:
        self.client = mlflow_client
        self.run_id = run_id
        self.uri = uri
        self.epoch_callback = epoch_logger(mlflow_client, run_id)

    def finish(self, model_dir: str | Path, metrics: dict[str, Any]) -> RunRecord:
        """Log final metrics, the model directory's reports and the pyfunc model; write the record into it."""
        log_final_metrics(self.client, self.run_id, metrics)
        log_folder_files(self.client, self.run_id, model_dir, "model_files")
        model_uri = log_pyfunc_model(self.run_id, model_dir)
        run = self.client.get_run(self.run_id)
        record = RunRecord(self.uri, run.info.experiment_id, self.run_id, model_uri)
        record.write(model_dir)
        return record


def start_run(
    mlflow_client: MlflowClient,
    experiment: str,
    run_name: str | None,
    tags: dict[str, str],
    parent_run_id: str | None = None,
) -> str:
    """Open a run and return its id: nested under `parent_run_id` (in the parent's experiment), else the run
    that `mlflow run` opened for this process (MLFLOW_RUN_ID), else a new run in `experiment`."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    tags = dict(tags)
    if run_name:
        tags[MLFLOW_RUN_NAME] = run_name
    if parent_run_id:
        parent = mlflow_client.get_run(parent_run_id)
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        return mlflow_client.create_run(parent.info.experiment_id, tags=tags, run_name=run_name).info.run_id
    adopted = os.environ.get("MLFLOW_RUN_ID")
    if adopted:
        for key, value in tags.items():
            mlflow_client.set_tag(adopted, key, value)
        return adopted
    uri = mlflow_client.tracking_uri
    return mlflow_client.create_run(experiment_id(experiment, uri), tags=tags, run_name=run_name).info.run_id


def end_status(error: BaseException | None) -> str:
    """The status a run ends with: FINISHED without `error`, KILLED when the process was stopped (a signal,
    Ctrl+C, SystemExit as Ray raises in a worker it stops), FAILED on any other error."""
    if error is None:
        return "FINISHED"
    return "KILLED" if isinstance(error, (Terminated, KeyboardInterrupt, SystemExit)) else "FAILED"


@contextmanager
def ending_run(mlflow_client: MlflowClient, open_run: Callable[[], str]) -> Iterator[str]:
    """Open a run with `open_run` and close it when the block ends, with `end_status` of how it ended (the error
    re-raised): never left RUNNING, also when a stop signal comes while the run opens (held until it is open)."""
    run_id = None
    try:
        with uninterrupted():
            run_id = open_run()
        yield run_id
    except BaseException as error:
        if run_id is not None:
            with uninterrupted():
                mlflow_client.set_terminated(run_id, end_status(error))
        raise
    with uninterrupted():
        mlflow_client.set_terminated(run_id, "FINISHED")


@contextmanager
def training_run(
    kind: str,
    config: dict[str, Any],
    lineage: DataLineage | None,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    uri: str | None = None,
) -> Iterator[TrainingRun]:
    """Open a run for training model `kind` with `config` logged as params (see `start_run` for where); it
    is closed FINISHED when the block succeeds, KILLED when a signal stops it, FAILED (then re-raised) when
    it raises: never left RUNNING."""
    uri = uri or tracking_uri()
    mlflow_client = client(uri)
    all_tags = {TAG_KIND: kind, TAG_ROLE: "train", **lineage_tags(), **(tags or {})}
    opening = partial(start_run, mlflow_client, experiment, run_name, all_tags, parent_run_id)
    with ending_run(mlflow_client, opening) as run_id:
        log_params(mlflow_client, run_id, {"model": kind, **config})
        if lineage is not None:
            log_lineage(mlflow_client, run_id, lineage)
        yield TrainingRun(mlflow_client, run_id, uri)


def close_open_runs(mlflow_client: MlflowClient, run_ids: list[str], status: str) -> None:
    """Set every run of `run_ids` still RUNNING (or SCHEDULED) to `status`; closed runs are left alone."""
    for run_id in run_ids:
        if mlflow_client.get_run(run_id).info.status not in TERMINAL_STATUSES:
            mlflow_client.set_terminated(run_id, status)


TAG_MODEL_RUN = "scdgm.model_run_id"
"""On a stage's own run (explain, evaluate, register): the run that trained the model it worked on."""


@contextmanager
def linked_run(record: RunRecord, role: str, tags: dict[str, str] | None = None) -> Iterator[tuple[MlflowClient, str]]:
    """(client, run id) of a new run for a later stage on the model of `record` (explain, evaluate, register),
    nested under the model's run and tagged with its id, so that a finished training run is never written to
    again; under `mlflow run` the run it opened (MLFLOW_RUN_ID) is adopted. Closed as `ending_run` says."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    ensure_reachable(record.tracking_uri)
    mlflow_client = client(record.tracking_uri)
    all_tags = {TAG_ROLE: role, TAG_MODEL_RUN: record.run_id, MLFLOW_PARENT_RUN_ID: record.run_id,
                **lineage_tags(), **(tags or {})}

    def open_run() -> str:
        adopted = os.environ.get("MLFLOW_RUN_ID")
        if not adopted:
            return mlflow_client.create_run(record.experiment_id, tags=all_tags, run_name=role).info.run_id
        for key, value in all_tags.items():
            mlflow_client.set_tag(adopted, key, value)
        return adopted

    with ending_run(mlflow_client, open_run) as run_id:
        yield mlflow_client, run_id
