"""Sweeps: ASHA prunes, a diverging trial fails without failing the sweep, every trial run is closed and linked
to its Optuna trial, figures only where enough trials completed, the best configuration is refitted and written
for `scdgm train`, an interrupted sweep closes everything and resumes without repeats, and PostgreSQL URLs
without a driver work for Optuna and MLflow."""
import json
import os
import shutil
import signal
import tempfile
import threading
import time

import mlflow
import optuna
import pandas as pd
import pytest
import yaml
from tracking_helpers import (
    TINY_SPACE,
    isolated_tracking,
    runs_by_role,
    throwaway_databases,
    tiny_params,
    write_tiny_prepared,
)

from scdgm.errors import ScdgmError
from scdgm.pipelines import tracking
from scdgm.pipelines.config import load_params
from scdgm.pipelines.sweep import IMPORTANCE_MIN_COMPLETED, SweepInterrupted, SweepSettings, run_sweep
from scdgm.pipelines.train import model_params
from scdgm.pipelines.tune import check_space, settings_from_params
from scdgm.stores import normalize_database_url

DIVERGING = {"lr": 10000.0, "n_hidden": 16, "n_latent": 2, "batch_size": 64}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_prepared(tmp_path_factory.mktemp("data") / "tiny.h5ad")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module's sweeps (they reuse a running Ray), in its own short temp dir."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="ray_", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def states(storage: str, study: str) -> list[str]:
    return [t.state.name for t in optuna.load_study(study_name=study, storage=storage).trials]


@pytest.mark.filterwarnings("ignore:Fixed parameter lr")  # the diverging lr lies outside the space on purpose
def test_sweep_prunes_survives_a_failing_trial_and_refits_the_best(tiny_data, local_ray, tmp_path, monkeypatch):
    uri = isolated_tracking(monkeypatch, tmp_path)
    params = load_params(tiny_params(tmp_path, tiny_data, num_samples=5, points_to_evaluate=[DIVERGING]))
    settings = settings_from_params(params, name="sweep")
    outcome = run_sweep(settings).models["ldvae"]

    assert outcome.trials == 5 and outcome.failed == 1 and outcome.pruned >= 1
    assert "TrainingDiverged" in outcome.errors[0]
    trials = runs_by_role(uri, "trial")
    assert len(trials) == 5 and {t.info.status for t in trials} <= {"FINISHED", "FAILED"}
    assert sorted(t.info.status for t in trials).count("FAILED") == 1
    assert sum(t.data.tags.get("scdgm.pruned") == "true" for t in trials) == outcome.pruned
    assert len({t.data.params["seed"] for t in trials}) == 5  # a distinct seed per trial
    (parent,) = runs_by_role(uri, "sweep")
    assert parent.info.status == "FINISHED"
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {parent.info.run_id}
    assert parent.data.metrics["ldvae.best_validation_loss"] == pytest.approx(outcome.best_value)
    client = mlflow.MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}
    assert "optuna/ldvae_history.png" in logged
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{parent.info.run_id}/model")
    assert pyfunc.metadata.get_input_schema().input_names()[0] in load_model_genes(outcome.model_dir)

    study = states(settings.storage, "sweep")
    assert study.count("FAIL") == 1 and study.count("PRUNED") == outcome.pruned and "RUNNING" not in study
    optuna_study = optuna.load_study(study_name="sweep", storage=settings.storage)
    assert optuna_study.metric_names == ["validation_loss"]  # the objective is named
    by_run = {t.info.run_id: t for t in trials}
    for trial in optuna_study.trials:  # both ways: Optuna trial -> MLflow run -> Optuna trial number
        run = by_run[trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags["optuna.trial_number"] == str(trial.number)
        assert run.data.tags["ray.trial_id"] == trial.user_attrs["ray_trial_id"]
    completed = study.count("COMPLETE")
    notes = json.loads((tmp_path / "tune" / "best.json").read_text())["notes"]
    assert (tmp_path / "tune" / "ldvae_importance.png").exists() == (completed >= IMPORTANCE_MIN_COMPLETED)
    assert any("no importance plot" in note for note in notes) == (completed < IMPORTANCE_MIN_COMPLETED)
    for note in notes:  # shown by `scdgm report` under the comparison table
        assert f"Note: {note}" in (tmp_path / "tune" / "comparison.md").read_text()
    best = json.loads((tmp_path / "tune" / "best.json").read_text())["models"]["ldvae"]
    assert best["best_config"] == outcome.best_config and "seed" in best["best_config"]
    document = yaml.safe_load((tmp_path / "tune" / "best_params.yaml").read_text())
    assert model_params("ldvae", document)["lr"] == outcome.best_config["lr"]
    assert (tmp_path / "tune" / "comparison.csv").read_text().startswith("model,trials,completed,pruned,failed,best_validation_loss")

    with pytest.raises(ScdgmError, match="sweep 'sweep' exists"):
        run_sweep(settings)  # the same name again needs --resume or --overwrite


def load_model_genes(model_dir: str) -> list[str]:
    from scdgm.models import load_model

    return load_model(model_dir).genes


@pytest.mark.filterwarnings("ignore:The reported value is ignored")  # a replayed trial reports its epochs again
def test_interrupted_sweep_resumes_without_losing_or_repeating_trials(tiny_data, local_ray, tmp_path, monkeypatch):
    uri = isolated_tracking(monkeypatch, tmp_path)
    params = tiny_params(tmp_path, tiny_data, num_samples=5, max_epochs=4, grace_period=4)  # no pruning: slower trials
    settings = settings_from_params(load_params(params), name="resumed")
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a late Ctrl+C must not hit pytest itself
    stop = threading.Event()

    def interrupt_after_a_trial() -> None:
        client = mlflow.MlflowClient(uri)
        while not stop.is_set():
            experiments = [e.experiment_id for e in client.search_experiments()]
            finished = client.search_runs(experiments, "tags.`scdgm.role` = 'trial' and attributes.status = 'FINISHED'")
            if finished:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl+C: Ray Tune saves its state and stops
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=interrupt_after_a_trial, daemon=True)
    watcher.start()
    try:
        with pytest.raises(SweepInterrupted):
            run_sweep(settings)
    finally:
        stop.set()
        watcher.join()
        signal.signal(signal.SIGINT, previous)
    (parent,) = runs_by_role(uri, "sweep")
    assert parent.info.status == "KILLED"
    before = {t.data.tags["ray.trial_id"]: t for t in runs_by_role(uri, "trial") if t.info.status == "FINISHED"}
    assert 1 <= len(before) < 5 and "RUNNING" not in {t.info.status for t in runs_by_role(uri, "trial")}
    assert "RUNNING" not in states(settings.storage, "resumed")  # interrupted trials FAIL, resumed in new ones
    assert all(t.data.tags.get("scdgm.pruned") != "true" for t in before.values())  # no stop passes as pruned

    run_sweep(settings, resume=True)
    trials = runs_by_role(uri, "trial")
    assert len(trials) == 5 and len({t.data.tags["ray.trial_id"] for t in trials}) == 5
    assert {t.info.status for t in trials} == {"FINISHED"}
    after = {t.data.tags["ray.trial_id"]: t for t in trials}
    for trial_id, run in before.items():  # finished trials were kept, not run again
        assert after[trial_id].info.run_id == run.info.run_id
        assert after[trial_id].info.start_time == run.info.start_time
    (parent,) = runs_by_role(uri, "sweep")
    assert parent.info.status == "FINISHED"
    study = optuna.load_study(study_name="resumed", storage=settings.storage).trials
    assert "RUNNING" not in {t.state.name for t in study}
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in study) == 5  # each Ray trial told Optuna once
    for trial in study:  # an interrupted trial continued in a new Optuna trial with the same parameters
        if "resumes_trial" in trial.user_attrs:
            assert study[trial.user_attrs["resumes_trial"]].state.name == "FAIL"
            assert study[trial.user_attrs["resumes_trial"]].params == trial.params


def test_search_spaces_and_settings_are_checked(tiny_data, tmp_path):
    params = load_params(tiny_params(tmp_path, tiny_data))
    with pytest.raises(ScdgmError, match="tune.spaces.ldvae.lr"):
        check_space("ldvae", {"lr": ["loguniform", 0, 1]})
    with pytest.raises(ScdgmError, match="first element"):
        check_space("ldvae", {"lr": ["normal", 0, 1]})
    no_pca = {**params, "tune": {**params["tune"], "spaces": {"ldvae": TINY_SPACE}}}
    with pytest.raises(ScdgmError, match="no search space for pca"):
        settings_from_params(no_pca, models="pca")
    assert params["tune"]["spaces"]["ldvae"] == TINY_SPACE  # a project's space replaces the packaged one whole
    with pytest.raises(ScdgmError, match="unknown model"):
        settings_from_params(params, models="ldvae,nope")
    params["tune"]["spaces"]["ldvae"]["n_leaves"] = ["int", 1, 3]
    with pytest.raises(ScdgmError, match="n_leaves is not a hyperparameter of ldvae"):
        settings_from_params(params, models="ldvae")
    del params["tune"]["spaces"]["ldvae"]["n_leaves"]
    settings = settings_from_params(params, models="ldvae", num_samples=3, address="10.0.0.1:6380")
    assert settings.num_samples == 3 and settings.address == "10.0.0.1:6380" and os.path.isabs(settings.data)
    assert settings.fixed_params("ldvae")["max_epochs"] == settings.max_epochs
    for bad, message in (
        ({"budgets": {"nope": {"num_samples": 2}}}, "tune.budgets.nope: not a model"),
        ({"budgets": {"ldvae": {"epochs": 2}}}, "keys among num_samples"),
        ({"budgets": {"ldvae": {"max_epochs": 0}}}, "tune.budgets.ldvae.max_epochs: expected a whole number"),
        ({"select": {"metric": "accuracy"}}, "tune.select.metric: 'accuracy' is not a compared metric"),
        ({"select": {"mode": "best"}}, "tune.select.mode: expected max or min"),
        ({"select": {"tie_break": "speed"}}, "tune.select.tie_break"),
        ({"startup_trials": -1}, "startup_trials must be >= 0"),
        ({"reuse_actors": "no"}, "tune.reuse_actors must be true or false, got 'no'"),
    ):
        with pytest.raises(ScdgmError, match=message):
            settings_from_params({**params, "tune": {**params["tune"], **bad}}, models="ldvae")
    per_model = {**params, "tune": {**params["tune"], "budgets": {"ldvae": {"num_samples": 2, "max_epochs": 7}},
                                    "spaces": {**params["tune"]["spaces"], "pca": {"n_latent": ["int", 2, 3]}}}}
    settings = settings_from_params(per_model, models="ldvae,pca")
    assert (settings.budget("ldvae").num_samples, settings.budget("ldvae").max_epochs) == (2, 7)
    assert settings.budget("pca").num_samples == settings.num_samples
    assert settings.fixed_params("ldvae")["max_epochs"] == 7 and "max_epochs" not in settings.fixed_params("pca")
    scaled = settings_from_params(per_model, models="ldvae,pca", max_epochs=30)  # the command line scales every model
    assert scaled.budget("ldvae").max_epochs == 30 and scaled.budget("ldvae").num_samples == 2


FAMILY_SPACES = {
    "vae": TINY_SPACE,
    "ldvae": TINY_SPACE,
    "ae": {"n_hidden": ["choice", 16, 32], "n_latent": ["int", 2, 4], "lr": ["loguniform", 1e-3, 3e-2]},
    "gan": {"n_hidden": ["choice", 16, 32], "n_layers": 1, "n_latent": ["int", 2, 4], "n_critic": ["choice", 2, 3]},
    "dbm": {"n_hidden1": ["choice", 16, 32], "n_hidden2": 8, "gibbs_steps": ["int", 1, 2], "n_chains": 50, "burn_in": 20},
    "pca": {"n_latent": ["int", 2, 4]},
}


def test_every_family_is_swept_compared_on_test_cells_and_the_champion_trained(tiny_data, local_ray, tmp_path, monkeypatch):
    """The pipeline's default sweep on small data: one study per family under one sweep run, the first trials of
    each never pruned, the refits compared on the test cells, the champion picked by tune.select and trained by
    `scdgm train --model champion --sweep` with the sweep's budget."""
    from scdgm.models import MODEL_KINDS
    from scdgm.pipelines.cli import main
    from scdgm.pipelines.compare import METRICS, select_champion

    uri = isolated_tracking(monkeypatch, tmp_path)
    params = load_params(tiny_params(
        tmp_path, tiny_data, models=list(MODEL_KINDS), num_samples=3, max_concurrent=2, max_epochs=2, grace_period=1,
        startup_trials=2, spaces=FAMILY_SPACES,  # budgets merge key by key with the packaged gan and dbm ones
        budgets={"gan": {"num_samples": 3, "max_epochs": 2, "grace_period": 1}, "dbm": {"max_epochs": 2}, "pca": {"num_samples": 2}},
    ))
    settings = settings_from_params(params, name="families")
    outcome = run_sweep(settings)

    assert list(outcome.models) == list(MODEL_KINDS)
    for kind, result in outcome.models.items():
        trials = optuna.load_study(study_name=f"families-{kind}", storage=settings.storage).trials
        assert len(trials) == settings.budget(kind).num_samples
        assert [t.state.name for t in trials[:2]] == ["COMPLETE", "COMPLETE"]  # startup trials are never pruned
        assert result.completed >= 2 and result.failed == 0
    table = pd.read_csv(tmp_path / "tune" / "comparison.csv", index_col="model")
    assert list(table.index) == list(MODEL_KINDS)
    shared = ["label_transfer_accuracy", "label_transfer_coverage", "knn_accuracy", "silhouette", "mmd_prior",
              "c2st_prior", "mmd_posterior", "c2st_posterior", "training_seconds", "cells_per_second"]
    assert table[shared].notna().all().all()  # every family: the same metrics on the same test cells
    assert table.loc[["vae", "ldvae"], "nll_elbo"].notna().all() and table.loc[["gan", "pca"], "nll_elbo"].isna().all()
    assert table["label_transfer_accuracy"].between(0, 1).all() and table["label_transfer_coverage"].between(0, 1).all()
    expected = select_champion(table[[m.name for m in METRICS]], "label_transfer_accuracy", "max", "knn_accuracy")
    assert outcome.champion.champion == expected.champion  # the declared rule, recomputed from the written table
    best = json.loads((tmp_path / "tune" / "best.json").read_text())
    assert best["champion"]["champion"] == expected.champion and best["champion"]["reason"] in (tmp_path / "tune" / "comparison.md").read_text()
    assert (tmp_path / "tune" / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (parent,) = runs_by_role(uri, "sweep")
    assert parent.data.tags["scdgm.champion"] == expected.champion
    logged = {a.path for a in mlflow.MlflowClient(uri).list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/comparison.png", "sweep/comparison.csv", "sweep/comparison.md"} <= logged
    assert {f"{kind}.label_transfer_accuracy" for kind in MODEL_KINDS} <= set(parent.data.metrics)

    document = yaml.safe_load((tmp_path / "tune" / "best_params.yaml").read_text())
    assert document["champion"] == expected.champion and document["train"]["gan"]["max_epochs"] == 2
    assert "max_epochs" not in document["train"]["pca"]
    monkeypatch.chdir(tmp_path)
    main(["train", "--model", "champion", "--sweep", "tune", "--data", str(tiny_data), "--out", "champion"])
    trained = json.loads((tmp_path / "champion" / "config.json").read_text())
    assert trained["kind"] == expected.champion
    main(["train", "--model", "gan", "--sweep", "tune", "--data", str(tiny_data), "--out", "gan"])
    gan = json.loads((tmp_path / "gan" / "metrics.json").read_text())
    assert gan["epochs"] <= 2  # the sweep's budget, not train.common.max_epochs
    for argv in (["--model", "champion"], ["--model", "vae", "--sweep", "nowhere"],
                 ["--model", "vae", "--sweep", "tune", "--params", "tune/best_params.yaml"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", *argv, "--data", str(tiny_data), "--out", "x"])
        assert exit_info.value.code == 2 and not (tmp_path / "x").exists()


def test_postgres_urls_get_the_installed_driver():
    assert normalize_database_url("postgresql://u@h:5432/db") == "postgresql+psycopg2://u@h:5432/db"
    assert normalize_database_url("postgres://u:pw@h/db") == "postgresql+psycopg2://u:pw@h/db"
    for kept in ("postgresql+psycopg://u@h/db", "sqlite:////tmp/o.db", "mysql+pymysql://u@h/db", "http://h:5000"):
        assert normalize_database_url(kept) == kept


@pytest.fixture
def postgres_databases():
    """Two throwaway databases (Optuna's, MLflow's: both keep an alembic_version table), as USER@HOST:PORT/DB."""
    with throwaway_databases("optuna", "mlflow") as names:
        yield names


@pytest.mark.postgres
@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_plain_postgres_urls_work_for_optuna_and_mlflow(postgres_databases, scheme, tmp_path, monkeypatch):
    optuna_db, mlflow_db = postgres_databases
    settings = SweepSettings(models=["ldvae"], data="unused.h5ad", name="pg", storage=f"{scheme}://{optuna_db}")
    optuna.create_study(study_name="pg", storage=settings.storage).optimize(lambda t: t.suggest_float("x", 0, 1), 2)
    assert len(optuna.load_study(study_name="pg", storage=settings.storage).trials) == 2

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"{scheme}://{mlflow_db}")  # as `scdgm tune --help` shows it
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)  # artifacts of a database store go to the project's mlartifacts/
    with tracking.training_run("ldvae", {"n_latent": 2}, None, experiment="pg", uri=tracking.tracking_uri()) as run:
        tracking.log_metrics(run.client, run.run_id, {"validation_loss": 1.0})
    assert mlflow.MlflowClient(tracking.tracking_uri()).get_run(run.run_id).info.status == "FINISHED"
