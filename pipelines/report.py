"""`scdgm report`: the short summary printed at the end of `make demo`: test metrics, the sweep's comparison
table, the figures in the project's reports/, the registered model, and how to open the MLflow UI and Optuna's dashboard
and how to start serving. It only reads files, so it is instant."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from scdgm.errors import ScdgmError
from scdgm.formats import METRICS_FILE
from scdgm.pipelines import tracking
from scdgm.pipelines.config import load_params
from scdgm.project import REPORTS, optuna_storage, project_path
from scdgm.stores import normalize_database_url

FIGURE_SUFFIXES = (".png", ".svg", ".pdf", ".html")


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ScdgmError(f"{path}: not valid JSON ({exc.msg})") from None


def _flat_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flat_metrics(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _format_metrics(metrics: dict[str, Any]) -> list[str]:
    flat = _flat_metrics(metrics)
    width = max(map(len, flat), default=0)
    return [f"  {k:<{width}}  {v:.4g}" if isinstance(v, float) else f"  {k:<{width}}  {v}" for k, v in flat.items()]


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def build_report(reports: Path, params: dict[str, Any]) -> str:
    """The report text for the outputs under `reports`."""
    lines = [f"scdgm report ({_display(reports)})", ""]
    metrics = _read_json(reports / METRICS_FILE)
    if metrics:
        lines += ["Test metrics:", *_format_metrics(metrics), ""]
    comparison = reports / "tune" / "comparison.md"
    if comparison.is_file():
        lines += ["Sweep: each family's best model compared on the test cells, and the champion:",
                  comparison.read_text().rstrip(), ""]
    figures = sorted(p for p in reports.rglob("*") if p.suffix in FIGURE_SUFFIXES and "models" not in p.parts)
    if figures:
        lines += ["Figures:", *(f"  {_display(p)}" for p in figures), ""]
    uri = tracking.tracking_uri()
    if uri.startswith(("http://", "https://")):
        lines += ["MLflow UI:", f"  open {uri}"]
    else:
        lines += ["MLflow UI:", f"  mlflow ui --backend-store-uri {uri} --port 5000   # then open http://127.0.0.1:5000"]
    storage = normalize_database_url((params.get("tune") or {}).get("storage") or optuna_storage())
    lines += ["Optuna dashboard:", f"  optuna-dashboard {storage} --port 8080   # then open http://127.0.0.1:8080"]
    registered = _read_json(reports / "registered.json")
    if registered:
        lines += ["Registered model:", f"  {registered['name']} version {registered['version']}"
                  + (f" ({registered['candidate_uri']})" if registered.get("candidate_uri") else "")]
        if registered.get("decision"):
            moved = "moved to" if registered.get("promoted") else "stays on"
            lines.append(f"  {registered['model_uri']} {moved} version {registered['champion_version']}: "
                         f"{registered['decision']['reason']}")
        lines += [
            "Serve it:",
            f"  scdgm serve --model-uri {registered['model_uri']}",
        ]
    else:
        register = params.get("register") or {}
        uri = f"models:/{register.get('name') or 'NAME'}@{register.get('alias') or 'champion'}"
        lines += ["Serve a registered model:", f"  scdgm serve --model-uri {uri}"]
    return "\n".join(lines)


def report_command(
    reports: Annotated[Path | None, typer.Option(help="Folder the pipeline wrote its reports to [default: <project>/reports].")] = None,
    params: Annotated[Path | None, typer.Option("--params", help="params.yaml to read (the project's by default).")] = None,
) -> None:
    """Summarise the pipeline's results: metrics, comparison table, figures, dashboards and serving."""
    reports = reports or project_path(REPORTS)
    if not reports.is_dir():
        raise ScdgmError(f"{reports}: no reports yet; run `dvc repro` (or `make demo`) first")
    typer.echo(build_report(reports, load_params(params)))
