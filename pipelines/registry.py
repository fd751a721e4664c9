"""`scdgm register`: put a model into the MLflow Model Registry as a candidate, and move the production alias
(e.g. `champion`) to it only on purpose, so `models:/NAME@ALIAS` (what serving loads) changes only then.

Every registration is a new version that takes the candidate alias (params.yaml `register.candidate_alias`).
The production alias (`--alias`, `register.alias`) moves to it when there is no champion yet, when the user
asks (`--force`), or when the promotion rule of the register: section passes: the version beats the current
champion on `promote_metric` (a key of `scdgm evaluate`'s metrics.json, given with --metrics) by more than
`min_delta` (higher for `promote_mode: max`, lower for min), both evaluated on the same cells (metrics.json's
`evaluated_on.cells` fingerprint; other cells, or a figure missing on either side: no promotion). The rule,
both figures, the decision and its reason are tags of the version (`scdgm.promotion.*`), params of the
registration's own MLflow run and fields of --out.

From `--run-id` it registers the run's newest logged pyfunc called `model` (`--artifact`). From `--model DIR` (a
model directory trained with tracking) it logs DIR as it is now, with its explanation (DIR/explanation, or
--explanation) attached, as the pyfunc of the registration run, then registers that. The registration run is
nested under the training run, which is never written to. Inside a registered model the scdgm model directory
is `artifacts/model_dir/` (config.json, genes.txt, weights.safetensors, explanation/...).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from scdgm.errors import ScdgmError
from scdgm.files import write_json_atomic
from scdgm.formats import RUN_RECORD
from scdgm.pipelines import tracking
from scdgm.pipelines.config import load_params
from scdgm.pipelines.pyfunc import explanation_folder
from scdgm.stores import database_writes

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

PROMOTION_MODES = ("max", "min")
TAG_METRIC = "scdgm.metric."
"""+ the rule's metric: the version's figure, as evaluated when it was registered."""
TAG_CELLS = "scdgm.evaluated_on"
"""Fingerprint of the cells the version's figure was computed on."""
TAG_PROMOTION = "scdgm.promotion."
"""+ rule, decision, reason, candidate_value, champion_version, champion_value."""
TAG_EXPLANATION_RUN = "scdgm.explanation_run_id"
TAG_REGISTRATION_RUN = "scdgm.registration_run_id"


@dataclass(frozen=True)
class PromotionRule:
    """A new version takes the production alias when its `promote_metric` (a dotted key of metrics.json)
    beats the champion's by more than `min_delta`: higher when `promote_mode` is max, lower when min."""

    promote_metric: str = "test.label_accuracy"
    promote_mode: str = "max"
    min_delta: float = 0.0

    @classmethod
    def from_params(cls, section: dict[str, Any]) -> PromotionRule:
        """The rule of params.yaml's register: section (missing keys take the defaults)."""
        defaults = cls()
        rule = cls(
            str(section.get("promote_metric", defaults.promote_metric)),
            str(section.get("promote_mode", defaults.promote_mode)),
            float(section.get("min_delta", defaults.min_delta)),
        )
        if rule.promote_mode not in PROMOTION_MODES:
            raise ScdgmError(f"register.promote_mode must be max or min, not {rule.promote_mode!r}")
        if not math.isfinite(rule.min_delta) or rule.min_delta < 0:
            raise ScdgmError(f"register.min_delta must be a number >= 0, not {rule.min_delta}")
        return rule

    def __str__(self) -> str:
        return f"{self.promote_metric} {self.promote_mode}, min_delta {self.min_delta:g}"

    def beats(self, candidate: float, champion: float) -> bool:
        """Whether `candidate` is better than `champion` by more than min_delta."""
        if self.promote_mode == "max":
            return candidate > champion + self.min_delta
        return candidate < champion - self.min_delta


@dataclass
class Evidence:
    """What a version was evaluated as: the rule's figure and the fingerprint of the evaluated cells."""

    value: float | None = None
    cells: str | None = None


@dataclass
class Decision:
    """Whether the new version takes the production alias, why, and the figures compared."""

    promoted: bool
    reason: str
    rule: str
    candidate_value: float | None
    champion_version: str | None
    """The version the alias pointed at before (None: there was none)."""
    champion_value: float | None

    def tags(self) -> dict[str, str]:
        """The decision as model-version tags (`scdgm.promotion.*`): decision (promoted or kept), reason, rule and
        the figures compared."""
        values = {"decision": "promoted" if self.promoted else "kept", **asdict(self)}
        values.pop("promoted")
        return {f"{TAG_PROMOTION}{k}": str(v) for k, v in values.items() if v is not None}


@dataclass
class Registration:
    """A registered model version, where the production alias points now, and the decision that put it there."""

    name: str
    version: str
    alias: str
    model_uri: str
    """models:/NAME@ALIAS: what production serves (this version only when promoted)."""
    champion_version: str
    candidate_uri: str
    promoted: bool
    decision: dict[str, Any]
    source: str
    run_id: str
    registration_run_id: str
    tracking_uri: str

    def summary(self) -> str:
        """Two lines: the new version, and where the production alias points and why."""
        moved = "moved to" if self.promoted else "stays on"
        return (f"registered {self.source} as {self.name} version {self.version} ({self.candidate_uri})\n"
                f"{self.model_uri} {moved} version {self.champion_version}: {self.decision['reason']}")


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and not isinstance(value, bool) else None


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


def metrics_evidence(path: Path, rule: PromotionRule, run_id: str, explanation_run_id: str | None) -> Evidence:
    """The rule's figure and the cells' fingerprint from evaluate's metrics.json at `path`, after checking that
    it evaluated this model (training run `run_id`) with this explanation."""
    try:
        document = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ScdgmError(f"metrics file not found: {path} (write it with `scdgm evaluate`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ScdgmError(f"{path}: not valid JSON ({exc})") from None
    evaluated = document.get("evaluated_on") if isinstance(document, dict) else None
    if not isinstance(evaluated, dict):
        raise ScdgmError(f"{path}: no evaluated_on section; evaluate the model again with `scdgm evaluate`")
    for key, expected, what in (("model_run_id", run_id, "model"), ("explanation_run_id", explanation_run_id, "explanation")):
        if evaluated.get(key) != expected:
            raise ScdgmError(f"{path} evaluated the {what} of run {evaluated.get(key)}, not of run {expected}: "
                             "evaluate what you register")
    value: Any = document
    for key in rule.promote_metric.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return Evidence(_number(value), evaluated.get("cells"))


def version_evidence(version: ModelVersion, rule: PromotionRule) -> Evidence:
    """What a registered version was evaluated as, from its tags."""
    return Evidence(_number(version.tags.get(TAG_METRIC + rule.promote_metric)), version.tags.get(TAG_CELLS))


def decide(rule: PromotionRule, candidate: Evidence, champion: ModelVersion | None, force: bool) -> Decision:
    """Apply the promotion rule to the candidate's evidence and the current champion (None: there is none)."""
    metric = rule.promote_metric
    if champion is None:
        return Decision(True, "no champion yet: the first version takes it", str(rule), candidate.value, None, None)
    held = version_evidence(champion, rule)
    version = str(champion.version)

    def decision(promoted: bool, reason: str) -> Decision:
        return Decision(promoted, reason, str(rule), candidate.value, version, held.value)

    if force:
        return decision(True, "--force (the rule was not applied)")
    if candidate.value is None:
        return decision(False, f"the candidate has no {metric} (pass --metrics with evaluate's metrics.json); "
                               "--force promotes it anyway")
    if held.value is None:
        return decision(False, f"champion version {version} has no recorded {metric}; --force promotes anyway")
    if candidate.cells is None or candidate.cells != held.cells:
        return decision(False, f"evaluated on other cells than champion version {version} "
                               f"({candidate.cells} vs {held.cells}): the figures are not comparable")
    figures = f"{metric} {candidate.value:.4g} vs champion version {version}'s {held.value:.4g}"
    if rule.beats(candidate.value, held.value):
        return decision(True, f"{figures}: better (rule: {rule})")
    return decision(False, f"{figures}: not better (rule: {rule})")


def current_version(mlflow_client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version `models:/name@alias` resolves to, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise ScdgmError(f"cannot read models:/{name}@{alias}: {_one_line(exc)}") from None


def _recorded_run(folder: Path | None) -> str | None:
    return tracking.RunRecord.read(folder).run_id if folder is not None and (folder / RUN_RECORD).is_file() else None


def register(
    name: str,
    alias: str = "champion",
    run_id: str | None = None,
    model_dir: str | Path | None = None,
    artifact: str = tracking.MODEL_ARTIFACT,
    explanation: str | Path | None = None,
    metrics: str | Path | None = None,
    rule: PromotionRule | None = None,
    force: bool = False,
    candidate_alias: str = "candidate",
) -> Registration:
    """Register the model of run `run_id` (or the current state of `model_dir`) as a new version of `name`
    with `candidate_alias`, and move `alias` to it when `rule` passes on `metrics` (see the module), there is
    no champion yet, or `force`."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if (run_id is None) == (model_dir is None):
        raise ScdgmError("give exactly one of --run-id and --model")
    if explanation is not None and model_dir is None:
        raise ScdgmError("--explanation goes with --model (a run's logged model is registered as it is)")
    if alias == candidate_alias:
        raise ScdgmError(f"the production alias and the candidate alias are both {alias!r}")
    rule = rule or PromotionRule()
    attached = None
    if model_dir is not None:
        record = tracking.RunRecord.read(model_dir)
        uri, run_id = record.tracking_uri, record.run_id
        attached = explanation_folder(Path(model_dir), explanation)
    else:
        uri = tracking.tracking_uri()
    tracking.ensure_reachable(uri)
    mlflow_client = tracking.client(uri)
    try:
        run = mlflow_client.get_run(run_id)
    except MlflowException as exc:
        raise ScdgmError(f"run {run_id} not found in {uri} ({_one_line(exc)})") from None
    explanation_run = _recorded_run(attached)
    candidate = metrics_evidence(Path(metrics), rule, run_id, explanation_run) if metrics is not None else Evidence()
    champion = current_version(mlflow_client, name, alias)
    kept = {k: v for k, v in run.data.tags.items() if k in (tracking.TAG_KIND, tracking.TAG_COMMIT)}
    source_record = tracking.RunRecord(uri, run.info.experiment_id, run_id)
    with tracking.linked_run(source_record, "register", kept) as (_, registration_run):
        if model_dir is not None:
            source = tracking.log_pyfunc_model(registration_run, model_dir, artifact, attached)
        else:
            source = latest_logged_model(run, artifact)
        decision = decide(rule, candidate, champion, force)
        tags = {"run_id": run_id, **kept, TAG_REGISTRATION_RUN: registration_run, **decision.tags()}
        if explanation_run is not None:
            tags[TAG_EXPLANATION_RUN] = explanation_run
        if candidate.value is not None:
            tags[TAG_METRIC + rule.promote_metric] = repr(candidate.value)
        if candidate.cells is not None:
            tags[TAG_CELLS] = candidate.cells
        try:
            with database_writes(uri):  # MLflow's fluent function: its own client, not `tracking.client`'s
                version = str(mlflow.register_model(source, name, tags=tags).version)
            mlflow_client.set_registered_model_alias(name, candidate_alias, version)
            if decision.promoted:
                mlflow_client.set_registered_model_alias(name, alias, version)
            resolved = str(mlflow_client.get_model_version_by_alias(name, alias).version)
        except MlflowException as exc:
            raise ScdgmError(f"registering {source} as {name!r} failed: {_one_line(exc)}") from None
        expected = version if decision.promoted else decision.champion_version
        if resolved != expected:
            raise ScdgmError(f"models:/{name}@{alias} resolves to version {resolved}, not {expected}")
        tracking.log_params(mlflow_client, registration_run,
                            {"registered": {"name": name, "version": version, "source": source},
                             "promotion": asdict(decision)})
    return Registration(
        name, version, alias, f"models:/{name}@{alias}", resolved, f"models:/{name}@{candidate_alias}",
        decision.promoted, asdict(decision), source, run_id, registration_run, uri,
    )


def register_command(
    name: Annotated[str | None, typer.Option(help="Registered model name, e.g. pbmc3k-ldvae (default: params.yaml register.name).")] = None,
    run_id: Annotated[str | None, typer.Option(help="Register this run's logged model.")] = None,
    model: Annotated[Path | None, typer.Option("--model", help="Model directory trained with tracking (logged afresh, explanation included).")] = None,
    explanation: Annotated[Path | None, typer.Option(help="Explanation folder to attach (default: MODEL/explanation when present).")] = None,
    metrics: Annotated[Path | None, typer.Option(help="`scdgm evaluate`'s metrics.json of this model: the figure the promotion rule compares.")] = None,
    alias: Annotated[str | None, typer.Option(help="Production alias, moved when the promotion rule passes (default: params.yaml register.alias).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Move the production alias to the new version without applying the rule.")] = False,
    artifact: Annotated[str, typer.Option(help="Name of the logged model in the run (sweeps of several models: model-<kind>).")] = tracking.MODEL_ARTIFACT,
    out: Annotated[Path | None, typer.Option(help="Also write the registration and the decision as JSON here.")] = None,
) -> None:
    """Register a model as a candidate version; move the production alias (champion) to it only when it beats the
    champion by the rule in params.yaml (register:), or with --force."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    section = load_params().get("register") or {}
    name, alias = name or section.get("name"), alias or section.get("alias")
    if not name or not alias:
        raise ScdgmError("no model name or alias: pass --name and --alias, or set register.name and register.alias")
    registration = register(
        name, alias, run_id=run_id, model_dir=model, artifact=artifact, explanation=explanation, metrics=metrics,
        rule=PromotionRule.from_params(section), force=force,
        candidate_alias=str(section.get("candidate_alias") or "candidate"),
    )
    if out is not None:
        write_json_atomic(out, asdict(registration))
    typer.echo(registration.summary())
