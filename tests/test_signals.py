"""Ctrl+C (SIGINT) and SIGTERM stop the real `scdgm` command cleanly: exit 130 / 143 with one line, every MLflow
run it opened KILLED, every Optuna trial of a sweep finished (none RUNNING), its Ray and Ray's temp folder gone,
no output or staging folder left; a server shuts down."""
from __future__ import annotations

import glob
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import mlflow
import optuna
import pytest
from tracking_helpers import isolated_tracking, tiny_params, write_tiny_prepared

from scdgm.errors import Terminated, uninterrupted
from scdgm.pipelines import tracking
from scdgm.pipelines.cli import main, stop_on_signals
from scdgm.stores import is_database

SCDGM = str(Path(sys.executable).with_name("scdgm"))
CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
FOREVER = ["--set", "max_epochs=100000", "--set", "patience=100000"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A folder with tiny prepared data and a model trained (and tracked) from it."""
    folder = tmp_path_factory.mktemp("signals")
    data = write_tiny_prepared(folder / "tiny.h5ad")
    with pytest.MonkeyPatch.context() as monkeypatch:
        isolated_tracking(monkeypatch, folder)
        main(["train", "--model", "ldvae", "--data", str(data), "--out", str(folder / "model"), "--set", "max_epochs=3"])
    return folder


def start(project: Path, tmp_path: Path, *args: str) -> subprocess.Popen:
    """`scdgm ARGS` as its own process, with its project and MLflow store in `tmp_path`."""
    environment = {**os.environ, "SCDGM_PROJECT": str(tmp_path), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    environment.pop("MLFLOW_RUN_ID", None)
    return subprocess.Popen(
        [SCDGM, *args], cwd=project, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(process: subprocess.Popen, ready: Callable[[], bool], timeout: float = 180.0) -> None:
    """Poll `ready` until it holds, failing when `process` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            pytest.fail(f"scdgm ended early with {process.returncode}: {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("timed out waiting for the command to get under way")
        time.sleep(0.3)


def stop(process: subprocess.Popen, signum: int) -> str:
    """Send `signum`, wait for the exit; the exit code must be the signal's, the last line of stderr says it."""
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == CODES[signum], stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert signal.Signals(signum).name in last and "Traceback" not in stderr
    return last


def runs(tmp_path: Path, role: str | None = None) -> list:
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    where = f"tags.`scdgm.role` = '{role}'" if role else ""
    return client.search_runs(experiments, where, max_results=1000) if experiments else []


def epoch_logged(tmp_path: Path, role: str) -> Callable[[], bool]:
    """Whether a RUNNING run of `role` has logged a per-epoch metric: training is under way. Read with plain
    read-only SQL: an MLflow client would race the command in creating the store's tables."""
    query = (
        "SELECT count(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'scdgm.role' AND t.value = ?"
        " JOIN latest_metrics m ON m.run_uuid = r.run_uuid AND m.key = 'validation_loss' WHERE r.status = 'RUNNING'"
    )

    def ready() -> bool:
        try:
            with closing(sqlite3.connect(f"file:{tmp_path / 'mlflow.db'}?mode=ro", uri=True)) as database:
                return database.execute(query, (role,)).fetchone()[0] > 0
        except sqlite3.Error:  # not created yet
            return False

    return ready


def ray_folders(pid: int) -> set[str]:
    """The temp folders of the Ray that process `pid` started (its session folder names end with the pid)."""
    return {str(Path(p).parent) for p in glob.glob(f"/tmp/scdgm-ray-*/session_*_{pid}")}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_train_ends_its_run_killed_and_writes_nothing(project, tmp_path, signum):
    out = tmp_path / "model"
    process = start(project, tmp_path, "train", "--model", "ldvae", "--data", "tiny.h5ad", "--out", str(out), *FOREVER)
    wait_for(process, epoch_logged(tmp_path, "train"))
    stop(process, signum)
    assert [r.info.status for r in runs(tmp_path)] == ["KILLED"]
    assert not out.exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_tune_closes_runs_and_trials_and_removes_ray(project, tmp_path, signum):
    params = tiny_params(tmp_path, project / "tiny.h5ad", num_samples=3, max_epochs=100000, grace_period=100000)
    process = start(
        project, tmp_path, "tune", "--params", str(params), "--name", "stopped", "--num-cpus", "2",
        "--set", "train.common.patience=100000",
    )
    wait_for(process, epoch_logged(tmp_path, "trial"))
    ray = ray_folders(process.pid)
    assert ray, "the sweep's private Ray temp folder was not found"
    assert "--resume" in stop(process, signum)
    statuses = {r.info.status for r in runs(tmp_path)}
    assert statuses == {"KILLED"}, statuses  # the sweep run and the trial run(s): none RUNNING, none FINISHED
    study = optuna.load_study(study_name="stopped", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert study.trials and {t.state.name for t in study.trials} == {"FAIL"}
    assert not any(Path(folder).exists() for folder in ray)
    assert not (tmp_path / "tune").exists()


def test_explain_stops_without_output(project, tmp_path):
    out = tmp_path / "explanation"
    process = start(
        project, tmp_path, "explain", "--model", "model", "--data", "tiny.h5ad", "--permutations", "100000",
        "--out", str(out),
    )
    def working() -> bool:  # past the imports (torch comes last): loading, sampling, selecting genes
        try:
            return "libtorch" in Path(f"/proc/{process.pid}/maps").read_text()
        except OSError:
            return False

    wait_for(process, working)
    time.sleep(3)
    assert process.poll() is None
    stop(process, signal.SIGINT)
    assert not out.exists() and not leftovers(tmp_path)
    assert "RUNNING" not in {r.info.status for r in runs(tmp_path) + runs(project)}  # the model's store too


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize(("mode", "signum"), [(["--workers", "1"], signal.SIGTERM), (["--workers", "2"], signal.SIGINT),
                                             (["--ray", "--replicas", "1"], signal.SIGTERM)],
                         ids=["1-SIGTERM", "2-SIGINT", "ray-SIGTERM"])
def test_serve_shuts_down_with_the_signals_code(project, tmp_path, mode, signum):
    port = free_port()
    process = start(project, tmp_path, "serve", "--model-uri", "model", "--port", str(port), *mode)

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    wait_for(process, healthy)
    stop(process, signum)
    assert not healthy()


def test_a_stop_signal_waits_for_the_end_of_an_uninterrupted_write():
    """A signal that arrives while a tracking write runs (`uninterrupted`) is held to the write's end, then stops
    the command as any other: no SQLite transaction is cut in two (it would lock the store against the write that
    marks the run KILLED)."""
    finished = False
    with stop_on_signals(), pytest.raises(Terminated) as stopped, uninterrupted():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler has run by now, and held the signal
        finished = True
    assert finished and stopped.value.signum == signal.SIGTERM


def test_a_signal_during_a_database_write_waits_for_its_commit(tmp_path, monkeypatch):
    """A SIGTERM that comes while a tracking client's write waits on a locked SQLite store is held: the write
    commits, then the command stops, and the store takes the next write (a write cut in two would keep it locked)."""
    uri = isolated_tracking(monkeypatch, tmp_path)
    mlflow_client = tracking.client(uri)
    run_id = tracking.start_run(mlflow_client, "signals", "held", {})
    lock = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None, check_same_thread=False)
    lock.execute("BEGIN EXCLUSIVE")  # the client's next write waits for this transaction

    def signal_then_unlock() -> None:
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread, which is inside the write
        time.sleep(0.3)
        lock.execute("COMMIT")

    helper = threading.Thread(target=signal_then_unlock)
    helper.start()
    try:
        with stop_on_signals(), pytest.raises(Terminated):
            mlflow_client.set_tag(run_id, "written", "whole")
            time.sleep(1)  # a signal not raised by the end of the write is raised here at the latest
            pytest.fail("SIGTERM did not stop the block")
    finally:
        helper.join()
        lock.close()
    mlflow_client.set_terminated(run_id, "KILLED")  # the store is not locked
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.data.tags["written"] == "whole" and run.info.status == "KILLED"


def test_a_signal_while_a_run_opens_ends_it_killed(tmp_path, monkeypatch):
    """A stop signal between creating a run and entering the block that closes it: the run is still closed."""
    uri = isolated_tracking(monkeypatch, tmp_path)
    mlflow_client = tracking.client(uri)
    opened = []

    def open_run() -> str:
        opened.append(tracking.start_run(mlflow_client, "signals", "opening", {}))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler has run by now, and held the signal
        return opened[0]

    with stop_on_signals(), pytest.raises(Terminated), tracking.ending_run(mlflow_client, open_run):
        pytest.fail("the block ran after the signal")
    assert mlflow.MlflowClient(tracking_uri=uri).get_run(opened[0]).info.status == "KILLED"


@pytest.mark.parametrize(
    ("uri", "database"),
    [("sqlite:////tmp/mlflow.db", True), ("postgresql+psycopg2://root@127.0.0.1:5432/test", True),
     ("mysql://u@h/db", True), ("http://127.0.0.1:5000", False), ("https://mlflow.example.org", False),
     ("/tmp/mlruns", False), ("file:///tmp/mlruns", False)],
)
def test_only_database_stores_hold_signals(uri, database):
    assert is_database(uri) is database
