"""Shared by the tracking, tuning, registry and cluster tests: a tiny prepared data set, an isolated MLflow
store and Optuna storage per test, and readers for what they hold."""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import yaml
from repo import REPO_ROOT

from scdgm.pipelines.config import load_params

TINY_SPACE = {
    "n_hidden": ["choice", 16, 32],
    "n_latent": ["int", 2, 4],
    "lr": ["loguniform", 1e-3, 3e-2],
    "batch_size": ["choice", 64, 128],
}


def write_tiny_prepared(path: Path, n_cells: int = 400, n_genes: int = 120, seed: int = 0) -> Path:
    """Simulated counts run through `prepare` (QC, HVG, split), written as .h5ad."""
    from scdgm.pipelines.io import write_h5ad_atomic
    from scdgm.pipelines.prepare import prepare
    from scdgm.pipelines.simulate import simulate_programs

    raw = simulate_programs(n_cells, n_genes, n_types=3, n_programs=4, genes_per_program=10, seed=seed)
    settings = {"min_genes": 5, "max_genes": None, "min_cells": 3, "n_top_genes": n_genes // 2}
    return write_h5ad_atomic(prepare(raw, settings, label_key="cell_type", seed=seed), path)


def tiny_params(tmp_path: Path, data: Path, **tune: Any) -> Path:
    """A params.yaml: the project's, with a tiny ldvae search space and the test's data and folders."""
    params = load_params(REPO_ROOT / "params.yaml")
    params["data"] = {**(params.get("data") or {}), "prepared": str(data)}
    section = dict(params.get("tune") or {})
    section.update(
        {
            "models": ["ldvae"],
            "num_samples": 4,
            "max_concurrent": 1,
            "max_epochs": 4,
            "grace_period": 1,
            "reduction_factor": 2,
            "cpus_per_trial": 1,
            "storage": f"sqlite:///{tmp_path / 'optuna.db'}",
            "results_dir": str(tmp_path / "ray_results"),
            "out": str(tmp_path / "tune"),
            "spaces": {"ldvae": dict(TINY_SPACE)},
            "points_to_evaluate": [],
            "startup_trials": 0,  # ASHA alone: these tests check its pruning
            "budgets": {},
        }
    )
    section.update(tune)
    params["tune"] = section
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def isolated_tracking(monkeypatch: Any, tmp_path: Path) -> str:
    """Point MLflow at a fresh SQLite file in `tmp_path` for this test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    return uri


def runs_by_role(uri: str, role: str) -> list[Any]:
    """Every run of the store tagged with scdgm.role == `role`."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string=f"tags.`scdgm.role` = '{role}'", max_results=1000)


POSTGRES = {"host": "127.0.0.1", "port": 5432, "user": "root", "dbname": "test", "connect_timeout": 3}
"""The PostgreSQL server every machine and CI runs (trust auth)."""


def postgres_error() -> str | None:
    """Why PostgreSQL cannot be used here (None when it can)."""
    try:
        psycopg2.connect(**POSTGRES).close()
    except psycopg2.OperationalError as exc:
        where = f"{POSTGRES['host']}:{POSTGRES['port']}"
        return f"PostgreSQL at {where} is not reachable ({str(exc).strip().splitlines()[0][:120]})"
    return None


def require_postgres() -> None:
    """Skip when PostgreSQL is unreachable, naming why; under CI=true fail instead, since CI provides it."""
    reason = postgres_error()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{reason}; CI=true, where PostgreSQL must run (.ci/run checks it)")
    pytest.skip(reason)


@contextmanager
def throwaway_databases(*roles: str) -> Iterator[list[str]]:
    """One fresh database per role as USER@HOST:PORT/DB (no scheme), dropped afterwards."""
    require_postgres()
    names = [f"scdgm_{role}_{uuid.uuid4().hex[:8]}" for role in roles]
    connection = psycopg2.connect(**POSTGRES)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            for name in names:
                cursor.execute(f'CREATE DATABASE "{name}"')
        yield [f"{POSTGRES['user']}@{POSTGRES['host']}:{POSTGRES['port']}/{name}" for name in names]
    finally:
        with connection.cursor() as cursor:
            for name in names:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.close()
