"""MLproject: every entry point is declared with typed parameters, and `mlflow run . -e tune` runs a sweep
offline whose parent run is the run `mlflow run` opened."""
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from repo import REPO_ROOT
from tracking_helpers import runs_by_role, write_tiny_prepared

ENTRY_POINTS = {"fetch", "prepare", "train", "tune", "explain", "evaluate", "register"}
MLPROJECT_TYPES = {"string", "float", "path", "uri"}


def test_mlproject_declares_every_entry_point_with_typed_parameters():
    project = yaml.safe_load((REPO_ROOT / "MLproject").read_text())
    assert set(project["entry_points"]) == ENTRY_POINTS
    for name, entry in project["entry_points"].items():
        for parameter, spec in entry["parameters"].items():
            assert spec["type"] in MLPROJECT_TYPES, (name, parameter)
            assert "{" + parameter + "}" in entry["command"], (name, parameter)
        assert entry["command"].startswith("scdgm "), name


@pytest.mark.slow
def test_mlflow_run_tune_entry_point_offline(tmp_path):
    data = write_tiny_prepared(tmp_path / "tiny.h5ad")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_RUN_ID", None)
    result = subprocess.run(
        [str(bin_dir / "mlflow"), "run", str(REPO_ROOT), "-e", "tune", "--env-manager", "local",
         "--experiment-name", "mlproject",
         "-P", "model=ldvae", "-P", "num_samples=4", "-P", "max_epochs=2", "-P", "max_concurrent=1",
         "-P", f"data={data}", "-P", f"out={tmp_path / 'tune'}", "-P", f"storage=sqlite:///{tmp_path / 'optuna.db'}",
         "-P", f"results_dir={tmp_path / 'ray_results'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (parent,) = runs_by_role(uri, "sweep")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags.get("mlflow.project.entryPoint") == "tune"  # the run `mlflow run` opened
    trials = runs_by_role(uri, "trial")
    assert len(trials) == 4 and {t.data.tags["mlflow.parentRunId"] for t in trials} == {parent.info.run_id}
    assert mlflow.MlflowClient(uri).get_experiment(parent.info.experiment_id).name == "mlproject"
    assert (tmp_path / "tune" / "best_params.yaml").is_file()
