"""MLproject: every entry point is declared with typed parameters and writes nowhere the DVC pipeline does; the
documented `mlflow run . -e tune` (docs/tracking.md) runs a sweep offline in the project's store and experiment
whose parent run is the run `mlflow run` opened, and `-e evaluate` logs its metrics to the run it opened. The
sweep runs on params.yaml changed as the README's `dvc exp run -S` example changes it, and carries the change
into the best parameters that the DVC train stage reads."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from docblocks import blocks
from repo import REPO_ROOT
from tracking_helpers import runs_by_role, write_tiny_prepared

from scdgm.pipelines.scaffold import Starter, mlproject_text
from scdgm.pipelines.tracking import experiment_id

ENTRY_POINTS = {"fetch", "prepare", "train", "tune", "explain", "evaluate", "register"}
MLPROJECT_TYPES = {"string", "float", "path", "uri"}
WRITTEN = {"fetch": "out", "prepare": "out", "train": "out", "tune": "out", "explain": "model", "evaluate": "out"}
"""Per entry point, the parameter naming what it writes (explain writes into the model directory)."""
OWN_FOLDERS = ("data/mlproject/", "artifacts/mlproject/", "reports/mlproject")
TRACKING = REPO_ROOT / "docs" / "tracking.md"
BIN = Path(sys.executable).parent


def pipeline_outputs() -> set[str]:
    """The outs of the repository's dvc.yaml, ${...} resolved from its params.yaml."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())

    def resolve(text: str) -> str:
        def value(match: re.Match) -> str:
            node = params
            for key in match.group(1).split("."):
                node = node[key]
            return str(node)

        return re.sub(r"\$\{([^}]+)\}", value, text)

    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    outs = [out for stage in stages.values() for out in stage.get("outs", []) + stage.get("metrics", [])]
    return {resolve(next(iter(out)) if isinstance(out, dict) else out) for out in outs} | {"reports/history.csv",
                                                                                        "reports/figures"}


def test_mlproject_declares_every_entry_point_with_typed_parameters():
    project = yaml.safe_load((REPO_ROOT / "MLproject").read_text())
    assert set(project["entry_points"]) == ENTRY_POINTS
    for name, entry in project["entry_points"].items():
        for parameter, spec in entry["parameters"].items():
            assert spec["type"] in MLPROJECT_TYPES, (name, parameter)
            assert "{" + parameter + "}" in entry["command"], (name, parameter)
        assert entry["command"].startswith("scdgm "), name


@pytest.mark.parametrize("source", ["repository", "scdgm init"])
def test_entry_points_never_write_the_pipelines_outputs_nor_move_champion(source: str) -> None:
    if source == "repository":
        project = yaml.safe_load((REPO_ROOT / "MLproject").read_text())
    else:
        starter = Starter("cells", "cells.h5ad", "data/prepared/cells.h5ad", "vae", "artifacts/cells-vae", "cells-vae",
                          "champion")
        project = yaml.safe_load(mlproject_text(starter))
    outputs = pipeline_outputs() | {"artifacts/cells-vae", "data/prepared/cells.h5ad", "reports/tune"}
    for name, entry in project["entry_points"].items():
        if name in WRITTEN:
            written = str(entry["parameters"][WRITTEN[name]]["default"])
            assert written.startswith(OWN_FOLDERS), (name, written)
            assert not any(written == out or written.startswith(out + "/") for out in outputs), (name, written)
        for option in ("--history", "--figures", "--out"):  # evaluate's other outputs follow its out
            assert f"{option} reports/" not in entry["command"], (name, entry["command"])
    register = project["entry_points"]["register"]["parameters"]
    assert register["alias"]["default"] == "mlproject"


def readme_experiment() -> tuple[str, str]:
    """The key and value of the README's `dvc exp run -S key=value` example."""
    key, value = re.search(r"dvc exp run -S ([\w.]+)=(\S+?)`", (REPO_ROOT / "README.md").read_text()).groups()
    return key, value


def test_readme_experiment_reaches_the_trained_model() -> None:
    """The README's `dvc exp run -S` changes a parameter the tune stage depends on, and the train stage trains with
    the sweep's best parameters (test_documented_mlflow_run_tune_lands_in_the_project checks that they carry it)."""
    key, _ = readme_experiment()
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    assert key.split(".")[0] in stages["tune"]["params"] and key.startswith("tune.spaces.")
    assert "--sweep ${tune.out}" in stages["train"]["cmd"]


def project_env() -> dict[str, str]:
    """The environment of a user in a shell: scdgm and mlflow on PATH, no store or run chosen yet."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "SCDGM_PROJECT")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    return env


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder as `make demo` leaves it, in miniature: the MLproject, prepared cells where the pipeline
    writes them, the `scdgm` experiment (created by scdgm, artifacts in mlartifacts/) and a pipeline sweep output."""
    folder = tmp_path_factory.mktemp("mlproject")
    shutil.copy(REPO_ROOT / "MLproject", folder / "MLproject")
    key, value = readme_experiment()
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    section = params
    *parents, last = key.split(".")
    for part in parents:
        section = section[part]
    section[last] = yaml.safe_load(value)  # what `dvc exp run -S key=value` writes into params.yaml
    (folder / "params.yaml").write_text(yaml.safe_dump(params))
    (folder / "data" / "prepared").mkdir(parents=True)
    write_tiny_prepared(folder / "data" / "prepared" / "pbmc3k.h5ad")
    (folder / "reports" / "tune").mkdir(parents=True)
    (folder / "reports" / "tune" / "best_params.yaml").write_text("# the pipeline's\n")
    experiment_id("scdgm", f"sqlite:///{folder / 'mlflow.db'}")
    return folder


def run_in(folder: Path, script: str) -> None:
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=folder, env=project_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def assert_in_project_experiment(folder: Path, run: mlflow.entities.Run, entry_point: str) -> None:
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    assert run.data.tags.get("mlflow.project.entryPoint") == entry_point  # the run `mlflow run` opened
    assert client.get_experiment(run.info.experiment_id).name == "scdgm"
    assert run.info.artifact_uri.startswith(str(folder / "mlartifacts")), run.info.artifact_uri
    assert not (folder / "mlruns").exists()
    assert not client.search_runs(["0"]), "nothing lands in MLflow's Default experiment"


@pytest.mark.slow
def test_documented_mlflow_run_tune_lands_in_the_project(project: Path) -> None:
    """docs/tracking.md's block, with the sweep shrunk to 2 epochs and 1 trial at a time."""
    block, = blocks(TRACKING, "## MLflow Projects and DVC", "bash")
    assert "--experiment-name scdgm" in block and "MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow.db" in block
    run_in(project, block.replace("--env-manager local", "--env-manager local -P max_epochs=2 -P max_concurrent=1"))
    uri = f"sqlite:///{project / 'mlflow.db'}"
    (parent,) = runs_by_role(uri, "sweep")
    assert parent.info.status == "FINISHED"
    assert_in_project_experiment(project, parent, "tune")
    trials = runs_by_role(uri, "trial")
    assert len(trials) == 4 and {t.data.tags["mlflow.parentRunId"] for t in trials} == {parent.info.run_id}
    key, value = readme_experiment()
    model, name = key.split(".")[2:]
    best = yaml.safe_load((project / "reports" / "mlproject" / "tune" / "best_params.yaml").read_text())
    assert best["train"][model][name] == int(value)  # what the DVC train stage trains with
    assert {t.data.params[name] for t in trials} == {value}
    assert (project / "reports" / "tune" / "best_params.yaml").read_text() == "# the pipeline's\n"


@pytest.mark.slow
def test_mlflow_run_train_then_evaluate_logs_the_metrics(project: Path) -> None:
    command = ("export MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow.db\n"
               "mlflow run . -e {entry} --env-manager local --experiment-name scdgm {extra}\n")
    run_in(project, command.format(entry="train", extra="-P max_epochs=2"))
    run_in(project, command.format(entry="evaluate", extra=""))
    uri = f"sqlite:///{project / 'mlflow.db'}"
    (trained,) = runs_by_role(uri, "train")
    assert_in_project_experiment(project, trained, "train")
    (evaluated,) = runs_by_role(uri, "evaluate")
    assert_in_project_experiment(project, evaluated, "evaluate")
    assert evaluated.data.metrics["test_nll_elbo"] > 0
    assert (project / "reports" / "mlproject" / "metrics.json").is_file()
    assert not (project / "reports" / "metrics.json").exists() and not (project / "reports" / "history.csv").exists()
    assert (project / "artifacts" / "mlproject" / "ldvae" / "config.json").is_file()
