"""The sweep machinery behind `scdgm tune`: Optuna's TPE proposes configurations (study kept in SQLite or
PostgreSQL), Ray Tune runs them as trials on this machine or a Ray cluster, ASHA prunes trials from their
per-epoch validation loss, and every trial is a nested MLflow run under one sweep run. Afterwards the best
configuration of each model is refitted and logged as the sweep's model, with Optuna's plots, a comparison
table and the best parameters (for `scdgm train`).

Resuming: finished and failed trials are kept as they are (a failed trial, e.g. a diverged one, would fail
again, so it is not restarted); trials that were running when the sweep was interrupted start over from
epoch 0 with the same configuration and seed, in a fresh MLflow run that replaces the interrupted one. A
trial that finished in the instant before the interruption, before Ray recorded it, is not trained again:
it replays its recorded per-epoch metrics to Ray Tune and keeps its MLflow run.

Stopping: Ctrl+C (SIGINT) or SIGTERM stops Ray Tune as its own Ctrl+C handling does (its state saved for
--resume); then Ray is shut down, trial runs still open and the sweep run end KILLED and Optuna trials still
RUNNING end FAIL (a resumed trial continues in a new Optuna trial with the same parameters).

Links: each Optuna trial carries its MLflow run id (user attr `mlflow_run_id`) and each trial run its Optuna
trial number (tag `optuna.trial_number`); the study's objective is named after the metric.

Figures: Optuna's history plot needs HISTORY_MIN_COMPLETED completed trials and the importance plot
IMPORTANCE_MIN_COMPLETED (importances come from completed trials only; pruned ones stopped early and are not
comparable); with fewer, no file is written and a one-line note goes to best.json and comparison.md.
"""
from __future__ import annotations

import json
import math
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import ray
import yaml
from ray import tune
from ray.tune import Callback
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch
from tqdm.auto import tqdm

from scdgm.defaults import default_section
from scdgm.errors import ScdgmError, Terminated
from scdgm.files import write_json_atomic, write_text_atomic, write_with
from scdgm.interpret.explain import HELDOUT_FIGURES, ExplainSettings, heldout_label_transfer
from scdgm.models import model_class
from scdgm.models.data import split_mask
from scdgm.models.torch_model import TrainConfig
from scdgm.pipelines import compare, tracking
from scdgm.pipelines.cluster import ray_session
from scdgm.pipelines.train import save_model_dir, train_model
from scdgm.project import RAY_RESULTS, REPORTS, optuna_storage, project_path
from scdgm.stores import normalize_database_url

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd

    from scdgm.models.base import EpochCallback

SWEEP_RECORD = "sweep.json"
"""File in the sweep's Ray folder naming its parent MLflow run, so --resume continues the same run."""
RUN_ID_KEY = "mlflow_run_id"
"""Key of the trial's MLflow run id in what a trial reports to Ray Tune, and the Optuna trial's user attr."""
RAY_TRIAL_KEY = "ray_trial_id"
"""The Optuna trial's user attr naming its Ray trial (set when suggested, before the trial runs)."""
TAG_OPTUNA_TRIAL = "optuna.trial_number"
"""Tag of a trial run: the number of its Optuna trial in the model's study."""
TAG_CHAMPION = "scdgm.champion"
"""Tag of the sweep run: the model family its comparison picked."""
HISTORY_MIN_COMPLETED = 2
"""Completed trials needed for the optimisation-history plot (one dot is no history)."""
IMPORTANCE_MIN_COMPLETED = 4
"""Completed trials needed for the importance plot: fANOVA on fewer gives every parameter the same share."""


@dataclass
class SweepSettings:
    """Everything a sweep needs, with absolute paths (trials run in other working directories). The defaults
    are the packaged params.yaml's `tune:` section, state in the project folder."""

    models: list[str]
    data: str
    name: str
    num_samples: int = 8
    max_concurrent: int = 2
    max_epochs: int = 60
    metric: str = "validation_loss"
    grace_period: int = 20
    reduction_factor: int = 3
    startup_trials: int = 4
    budgets: dict[str, dict[str, int]] = field(default_factory=lambda: default_section("tune", "budgets"))
    select: dict[str, Any] = field(default_factory=lambda: default_section("tune", "select"))
    explain: dict[str, Any] = field(default_factory=lambda: default_section("explain"))
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    reuse_actors: bool = True
    storage: str = field(default_factory=optuna_storage)
    results_dir: str = field(default_factory=lambda: str(project_path(RAY_RESULTS)))
    out: str = field(default_factory=lambda: str(project_path(REPORTS, "tune")))
    experiment: str = tracking.DEFAULT_EXPERIMENT
    seed: int = 0
    spaces: dict[str, dict[str, Any]] = field(default_factory=lambda: default_section("tune", "spaces"))
    points_to_evaluate: list[dict[str, Any]] = field(default_factory=list)
    model_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    address: str | None = None
    num_cpus: int | None = None

    def __post_init__(self) -> None:
        self.storage = normalize_database_url(self.storage)

    @property
    def sweep_dir(self) -> Path:
        """Ray's folder of this sweep (one experiment sub-folder per model)."""
        return Path(self.results_dir) / self.name

    def study_name(self, kind: str) -> str:
        """The Optuna study of model `kind`: the sweep name (suffixed by the model when several are tuned)."""
        return self.name if len(self.models) == 1 else f"{self.name}-{kind}"

    def model_artifact(self, kind: str) -> str:
        """Name of model `kind`'s refitted pyfunc on the sweep run (`model` when one model is tuned)."""
        return tracking.MODEL_ARTIFACT if len(self.models) == 1 else f"{tracking.MODEL_ARTIFACT}-{kind}"

    def budget(self, kind: str) -> Budget:
        """Model `kind`'s trials, epochs per trial and ASHA grace period: the sweep's, overridden by
        `budgets[kind]`."""
        values = {"num_samples": self.num_samples, "max_epochs": self.max_epochs, "grace_period": self.grace_period}
        return Budget(**(values | self.budgets.get(kind, {})))

    def fixed_params(self, kind: str) -> dict[str, Any]:
        """Hyperparameters every trial of `kind` shares: the train section's and, for a model trained by epochs,
        the sweep's epoch budget without a progress bar."""
        params = dict(self.model_params.get(kind, {}))
        if issubclass(model_class(kind).Config, TrainConfig):
            params.update(max_epochs=self.budget(kind).max_epochs, progress=False)
        return params


@dataclass(frozen=True)
class Budget:
    """One model's share of the sweep (see SweepSettings.budget)."""

    num_samples: int
    max_epochs: int
    grace_period: int



def redact_url(url: str) -> str:
    """A database URL without its password, fit for tags and messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not an SQLAlchemy URL: nothing to hide
        return url


@dataclass
class SearchSpace:
    """Optuna define-by-run space of one model; picklable, so Ray can checkpoint the searcher. Every trial
    also gets its own seed, `seed + Optuna trial number`: trials differ, and a refit reproduces a trial."""

    space: dict[str, Any]
    seed: int

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        fixed: dict[str, Any] = {"seed": self.seed + trial.number}
        for name, entry in self.space.items():
            if not isinstance(entry, list):
                fixed[name] = entry
            elif entry[0] == "choice":
                trial.suggest_categorical(name, entry[1:])
            elif entry[0] in ("int", "logint"):
                trial.suggest_int(name, int(entry[1]), int(entry[2]), log=entry[0] == "logint")
            else:
                trial.suggest_float(name, float(entry[1]), float(entry[2]), log=entry[0] == "loguniform")
        return fixed


# --- the trial ----------------------------------------------------------------------------------------
@dataclass
class TrialSetup:
    """What every trial of one model needs besides its configuration; sent once through Ray's object store."""

    kind: str
    data: str
    fixed: dict[str, Any]
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep: str
    lineage: tracking.DataLineage
    tags: dict[str, str]
    threads: int


def trial_runs(tracking_uri: str, experiment_id: str, parent_run_id: str, trial_id: str) -> tuple[Any, list[Any]]:
    """(client, MLflow runs of Ray trial `trial_id` under sweep run `parent_run_id`), deleted runs excluded."""
    mlflow_client = tracking.client(tracking_uri)
    runs = mlflow_client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{tracking.TAG_TRIAL}` = '{trial_id}' and tags.`mlflow.parentRunId` = '{parent_run_id}'",
    )
    return mlflow_client, runs


def recorded_epochs(mlflow_client: Any, run: Any) -> list[dict[str, float]]:
    """The per-epoch metrics (losses, lr) a trial run logged, epoch by epoch."""
    keys = [k for k in run.data.metrics if k.startswith(tracking.EPOCH_METRIC_PREFIXES) or k == "lr"]
    epochs: dict[int, dict[str, float]] = {}
    for key in keys:
        for metric in mlflow_client.get_metric_history(run.info.run_id, key):
            epochs.setdefault(metric.step, {})[key] = metric.value
    return [epochs[step] for step in sorted(epochs)]


class TrialPruned(Exception):
    """Ray stopped the trial (ASHA pruned it): training ends at once, without the final evaluation."""


def tune_reporter(run_id: str) -> EpochCallback:
    """Epoch callback reporting to Ray Tune, with the trial's MLflow run id (the driver links the Optuna trial
    to it); Ray answers a stop decision with SystemExit inside `tune.report`, which becomes TrialPruned so
    the trial can close its run before exiting."""
    def report(epoch: int, metrics: dict[str, float]) -> None:
        try:
            tune.report({**metrics, RUN_ID_KEY: run_id})
        except SystemExit:
            raise TrialPruned(f"pruned after epoch {epoch + 1}") from None

    return report


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """One Ray Tune trial: load the data by path, train with a per-epoch `tune.report` (ASHA prunes by it)
    and per-epoch MLflow logging, then log the final metrics. The run ends FINISHED (tagged
    `scdgm.pruned`), FAILED when training raises (e.g. TrainingDiverged), which also fails the trial, or
    KILLED when Ray stops the worker."""
    import anndata as ad
    import torch

    torch.set_num_threads(max(1, setup.threads))
    trial_id = tune.get_context().get_trial_id()
    mlflow_client, earlier = trial_runs(setup.tracking_uri, setup.experiment_id, setup.parent_run_id, trial_id)
    # A run that ended just before an interruption, unnoticed by Ray, is replayed rather than trained again;
    # one tagged pruned may have been stopped by the interruption itself (Ray stops it the same way): redone.
    finished = [r for r in earlier if r.info.status == "FINISHED" and r.data.tags.get(tracking.TAG_PRUNED) != "true"]
    if finished:
        for metrics in recorded_epochs(mlflow_client, finished[0]):
            tune.report({**metrics, RUN_ID_KEY: finished[0].info.run_id})
        return
    for run in earlier:  # an attempt interrupted with the sweep: it starts over
        mlflow_client.delete_run(run.info.run_id)
    params = {**setup.fixed, **config}
    tags = {
        **setup.tags,
        "ray.node_ip": ray.util.get_node_ip_address(),
        "ray.node_id": ray.get_runtime_context().get_node_id(),
        tracking.TAG_ROLE: "trial",
        tracking.TAG_TRIAL: trial_id,
        tracking.TAG_SWEEP: setup.sweep,
    }
    adata = ad.read_h5ad(setup.data)
    with tracking.training_run(
        setup.kind,
        params,
        setup.lineage,
        run_name=f"{setup.sweep}-{setup.kind}-{trial_id}",
        parent_run_id=setup.parent_run_id,
        tags=tags,
        uri=setup.tracking_uri,
    ) as run:
        try:
            callbacks = (run.epoch_callback, tune_reporter(run.run_id))
            _, metrics = train_model(setup.kind, adata, params, callbacks=callbacks)
            tracking.log_final_metrics(run.client, run.run_id, metrics)
            pruned = False
        except TrialPruned:
            pruned = True
        run.client.set_tag(run.run_id, tracking.TAG_PRUNED, str(pruned).lower())
    if pruned:
        raise SystemExit(0)  # what Ray's stop expects from the trial's thread


class CloseTrialRuns(Callback):
    """Driver-side safety net: close a trial's MLflow run that the trial could not close itself (its
    process ended first) with the trial's outcome, FINISHED or FAILED, so no trial run stays RUNNING."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id

    def close(self, trial: Trial, status: str) -> None:
        """Set the trial's runs still open to `status`."""
        mlflow_client, runs = trial_runs(self.tracking_uri, self.experiment_id, self.parent_run_id, trial.trial_id)
        tracking.close_open_runs(mlflow_client, [r.info.run_id for r in runs], status)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.close(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.close(trial, "FAILED")


# --- Ray ----------------------------------------------------------------------------------------------
def check_resources(settings: SweepSettings) -> None:
    """Refuse a sweep whose trials could never start (Ray would keep them pending forever)."""
    available = ray.cluster_resources()
    for name, wanted in (("CPU", settings.cpus_per_trial), ("GPU", settings.gpus_per_trial)):
        if wanted > available.get(name, 0):
            raise ScdgmError(
                f"each trial asks for {wanted:g} {name}(s) but the Ray cluster has {available.get(name, 0):g}; "
                f"lower --{name.lower()}s-per-trial or add nodes"
            )


# --- one model's sweep --------------------------------------------------------------------------------
class SweepInterrupted(ScdgmError):
    """The sweep stopped before every trial ended (Ctrl+C or SIGTERM: `signum`); `--resume` continues it."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum


@contextmanager
def _sigterm_stops_tune() -> Iterator[list[int]]:
    """While Ray Tune runs, SIGTERM stops it as Ctrl+C does, through the SIGINT handler in place: Tune's (it
    saves the sweep's state for --resume), or after a first signal the one before it (the CLI's raises
    Terminated). Yields the list of signals received."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def stop(signum: int, frame: Any) -> None:
        received.append(signum)
        handler = signal.getsignal(signal.SIGINT)
        if handler in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise Terminated(signum)
        handler(signum, frame)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class ModelOutcome:
    """One model's sweep: best trial and configuration, trial counts, timings, refit metrics and model."""

    kind: str
    best_trial: str
    best_value: float
    best_config: dict[str, Any]
    trials: int
    failed: int
    pruned: int
    completed: int
    sweep_seconds: float
    errors: list[str] = field(default_factory=list)
    refit_seconds: float = 0.0
    refit_metrics: dict[str, float] = field(default_factory=dict)
    model_dir: str = ""
    model_uri: str = ""


@dataclass
class SweepOutcome:
    """The whole sweep: its MLflow run, each model's outcome, the output folder, the wall time and one-line
    notes (e.g. a plot left out for too few completed trials)."""

    name: str
    parent_run_id: str
    models: dict[str, ModelOutcome]
    out: str
    seconds: float
    notes: list[str] = field(default_factory=list)
    champion: compare.Selection | None = None


class PruningAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna what happened to each trial: PRUNED when ASHA stopped it (Ray reports
    such a trial complete, with its last value), else COMPLETE with its best epoch's value (the model keeps
    its best epoch), so TPE and optuna-dashboard see the truth. It links each Optuna trial and the trial's
    MLflow run both ways (the run id arrives with the trial's results), and a trial restarted by --resume
    whose Optuna trial was failed at the interruption continues in a new Optuna trial with its parameters.

    A stopped trial is recognised by its last result: Ray hands the result that made the scheduler stop the
    trial to `on_trial_complete` only, never to `on_trial_result`."""

    def __init__(self, setup: TrialSetup, **kwargs: Any) -> None:
        self.best_values: dict[str, float] = {}
        self.last_iterations: dict[str, int] = {}
        self.runs = (setup.tracking_uri, setup.experiment_id, setup.parent_run_id)  # where the trial runs are
        self.linked: dict[str, int] = {}  # Ray trial id -> the Optuna trial number its MLflow run is tagged with
        super().__init__(**kwargs)

    def _record(self, trial_id: str, result: dict[str, Any]) -> None:
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            self.best_values[trial_id] = min(value, self.best_values.get(trial_id, math.inf))
        self.last_iterations[trial_id] = int(result.get("training_iteration", 0))

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        config = super().suggest(trial_id)
        self._ot_trials[trial_id].set_user_attr(RAY_TRIAL_KEY, trial_id)
        return config

    def _link(self, trial_id: str, run_id: str | None = None) -> None:
        """Optuna trial -> MLflow run (user attr) and MLflow run -> Optuna trial number (tag), once per pair.
        The run id comes with the trial's results; without one (a trial that failed before reporting) it is
        looked up by the Ray trial id."""
        ot_trial = self._ot_trials[trial_id]
        if self.linked.get(trial_id) == ot_trial.number:
            return
        if not run_id:
            found = trial_runs(*self.runs, trial_id)[1]
            if not found:
                return
            run_id = found[0].info.run_id
        try:
            ot_trial.set_user_attr(RUN_ID_KEY, run_id)
        except optuna.exceptions.UpdateFinishedTrialError:  # failed at an interruption; a report revives it
            return
        tracking.client(self.runs[0]).set_tag(run_id, TAG_OPTUNA_TRIAL, str(ot_trial.number))
        self.linked[trial_id] = ot_trial.number

    def _report(self, trial_id: str, result: dict[str, Any]) -> None:
        """Report an intermediate value; a trial failed at an interruption gets a new Optuna trial first."""
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            previous = self._ot_trials[trial_id]
            self._ot_study.enqueue_trial(
                previous.params, user_attrs={"resumes_trial": previous.number, RAY_TRIAL_KEY: trial_id}
            )
            self._ot_trials[trial_id] = self._ot_study.ask()
            self._space(self._ot_trials[trial_id])  # the enqueued parameters, recorded
            super().on_trial_result(trial_id, result)
        self._link(trial_id, result.get(RUN_ID_KEY))

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self._report(trial_id, result)
        self._record(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id in self._ot_trials and trial_id not in self._completed_trials:
            self._link(trial_id, (result or {}).get(RUN_ID_KEY))
        if error or not result or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            super().on_trial_complete(trial_id, result, error)
            return
        stopped = int(result.get("training_iteration", 0)) > self.last_iterations.get(trial_id, 0)
        if stopped:
            self._report(trial_id, result)  # the value that got it pruned, as an intermediate value
        self._record(trial_id, result)
        ot_trial = self._ot_trials[trial_id]
        if stopped:
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
        elif trial_id in self.best_values:
            self._ot_study.tell(ot_trial, self.best_values[trial_id])
        else:
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.FAIL)
        self._completed_trials.add(trial_id)


def _searcher(settings: SweepSettings, kind: str, setup: TrialSetup) -> OptunaSearch:
    """The Optuna searcher of `kind`'s study, created here (or loaded) with its objective named."""
    storage = optuna.storages.RDBStorage(settings.storage)
    with warnings.catch_warnings():  # multivariate TPE and metric names are flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=settings.seed, multivariate=True)
        study = optuna.create_study(
            storage=storage, study_name=settings.study_name(kind), direction="minimize", load_if_exists=True
        )
        study.set_metric_names([settings.metric])
    return PruningAwareOptunaSearch(
        setup=setup,
        space=SearchSpace(settings.spaces[kind], settings.seed),
        metric=settings.metric,
        mode="min",
        sampler=sampler,
        study_name=settings.study_name(kind),
        storage=storage,
        points_to_evaluate=[dict(p) for p in settings.points_to_evaluate] or None,
    )


def _trainable(settings: SweepSettings, setup: TrialSetup) -> Any:
    resources = {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial}
    return tune.with_resources(tune.with_parameters(run_trial, setup=setup), resources)


def _trial_name(trial: Trial) -> str:
    return f"trial_{trial.trial_id}"


class StartupASHA(ASHAScheduler):
    """ASHA that never stops the first `startup_trials` trials (as Optuna's pruners' n_startup_trials): their
    values still fill the rungs, so later trials are pruned against complete runs, and every model's sweep ends
    with at least that many completed trials (what the importance plot and the comparison need)."""

    def __init__(self, startup_trials: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.startup_trials = startup_trials
        self.started: list[str] = []

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        self.started.append(trial.trial_id)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        if decision == TrialScheduler.STOP and trial.trial_id in self.started[: self.startup_trials]:
            return TrialScheduler.CONTINUE
        return decision


def _tuner(settings: SweepSettings, kind: str, setup: TrialSetup, resume: bool) -> tune.Tuner:
    """A new Tuner, or on --resume the interrupted one: finished and errored trials kept, unfinished restarted."""
    path = settings.sweep_dir / kind
    budget = settings.budget(kind)
    if resume and tune.Tuner.can_restore(str(path)):
        return tune.Tuner.restore(
            str(path), trainable=_trainable(settings, setup), resume_unfinished=True, resume_errored=False,
            restart_errored=False,
        )
    scheduler = StartupASHA(  # max_t one past the budget: ASHA only prunes, a trial ends by itself
        settings.startup_trials,
        time_attr="training_iteration",
        max_t=budget.max_epochs + 1,
        grace_period=min(budget.grace_period, budget.max_epochs),
        reduction_factor=settings.reduction_factor,
    )
    return tune.Tuner(
        _trainable(settings, setup),
        tune_config=tune.TuneConfig(
            metric=settings.metric,
            mode="min",
            search_alg=_searcher(settings, kind, setup),
            scheduler=scheduler,
            num_samples=budget.num_samples,
            max_concurrent_trials=settings.max_concurrent,
            reuse_actors=settings.reuse_actors,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=kind,
            storage_path=str(settings.sweep_dir),
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            callbacks=[CloseTrialRuns(setup.tracking_uri, setup.experiment_id, setup.parent_run_id)],
            verbose=1,
        ),
    )


def _error_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else error.__class__.__name__


def _count_pruned(setup: TrialSetup) -> int:
    """How many of this model's trial runs under the sweep run were pruned (each trial tags its run)."""
    mlflow_client = tracking.client(setup.tracking_uri)
    runs = mlflow_client.search_runs(
        [setup.experiment_id],
        filter_string=(
            f"tags.`mlflow.parentRunId` = '{setup.parent_run_id}' and tags.`{tracking.TAG_KIND}` = '{setup.kind}'"
            f" and tags.`{tracking.TAG_PRUNED}` = 'true'"
        ),
        max_results=10000,
    )
    return len(runs)


def _count_completed(settings: SweepSettings, kind: str) -> int:
    """How many of `kind`'s Optuna trials completed (ran their whole budget)."""
    study = optuna.load_study(study_name=settings.study_name(kind), storage=settings.storage)
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def _tune_model(settings: SweepSettings, kind: str, setup: TrialSetup, resume: bool) -> ModelOutcome:
    """Run (or resume) the sweep of one model and pick its best successful trial; raise SweepInterrupted
    (after closing the open trial runs as KILLED) when it stopped before every trial ended."""
    started = time.perf_counter()
    with _sigterm_stops_tune() as received:
        results = _tuner(settings, kind, setup, resume).fit()
    trials = results._experiment_analysis.trials  # noqa: SLF001 - the only view of each trial's status
    unfinished = [t for t in trials if t.status not in (Trial.TERMINATED, Trial.ERROR)]
    if unfinished or len(trials) < settings.budget(kind).num_samples:
        closer = CloseTrialRuns(setup.tracking_uri, setup.experiment_id, setup.parent_run_id)
        for trial in unfinished:
            closer.close(trial, "KILLED")
        study = optuna.load_study(study_name=settings.study_name(kind), storage=settings.storage)
        done = sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))
        signum = received[0] if received else signal.SIGINT  # Tune itself handles SIGINT
        raise SweepInterrupted(
            f"sweep {settings.name!r} ({kind}) stopped by {signal.Signals(signum).name} after {done} of "
            f"{settings.budget(kind).num_samples} trials",
            signum,
        )
    best, best_value = None, math.inf
    for result in results:
        frame = result.metrics_dataframe
        if result.error is None and frame is not None and settings.metric in frame:
            value = float(frame[settings.metric].min())
            if value < best_value:
                best, best_value = result, value
    errors = [_error_line(e) for e in results.errors]
    if best is None:
        raise ScdgmError(f"every {kind} trial failed; first error: {errors[0] if errors else 'no result reported'}")
    return ModelOutcome(
        kind=kind,
        best_trial=str(best.metrics.get("trial_id", "")),
        best_value=best_value,
        best_config=dict(best.config),
        trials=len(trials),
        failed=len(errors),
        pruned=_count_pruned(setup),
        completed=_count_completed(settings, kind),
        sweep_seconds=time.perf_counter() - started,
        errors=errors,
    )


def _fail_orphan_optuna_trials(settings: SweepSettings) -> list[str]:
    """Mark the sweep's Optuna trials still RUNNING once it ended (suggested, then never run or lost to an
    interruption) FAIL; returns their Ray trial ids (Ray stops an interrupted trial as ASHA does, so its run
    may have closed FINISHED, as pruned)."""
    wanted = {settings.study_name(k) for k in settings.models}
    trial_ids = []
    for summary in optuna.get_all_study_summaries(settings.storage, include_best_trial=False):
        if summary.study_name not in wanted:
            continue
        study = optuna.load_study(study_name=summary.study_name, storage=settings.storage)
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            if RAY_TRIAL_KEY in trial.user_attrs:
                trial_ids.append(str(trial.user_attrs[RAY_TRIAL_KEY]))
    return trial_ids


def _plot_gaps(study: optuna.Study) -> dict[str, str]:
    """Why a plot of `study` would mislead (plot name -> reason); absent names can be drawn."""
    trials = study.get_trials(deepcopy=False)
    completed = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    counted = f"{len(completed)} of {len(trials)} trials completed (the others were pruned or failed)"
    gaps = {}
    if len(completed) < HISTORY_MIN_COMPLETED:
        gaps["history"] = f"{counted}; it needs {HISTORY_MIN_COMPLETED}"
    if not any(t.intermediate_values for t in trials):
        gaps["curves"] = "no trial reported a per-epoch value"
    varied = {name for name in {n for t in completed for n in t.params} if len({repr(t.params.get(name)) for t in completed}) > 1}
    if len(completed) < IMPORTANCE_MIN_COMPLETED:
        gaps["importance"] = f"{counted}; it needs {IMPORTANCE_MIN_COMPLETED}"
    elif not varied:
        gaps["importance"] = "the completed trials share every parameter value"
    return gaps


def optuna_plots(settings: SweepSettings, kind: str, out: Path) -> tuple[list[Path], list[str]]:
    """Optimisation history, per-epoch curves (every trial, pruned ones too) and parameter importances (from
    completed trials only) of `kind`'s study as PNG files, each only when enough trials support it (see the
    module's docstring): (files written, one-line notes on the plots left out, whose old files are removed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_matplotlib

    study = optuna.load_study(study_name=settings.study_name(kind), storage=settings.storage)
    plots = {
        "history": lambda: optuna_matplotlib.plot_optimization_history(study, target_name=settings.metric),
        "curves": lambda: optuna_matplotlib.plot_intermediate_values(study),
        "importance": lambda: optuna_matplotlib.plot_param_importances(study, target_name=settings.metric),
    }
    gaps = _plot_gaps(study)
    written, notes = [], []
    for name, plot in plots.items():
        path = out / f"{kind}_{name}.png"
        if name in gaps:
            path.unlink(missing_ok=True)  # a figure of an earlier sweep must not pass for this one's
            notes.append(f"{kind}: no {name} plot: {gaps[name]}")
            continue
        with warnings.catch_warnings():  # experimental API
            warnings.simplefilter("ignore")
            figure = plot().figure
        figure.set_size_inches(7, 4.5)
        figure.tight_layout()
        write_with(path, lambda staging, figure=figure: figure.savefig(staging, dpi=110, format="png"))
        plt.close(figure)
        written.append(path)
    return written, notes


def _comparison_explain(settings: SweepSettings) -> ExplainSettings:
    """The explanation settings of the comparison: params.yaml's `explain:` (genes, discretisation, labels), with
    no permutations, prior report, stability or plots, which the label-transfer figure does not use."""
    return ExplainSettings.from_params(
        {"seed": settings.seed, **settings.explain}
        | {"permutations": 0, "prior_cells": 0, "stability_boot": 0, "plots": False, "alpha": None}
    )


def _refit(
    settings: SweepSettings, outcome: ModelOutcome, adata: ad.AnnData, parent_run_id: str, notes: list[str]
) -> None:
    """Train the best configuration again (its seed included, so the best trial is reproduced), evaluate it on
    the test cells with the metrics every family shares (held-out label transfer included), save it under
    --out/models/<kind> and log it as the sweep run's pyfunc model."""
    kind = outcome.kind
    model, metrics = train_model(kind, adata, {**settings.fixed_params(kind), **outcome.best_config})
    train, test = split_mask(adata, "train"), split_mask(adata, "test")
    explain = _comparison_explain(settings)
    if not (train.any() and test.any()):
        notes.append(f"{kind}: no held-out label transfer: the data has no obs['split'] with train and test cells")
    elif explain.label_key not in adata.obs:
        notes.append(f"{kind}: no held-out label transfer: no obs[{explain.label_key!r}] labels")
    else:
        heldout = heldout_label_transfer(model, adata[train], adata[test], explain)
        metrics |= {f"label_transfer_{key}": heldout[key] for key in HELDOUT_FIGURES}
    trained_cells = int(train.sum()) or adata.n_obs
    seconds = float(model.history.seconds)
    epochs = max(1, len(model.history.epochs))
    metrics["cells_per_second"] = trained_cells * epochs / seconds if seconds > 0 else math.nan
    model_dir = Path(settings.out) / "models" / kind
    save_model_dir(model, metrics, model_dir, overwrite=True)  # a re-run of the sweep refits its models
    outcome.refit_seconds = seconds
    outcome.refit_metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    outcome.model_dir = str(model_dir)
    outcome.model_uri = tracking.log_pyfunc_model(parent_run_id, model_dir, settings.model_artifact(kind))


def comparison_table(outcomes: dict[str, ModelOutcome], metric: str, full: bool = False) -> pd.DataFrame:
    """One row per model: trials (completed, pruned, failed), the best validation metric of its own study, and
    the refit's held-out metrics: the ones families share (compare.METRICS; NaN where a family has none, e.g.
    no likelihood), or with `full` every metric any refit reported."""
    import pandas as pd

    shared = [m.name for m in compare.METRICS]
    reported = set().union(*(o.refit_metrics for o in outcomes.values())) if outcomes else set()
    shown = shared + (sorted(reported - set(shared)) if full else [])
    rows = []
    for outcome in outcomes.values():
        row: dict[str, Any] = {
            "model": outcome.kind,
            "trials": outcome.trials,
            "completed": outcome.completed,
            "pruned": outcome.pruned,
            "failed": outcome.failed,
            f"best_{metric}": outcome.best_value,
        }
        row.update({k: outcome.refit_metrics.get(k, math.nan) for k in shown})
        row["sweep_seconds"] = outcome.sweep_seconds
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")


def select_champion(settings: SweepSettings, table: pd.DataFrame, notes: list[str]) -> compare.Selection | None:
    """The family the pipeline trains and registers, by the declared rule (`tune.select`); None (with a note)
    when no family has the selection metric, e.g. unlabelled data."""
    try:
        return compare.select_champion(table, **settings.select)
    except ScdgmError as error:
        notes.append(f"no champion: {error}")
        return None


def best_params_document(settings: SweepSettings, outcome: SweepOutcome) -> str:
    """A params file for `scdgm train --params` (or `--sweep`): each model's train settings with the best
    hyperparameters found (its seed included) and the sweep's epoch budget, and the champion family."""
    train = {kind: {**settings.fixed_params(kind), **o.best_config} for kind, o in outcome.models.items()}
    for params in train.values():
        params.pop("progress", None)  # the sweep's trials run quietly; a training from this file shows its bar
    document: dict[str, Any] = {"train": train}
    if outcome.champion is not None:
        document["champion"] = outcome.champion.champion
    header = f"# written by `scdgm tune` (sweep {settings.name}); read by `scdgm train --sweep` or `--params`\n"
    return header + yaml.safe_dump(document, sort_keys=True)


def _write_outputs(settings: SweepSettings, outcome: SweepOutcome) -> list[Path]:
    """best.json, best_params.yaml (what the DVC train stage reads), comparison.csv, comparison.md (table,
    champion and notes, where `scdgm report` shows them) and comparison.png (one panel per shared metric)."""
    out = Path(settings.out)
    best = {
        "sweep": settings.name,
        "parent_run_id": outcome.parent_run_id,
        "metric": settings.metric,
        "seconds": outcome.seconds,
        "budgets": {kind: asdict(settings.budget(kind)) for kind in outcome.models},
        "champion": outcome.champion.to_dict() if outcome.champion else None,
        "models": {kind: asdict(o) for kind, o in outcome.models.items()},
        "notes": outcome.notes,
    }
    table = comparison_table(outcome.models, settings.metric)
    summary = compare.comparison_markdown(table, outcome.champion)
    summary += "".join(f"\nNote: {note}" for note in outcome.notes) + ("\n" if outcome.notes else "")
    written = [
        write_json_atomic(out / "best.json", best),
        write_text_atomic(out / "best_params.yaml", best_params_document(settings, outcome)),
        write_text_atomic(out / "comparison.csv", comparison_table(outcome.models, settings.metric, True).to_csv()),
        write_text_atomic(out / "comparison.md", summary),
    ]
    champion = outcome.champion.champion if outcome.champion else None
    written.append(compare.comparison_figure(table, out / "comparison.png", champion, f"sweep {settings.name}: test cells"))
    return written


# --- the sweep ----------------------------------------------------------------------------------------
def _open_parent(settings: SweepSettings, uri: str, resume: bool, lineage: tracking.DataLineage) -> str:
    """Create the sweep run (or reopen it on --resume) and remember it in the sweep's Ray folder."""
    mlflow_client = tracking.client(uri)
    record = settings.sweep_dir / SWEEP_RECORD
    if resume and record.exists():
        run_id = json.loads(record.read_text())["parent_run_id"]
        mlflow_client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {
        tracking.TAG_ROLE: "sweep",
        tracking.TAG_SWEEP: settings.name,
        tracking.TAG_KIND: ",".join(settings.models),
        "optuna.storage": redact_url(settings.storage),
        "optuna.studies": ",".join(settings.study_name(k) for k in settings.models),
        **tracking.lineage_tags(),
    }
    run_id = tracking.start_run(mlflow_client, settings.experiment, f"sweep-{settings.name}", tags)
    logged = {k: v for k, v in asdict(settings).items() if k != "storage"}
    tracking.log_params(mlflow_client, run_id, {"tune": logged})
    tracking.log_lineage(mlflow_client, run_id, lineage)
    write_json_atomic(record, {"parent_run_id": run_id, "tracking_uri": uri})
    return run_id


def _clear_previous(settings: SweepSettings, overwrite: bool) -> None:
    """A new sweep must not mix with an old one of the same name: refuse, or (overwrite) delete the old Ray
    folder and Optuna studies. The old MLflow runs stay."""
    wanted = {settings.study_name(k) for k in settings.models}
    existing = [s.study_name for s in optuna.get_all_study_summaries(settings.storage) if s.study_name in wanted]
    if not existing and not settings.sweep_dir.exists():
        return
    if not overwrite:
        raise ScdgmError(
            f"sweep {settings.name!r} exists ({settings.sweep_dir}, Optuna studies {existing or 'none'}); "
            "pass --resume to continue it, --overwrite to start it over, or another --name"
        )
    shutil.rmtree(settings.sweep_dir, ignore_errors=True)
    for name in existing:
        optuna.delete_study(study_name=name, storage=settings.storage)


def _tune_models(
    settings: SweepSettings, uri: str, parent_run_id: str, lineage: tracking.DataLineage, resume: bool
) -> dict[str, ModelOutcome]:
    """Run (or resume) the sweep of every model, one after the other, on the Ray that is up."""
    mlflow_client = tracking.client(uri)
    outcomes = {}
    for kind in settings.models:
        setup = TrialSetup(
            kind=kind,
            data=settings.data,
            fixed=settings.fixed_params(kind),
            tracking_uri=uri,
            experiment_id=mlflow_client.get_run(parent_run_id).info.experiment_id,
            parent_run_id=parent_run_id,
            sweep=settings.name,
            lineage=lineage,
            tags=tracking.lineage_tags(),
            threads=max(1, int(settings.cpus_per_trial)),
        )
        outcomes[kind] = _tune_model(settings, kind, setup, resume)
    return outcomes


def _conclude(
    settings: SweepSettings, outcomes: dict[str, ModelOutcome], adata: ad.AnnData, parent_run_id: str, started: float
) -> SweepOutcome:
    """Refit each model's best configuration and compare the refits on the test cells, pick the champion
    family, draw Optuna's plots, write the outputs and log it all to the sweep run."""
    mlflow_client = tracking.client()
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    for kind, model_outcome in tqdm(outcomes.items(), desc="refit and compare", unit="model", disable=None):
        _refit(settings, model_outcome, adata, parent_run_id, notes)
        tracking.log_metrics(
            mlflow_client,
            parent_run_id,
            {f"{kind}.best_{settings.metric}": model_outcome.best_value}
            | {f"{kind}.{k}": v for k, v in model_outcome.refit_metrics.items()},
        )
        plots, plot_notes = optuna_plots(settings, kind, out)
        notes += plot_notes
        for plot in plots:
            mlflow_client.log_artifact(parent_run_id, str(plot), artifact_path="optuna")
    outcome = SweepOutcome(settings.name, parent_run_id, outcomes, str(out), time.perf_counter() - started, notes)
    outcome.champion = select_champion(settings, comparison_table(outcomes, settings.metric), notes)
    if outcome.champion is not None:
        mlflow_client.set_tag(parent_run_id, TAG_CHAMPION, outcome.champion.champion)
        mlflow_client.set_tag(parent_run_id, f"{TAG_CHAMPION}_reason", outcome.champion.reason)
    for path in _write_outputs(settings, outcome):
        mlflow_client.log_artifact(parent_run_id, str(path), artifact_path="sweep")
    tracking.log_metrics(mlflow_client, parent_run_id, {"sweep_seconds": outcome.seconds})
    return outcome


def run_sweep(settings: SweepSettings, resume: bool = False, overwrite: bool = False) -> SweepOutcome:
    """Tune every model of `settings` (new, or resumed), refit and log each best configuration, write the
    outputs and close the sweep run: FINISHED, KILLED when interrupted, FAILED on an error."""
    import anndata as ad

    started = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    uri = tracking.tracking_uri()
    tracking.ensure_reachable(uri)
    if not Path(settings.data).is_file():
        raise ScdgmError(f"{settings.data}: prepared data not found")
    if resume and not (settings.sweep_dir / SWEEP_RECORD).exists():
        raise ScdgmError(f"--resume: no sweep {settings.name!r} in {settings.results_dir} to continue")
    if not resume:
        _clear_previous(settings, overwrite)
    adata = ad.read_h5ad(settings.data)
    lineage = tracking.dataset_lineage(settings.data, adata.n_obs, adata.n_vars)
    parent_run_id, status = None, "FAILED"
    try:
        with ray_session(settings.address, settings.num_cpus):
            check_resources(settings)
            parent_run_id = _open_parent(settings, uri, resume, lineage)
            outcomes = _tune_models(settings, uri, parent_run_id, lineage, resume)
        outcome = _conclude(settings, outcomes, adata, parent_run_id, started)
        status = "FINISHED"
        return outcome
    except SweepInterrupted:
        status = "KILLED"
        raise
    except BaseException as error:
        status = tracking.end_status(error)
        raise
    finally:
        _close_sweep(settings, uri, parent_run_id, status)


def _close_sweep(settings: SweepSettings, uri: str, parent_run_id: str | None, status: str) -> None:
    """Once Ray is down: Optuna trials still RUNNING end FAIL and their trials' MLflow runs KILLED (except a run
    that finished training, unnoticed by Ray: --resume replays it); unless the sweep finished, its trial runs
    still open end KILLED too; the sweep run ends `status`."""
    interrupted = _fail_orphan_optuna_trials(settings)
    if parent_run_id is None:
        return
    mlflow_client = tracking.client(uri)
    experiment = mlflow_client.get_run(parent_run_id).info.experiment_id
    for trial_id in interrupted:
        for run in trial_runs(uri, experiment, parent_run_id, trial_id)[1]:
            if run.info.status != "FINISHED" or run.data.tags.get(tracking.TAG_PRUNED) == "true":
                mlflow_client.set_tag(run.info.run_id, tracking.TAG_PRUNED, "false")
                mlflow_client.set_terminated(run.info.run_id, "KILLED")
    if status != "FINISHED":
        children = mlflow_client.search_runs(
            [experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=10000
        )
        tracking.close_open_runs(mlflow_client, [r.info.run_id for r in children], "KILLED")
    mlflow_client.set_terminated(parent_run_id, status)
