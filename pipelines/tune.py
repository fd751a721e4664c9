"""`scdgm tune`: sweep settings from params.yaml (`tune:`) and the command line, search-space validation, and
the command that runs the sweep (the Ray/Optuna machinery and SweepSettings live in pipelines.sweep).

Paths in params.yaml (`data.prepared`, `tune.out`, `tune.results_dir`) are taken from the project folder;
paths given on the command line from the working directory, as the shell does.

A search space (`tune.spaces.<model>`) maps each hyperparameter to `[loguniform|uniform|int|logint, low,
high]`, `[choice, v1, v2, ...]` or a fixed value.
"""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer

from scdgm.errors import ScdgmError, Terminated
from scdgm.models import MODEL_KINDS, model_class
from scdgm.pipelines import tracking
from scdgm.pipelines.compare import METRICS
from scdgm.pipelines.config import apply_overrides, load_params
from scdgm.pipelines.sweep import SweepInterrupted, SweepSettings, comparison_table, run_sweep
from scdgm.pipelines.train import model_params
from scdgm.project import project_path

DISTRIBUTIONS = ("loguniform", "uniform", "int", "logint", "choice")


def check_space(kind: str, space: Any) -> dict[str, Any]:
    """Validate model `kind`'s search space; the error names the offending entry."""
    if not isinstance(space, dict) or not space:
        raise ScdgmError(f"tune.spaces.{kind}: expected a mapping of hyperparameter: [distribution, ...]")
    for name, entry in space.items():
        if not isinstance(entry, list):
            continue
        where = f"tune.spaces.{kind}.{name}"
        if not entry or entry[0] not in DISTRIBUTIONS:
            raise ScdgmError(f"{where}: the first element must be one of {', '.join(DISTRIBUTIONS)}; got {entry}")
        if entry[0] == "choice":
            if len(entry) < 2:
                raise ScdgmError(f"{where}: choice needs at least one value")
            continue
        if len(entry) != 3 or not all(isinstance(v, (int, float)) for v in entry[1:]) or entry[1] > entry[2]:
            raise ScdgmError(f"{where}: expected [{entry[0]}, low, high] with low <= high; got {entry}")
        if entry[0] in ("loguniform", "logint") and entry[1] <= 0:
            raise ScdgmError(f"{where}: a log scale needs low > 0; got {entry}")
    if not any(isinstance(v, list) for v in space.values()):
        raise ScdgmError(f"tune.spaces.{kind}: nothing to search (every entry is a fixed value)")
    return space


BUDGET_KEYS = ("num_samples", "max_epochs", "grace_period")


def check_budgets(budgets: Any, models: list[str], options: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Validate `tune.budgets` (model -> overrides of num_samples, max_epochs, grace_period); a budget given on the
    command line (--num-samples, --max-epochs) applies to every model, so it replaces the per-model ones."""
    if not isinstance(budgets, dict):
        raise ScdgmError("tune.budgets: expected a mapping of model: {num_samples, max_epochs, grace_period}")
    checked = {}
    for kind, budget in budgets.items():
        if kind not in MODEL_KINDS:
            raise ScdgmError(f"tune.budgets.{kind}: not a model; choose from {', '.join(MODEL_KINDS)}")
        if not isinstance(budget, dict) or set(budget) - set(BUDGET_KEYS):
            raise ScdgmError(f"tune.budgets.{kind}: expected a mapping with keys among {', '.join(BUDGET_KEYS)}")
        for key, value in budget.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ScdgmError(f"tune.budgets.{kind}.{key}: expected a whole number >= 1, got {value!r}")
        if kind in models:
            checked[kind] = {k: v for k, v in budget.items() if options.get(k) is None}
    return checked


def check_select(select: Any) -> dict[str, Any]:
    """Validate `tune.select`, the rule that picks the champion family: metric, mode, tie_break, tolerance."""
    names = [m.name for m in METRICS]
    if not isinstance(select, dict) or set(select) - {"metric", "mode", "tie_break", "tolerance"}:
        raise ScdgmError("tune.select: expected a mapping with keys among metric, mode, tie_break, tolerance")
    if select.get("metric", names[0]) not in names:
        raise ScdgmError(f"tune.select.metric: {select['metric']!r} is not a compared metric; choose from {', '.join(names)}")
    if select.get("tie_break") not in (None, *names):
        raise ScdgmError(f"tune.select.tie_break: {select['tie_break']!r} is not a compared metric; choose from {', '.join(names)}")
    if select.get("mode", "max") not in ("max", "min"):
        raise ScdgmError(f"tune.select.mode: expected max or min, got {select['mode']!r}")
    tolerance = select.get("tolerance", 0.0)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0:
        raise ScdgmError(f"tune.select.tolerance: expected a number >= 0, got {tolerance!r}")
    return dict(select)


def _in_project(path: str | Path) -> str:
    """A path from params.yaml, absolute: relative ones are taken from the project folder."""
    return str(project_path(path).resolve())


def _from_cwd(path: str | Path | None) -> str | None:
    """A path from the command line, absolute: relative ones are taken from the working directory."""
    return None if path is None or str(path) == "" else str(Path(path).resolve())


def settings_from_params(params: dict[str, Any], **options: Any) -> SweepSettings:
    """Merge params.yaml's `tune:` section with command-line options (options win; None means not given;
    relative paths, from either, are taken from the project folder: the command resolves its own options
    first). Hyperparameters not searched come from the train section, as `scdgm train` reads them."""
    section = dict(params.get("tune") or {})
    section.update({k: v for k, v in options.items() if v is not None and v != ""})
    models = section.pop("models", None)
    if isinstance(models, str):
        models = [m.strip() for m in models.split(",") if m.strip()]
    if not models:
        raise ScdgmError("no model to tune: pass --model (e.g. --model ldvae) or set tune.models in params.yaml")
    unknown = [m for m in models if m not in MODEL_KINDS]
    if unknown:
        raise ScdgmError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODEL_KINDS)}")
    data = section.pop("data", None) or (params.get("data") or {}).get("prepared")
    if not data:
        raise ScdgmError("no data: pass --data PREPARED.h5ad")
    dataset = (params.get("data") or {}).get("dataset", "sweep")
    name = section.pop("name", None) or f"{dataset}-{'-'.join(models)}"
    known = {f.name for f in fields(SweepSettings)} - {"models", "data", "name", "model_params", "explain"}
    unknown_keys = sorted(set(section) - known)
    if unknown_keys:
        raise ScdgmError(f"tune: unknown setting(s) {', '.join(unknown_keys)}; valid: {', '.join(sorted(known))}")
    for key in ("results_dir", "out"):
        if section.get(key):
            section[key] = _in_project(section[key])
    if not section.get("storage"):
        section.pop("storage", None)
    section.setdefault("seed", params.get("seed", 0))
    section["budgets"] = check_budgets(section.get("budgets") or {}, models, options)
    section["select"] = check_select(section.get("select") or {})
    section.setdefault("experiment", tracking.experiment_name(params))
    settings = SweepSettings(
        models=list(models),
        data=_in_project(data),
        name=str(name),
        model_params={kind: model_params(kind, params) for kind in models},
        explain=dict(params.get("explain") or {}),
        **section,
    )
    if min(settings.num_samples, settings.max_concurrent, settings.max_epochs, settings.grace_period) < 1:
        raise ScdgmError("num_samples, max_concurrent, max_epochs and grace_period must be at least 1")
    if settings.startup_trials < 0:
        raise ScdgmError(f"tune.startup_trials must be >= 0, got {settings.startup_trials}")
    if settings.cpus_per_trial <= 0 or settings.gpus_per_trial < 0:
        raise ScdgmError("cpus_per_trial must be positive and gpus_per_trial not negative")
    if not isinstance(settings.reuse_actors, bool):
        raise ScdgmError(f"tune.reuse_actors must be true or false, got {settings.reuse_actors!r}")
    for kind in models:
        if kind not in settings.spaces:
            raise ScdgmError(f"no search space for {kind}: add tune.spaces.{kind} to params.yaml")
        check_space(kind, settings.spaces[kind])
        model_class(kind).from_params(settings.fixed_params(kind))  # every fixed value is valid for the model
        known = {f.name for f in fields(model_class(kind).Config)}
        stray = sorted(set(settings.spaces[kind]) - known)
        if stray:
            raise ScdgmError(f"tune.spaces.{kind}: {', '.join(stray)} is not a hyperparameter of {kind}")
    return settings


def tune_command(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model(s) to tune, comma-separated, e.g. ldvae,vae (params.yaml: tune.models).")] = None,
    data: Annotated[Path | None, typer.Option(help="Prepared .h5ad (params.yaml: data.prepared).")] = None,
    num_samples: Annotated[int | None, typer.Option(help="Trials per model (params.yaml: tune.num_samples).")] = None,
    max_concurrent: Annotated[int | None, typer.Option(help="Trials running at once (params.yaml: tune.max_concurrent).")] = None,
    max_epochs: Annotated[int | None, typer.Option(help="Epochs per trial at most; ASHA's max_t (params.yaml: tune.max_epochs).")] = None,
    cpus_per_trial: Annotated[float | None, typer.Option(help="CPUs reserved per trial.")] = None,
    gpus_per_trial: Annotated[float | None, typer.Option(help="GPUs per trial; a fraction shares a GPU (0.5: two trials per GPU).")] = None,
    address: Annotated[str | None, typer.Option(help="Join this Ray cluster (HOST:PORT, or 'auto') instead of starting Ray here.")] = None,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of the local Ray instance (default: all available).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted sweep of this name.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start an existing sweep of this name over.")] = False,
    name: Annotated[str | None, typer.Option(help="Sweep name = Optuna study = Ray experiment folder (default: <dataset>-<models>).")] = None,
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL: sqlite:///PATH or postgresql://USER@HOST:PORT/DB (default: sqlite:///<project>/optuna.db).")] = None,
    out: Annotated[str | None, typer.Option(help="Folder for best.json, best_params.yaml, comparison table, plots and refitted models (default: <project>/reports/tune).")] = None,
    results_dir: Annotated[str | None, typer.Option(help="Ray's results folder; shared storage on a multi-machine cluster (default: <project>/ray_results).")] = None,
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment (params.yaml: tracking.experiment).")] = None,
    params: Annotated[Path | None, typer.Option("--params", help="params.yaml to read (the project's by default).")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Override a parameter, e.g. --set tune.grace_period=3.")] = None,
) -> None:
    """Tune hyperparameters: Optuna TPE proposes, Ray Tune runs trials, ASHA prunes; each trial is an MLflow run.

    Ctrl+C or SIGTERM stops the sweep (exit 130 / 143) with every run and trial closed; --resume continues it."""
    if resume and overwrite:
        raise ScdgmError("--resume and --overwrite exclude each other")
    if params is not None and not params.is_file():
        raise ScdgmError(f"params file not found: {params}")
    settings = settings_from_params(
        apply_overrides(load_params(params), overrides),
        models=model,
        data=_from_cwd(data),
        num_samples=num_samples,
        max_concurrent=max_concurrent,
        max_epochs=max_epochs,
        cpus_per_trial=cpus_per_trial,
        gpus_per_trial=gpus_per_trial,
        address=address,
        num_cpus=num_cpus,
        name=name,
        storage=storage,
        out=_from_cwd(out),
        results_dir=_from_cwd(results_dir),
        experiment=experiment,
    )
    try:
        outcome = run_sweep(settings, resume=resume, overwrite=overwrite)
    except SweepInterrupted as exc:
        raise Terminated(exc.signum, f"{exc}; continue it with the same command plus --resume") from None
    typer.echo(comparison_table(outcome.models, settings.metric).to_string(float_format=lambda v: f"{v:.4g}"))
    if outcome.champion is not None:
        typer.echo(f"champion: {outcome.champion.champion}: {outcome.champion.reason}")
    for note in outcome.notes:
        typer.echo(f"note: {note}", err=True)
    for kind, result in outcome.models.items():
        if result.errors:
            typer.echo(f"{kind}: {result.failed} trial(s) failed, e.g. {result.errors[0]}", err=True)
    typer.echo(
        f"sweep {outcome.name} done in {outcome.seconds:.0f} s; best parameters: {Path(outcome.out) / 'best_params.yaml'}; "
        f"MLflow sweep run {outcome.parent_run_id}"
    )
