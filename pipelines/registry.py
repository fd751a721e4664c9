"""`scdgm register`: put a run's model into the MLflow Model Registry and move an alias (e.g. `champion`) to
the new version, so `models:/NAME@ALIAS` resolves to it (serving loads exactly that URI).

From `--run-id` it registers the run's newest logged pyfunc called `model` (`--artifact`). From `--model DIR` (a model
directory trained with tracking) it first logs DIR as it is now, with its explanation (DIR/explanation, or
the folder given by --explanation) attached, as a new pyfunc of the run that trained it, then registers that. Inside a registered model the scdgm model directory is
`artifacts/model_dir/` (config.json, genes.txt, weights.safetensors, explanation/...).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from scdgm.errors import ScdgmError
from scdgm.files import write_json_atomic
from scdgm.pipelines import tracking
from scdgm.pipelines.config import load_params


@dataclass
class Registration:
    """A registered model version and the alias now pointing at it."""

    name: str
    version: str
    alias: str
    model_uri: str
    source: str
    run_id: str
    tracking_uri: str


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def latest_logged_model(run: Any, name: str) -> str:
    """URI (`models:/<model id>`) of the newest model called `name` that `run` logged."""
    import mlflow

    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{name}'",
        order_by=[{"field_name": "creation_time", "ascending": False}],
        max_results=1,
        output_format="list",
    )
    if not models:
        raise ScdgmError(f"run {run.info.run_id} logged no model named {name!r}")
    return models[0].model_uri


def register(
    name: str,
    alias: str = "champion",
    run_id: str | None = None,
    model_dir: str | Path | None = None,
    artifact: str = tracking.MODEL_ARTIFACT,
    explanation: str | Path | None = None,
) -> Registration:
    """Register the model of run `run_id` (or the current state of `model_dir`) as a new version of `name`
    and point `alias` at it; checks that `models:/name@alias` resolves to that version."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if (run_id is None) == (model_dir is None):
        raise ScdgmError("give exactly one of --run-id and --model")
    if explanation is not None and model_dir is None:
        raise ScdgmError("--explanation goes with --model (a run's logged model is registered as it is)")
    if model_dir is not None:
        record = tracking.RunRecord.read(model_dir)
        uri, run_id = record.tracking_uri, record.run_id
    else:
        uri = tracking.tracking_uri()
    tracking.ensure_reachable(uri)
    mlflow_client = tracking.client(uri)
    try:
        run = mlflow_client.get_run(run_id)
    except MlflowException as exc:
        raise ScdgmError(f"run {run_id} not found in {uri} ({_one_line(exc)})") from None
    if model_dir is not None:
        if explanation is not None:
            tracking.log_folder_files(mlflow_client, run_id, explanation, "model_files/explanation")
        source = tracking.log_pyfunc_model(run_id, model_dir, artifact, explanation)
    else:
        source = latest_logged_model(run, artifact)
    tags = {"run_id": run_id, **{k: v for k, v in run.data.tags.items() if k in (tracking.TAG_KIND, tracking.TAG_COMMIT)}}
    try:
        version = mlflow.register_model(source, name, tags=tags)
        mlflow_client.set_registered_model_alias(name, alias, version.version)
        resolved = mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise ScdgmError(f"registering {source} as {name!r} failed: {_one_line(exc)}") from None
    if resolved.version != version.version:
        raise ScdgmError(f"models:/{name}@{alias} resolves to version {resolved.version}, not {version.version}")
    return Registration(name, str(version.version), alias, f"models:/{name}@{alias}", source, run_id, uri)


def register_command(
    name: Annotated[str | None, typer.Option(help="Registered model name, e.g. pbmc3k-ldvae (default: params.yaml register.name).")] = None,
    run_id: Annotated[str | None, typer.Option(help="Register this run's logged model.")] = None,
    model: Annotated[Path | None, typer.Option("--model", help="Model directory trained with tracking (logged afresh, explanation included).")] = None,
    explanation: Annotated[Path | None, typer.Option(help="Explanation folder to attach (default: MODEL/explanation when present).")] = None,
    alias: Annotated[str | None, typer.Option(help="Alias moved to the new version (default: params.yaml register.alias).")] = None,
    artifact: Annotated[str, typer.Option(help="Name of the logged model in the run (sweeps of several models: model-<kind>).")] = tracking.MODEL_ARTIFACT,
    out: Annotated[Path | None, typer.Option(help="Also write the registration as JSON here.")] = None,
) -> None:
    """Register a run's model in the MLflow Model Registry and point an alias (e.g. champion) at it."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    section = load_params().get("register") or {}
    name, alias = name or section.get("name"), alias or section.get("alias")
    if not name or not alias:
        raise ScdgmError("no model name or alias: pass --name and --alias, or set register.name and register.alias")
    registration = register(name, alias, run_id=run_id, model_dir=model, artifact=artifact, explanation=explanation)
    if out is not None:
        write_json_atomic(out, asdict(registration))
    typer.echo(
        f"registered {registration.source} as {registration.name} version {registration.version}; "
        f"{registration.model_uri} -> version {registration.version}"
    )
