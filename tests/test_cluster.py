"""Beyond one machine, in miniature: a two-node Ray cluster runs the trials (some on each node), every trial
logs to one MLflow tracking server backed by PostgreSQL, and the Optuna study lives in PostgreSQL."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import optuna
import pytest
from tracking_helpers import (
    POSTGRES,
    require_postgres,
    runs_by_role,
    throwaway_databases,
    tiny_params,
    write_tiny_prepared,
)

from scdgm.pipelines.config import load_params
from scdgm.pipelines.sweep import run_sweep
from scdgm.pipelines.tune import settings_from_params

pytestmark = pytest.mark.postgres
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_postgres_fails_under_ci_and_is_skipped_elsewhere(monkeypatch):
    monkeypatch.setitem(POSTGRES, "port", free_port())  # nothing listens there
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"not reachable .*CI=true"):
        require_postgres()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=r"PostgreSQL at 127\.0\.0\.1:\d+ is not reachable"):
        require_postgres()


@pytest.fixture
def databases():
    """Two fresh databases (MLflow's and Optuna's), dropped afterwards."""
    with throwaway_databases("mlflow", "optuna") as names:
        # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; the project ships psycopg2
        yield [f"postgresql+psycopg2://{name}" for name in names]


@pytest.fixture
def tracking_server(databases, tmp_path):
    """A lean `mlflow server` on PostgreSQL with proxied artifacts; stopped by PID."""
    port = free_port()
    log = (tmp_path / "mlflow-server.log").open("w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--workers", "1", "--host", "127.0.0.1",
         "--port", str(port), "--backend-store-uri", databases[0], "--artifacts-destination", str(tmp_path / "artifacts")],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start: {(tmp_path / 'mlflow-server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the server's own process group: uvicorn and its worker
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.fixture
def cluster(monkeypatch):
    """A local two-node Ray cluster (head and one worker, one CPU each) in its own short temp dir."""
    import ray
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="ray_", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", temp_dir)  # also where Ray notes the "current cluster" address
    os.makedirs(os.path.join(temp_dir, "ray"))
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": temp_dir, "include_dashboard": False})
    try:
        nodes.add_node(num_cpus=1, temp_dir=temp_dir)
        nodes.wait_for_nodes()
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_sweep_on_a_two_node_cluster_with_a_tracking_server_and_postgres(databases, tracking_server, cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    data = write_tiny_prepared(tmp_path / "tiny.h5ad")
    # A process per trial: with actor reuse, a loaded machine lets the head's trial finish before the worker
    # node's process has started, and Ray Tune hands the waiting trial to the head's idle process (CI saw it).
    # Without reuse the two first trials hold one CPU on each node until their own processes run them.
    params = load_params(tiny_params(tmp_path, data, max_concurrent=2, max_epochs=3, storage=databases[1],
                                     reuse_actors=False))
    settings = settings_from_params(params, name="cluster", address=cluster.address)
    outcome = run_sweep(settings).models["ldvae"]

    trials = runs_by_role(tracking_server, "trial")
    assert len(trials) == outcome.trials == 4
    assert {t.info.status for t in trials} <= {"FINISHED", "FAILED"}
    nodes = {t.data.tags["ray.node_id"] for t in trials}
    assert len(nodes) == 2, f"trials ran on one node only: {sorted(nodes)} of {[n.node_id for n in cluster.list_all_nodes()]}"
    assert all(t.data.tags["ray.node_ip"] for t in trials)
    (parent,) = runs_by_role(tracking_server, "sweep")
    assert parent.info.status == "FINISHED" and parent.info.artifact_uri.startswith("mlflow-artifacts:")
    assert mlflow.pyfunc.load_model(f"runs:/{parent.info.run_id}/model").metadata.signature is not None
    study = optuna.load_study(study_name="cluster", storage=databases[1])
    assert len(study.trials) == 4 and all(t.state.is_finished() for t in study.trials)
