"""The user's project: `--project`/SCDGM_PROJECT put every piece of state in it, `scdgm init` writes a starter
project and refuses to overwrite one, and lineage records the project's commit and scdgm's version."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml
from repo import REPO_ROOT
from tracking_helpers import write_tiny_prepared

import scdgm
from scdgm.pipelines import tracking
from scdgm.pipelines.cli import main
from scdgm.pipelines.config import load_params
from scdgm.pipelines.simulate import simulate_programs
from scdgm.pipelines.tune import settings_from_params
from scdgm.project import PROJECT_ENV, STATE, project_dir

PACKAGE_DIRS = [Path(scdgm.__file__).parent, *(Path(m.__file__).parent for m in (scdgm.pipelines, scdgm.models))]


def git(folder: Path, *args: str) -> str:
    identity = ["-c", "user.name=test", "-c", "user.email=test@example.org", "-c", "commit.gpgsign=false"]
    return subprocess.run(["git", *identity, *args], cwd=folder, capture_output=True, text=True,
                          check=True).stdout.strip()


def git_project(folder: Path) -> str:
    """Make `folder` a git repository with one commit; returns the commit."""
    folder.mkdir(parents=True, exist_ok=True)
    git(folder, "init", "--quiet")
    (folder / "notes.txt").write_text("my analysis\n")
    git(folder, "add", "notes.txt")
    git(folder, "commit", "--quiet", "-m", "start")
    return git(folder, "rev-parse", "HEAD")


def stray_state() -> list[Path]:
    """State files in the installed package's folders (there must never be any)."""
    return [folder / name for folder in PACKAGE_DIRS for name in STATE if (folder / name).exists()]


@pytest.fixture
def no_project(monkeypatch: pytest.MonkeyPatch) -> None:
    """No project, tracking store or run chosen by the environment; restored after the test."""
    monkeypatch.setenv(PROJECT_ENV, "")  # --project sets it in-process; the monkeypatch undoes that
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.setenv(name, "")  # recorded, so a value MLflow sets during the test is undone too
        monkeypatch.delenv(name)


def fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI expecting a user error: exit code 2 and one line on stderr."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1, message
    return message


def test_project_option_puts_state_in_the_project(tmp_path, monkeypatch, capsys, no_project):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    commit = git_project(project)
    elsewhere.mkdir()
    data = write_tiny_prepared(tmp_path / "cells.h5ad")
    repo_state = {name: (REPO_ROOT / name).stat().st_mtime_ns for name in STATE if (REPO_ROOT / name).exists()}
    monkeypatch.chdir(elsewhere)
    main(["--project", str(project), "train", "--model", "ldvae", "--data", str(data), "--out", "model",
          "--set", "max_epochs=2", "--set", "progress=false", "--set", "n_importance=5"])
    assert (elsewhere / "model" / "config.json").is_file()  # a relative argument is taken from the working folder
    assert (project / "mlflow.db").is_file() and (project / "mlartifacts").is_dir()
    main(["--project", str(project), "evaluate", "--model", "model", "--data", str(data)])
    assert json.loads((project / "reports" / "metrics.json").read_text())["test"]
    assert (project / "reports" / "history.csv").is_file() and (project / "reports" / "figures").is_dir()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["model"]
    assert {name: (REPO_ROOT / name).stat().st_mtime_ns for name in repo_state} == repo_state
    assert not stray_state()
    run = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}").get_run(tracking.RunRecord.read("model").run_id)
    assert run.data.tags[tracking.TAG_COMMIT] == commit  # the project's commit, not scdgm's
    assert run.data.tags[tracking.TAG_VERSION] == scdgm.__version__
    main(["--project", str(project), "report"])
    assert "Test metrics:" in capsys.readouterr().out


def test_scdgm_project_sets_the_sweep_folders_and_params(tmp_path, monkeypatch, no_project):
    (tmp_path / "params.yaml").write_text("tune:\n  num_samples: 3\ndata:\n  prepared: data/cells.h5ad\n")
    monkeypatch.setenv(PROJECT_ENV, str(tmp_path))
    assert project_dir() == tmp_path.resolve()
    params = load_params()
    assert params["tune"]["num_samples"] == 3 and params["train"]["common"]["max_epochs"] == 400
    settings = settings_from_params(params)
    assert settings.storage == f"sqlite:///{tmp_path / 'optuna.db'}"
    assert settings.results_dir == str(tmp_path / "ray_results")
    assert settings.out == str(tmp_path / "reports" / "tune")
    assert settings.data == str(tmp_path / "data" / "cells.h5ad")  # paths in params.yaml: from the project
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_lineage_is_the_projects_commit_and_the_version(tmp_path, monkeypatch):
    monkeypatch.setenv(PROJECT_ENV, str(tmp_path))
    assert tracking.lineage_tags() == {tracking.TAG_VERSION: scdgm.__version__}  # not a git repository
    commit = git_project(tmp_path)
    tags = tracking.lineage_tags()
    assert tags[tracking.TAG_COMMIT] == commit and tags[tracking.TAG_DIRTY] == "false"
    (tmp_path / "notes.txt").write_text("changed\n")
    assert tracking.lineage_tags()[tracking.TAG_DIRTY] == "true"


def test_init_writes_a_starter_project_and_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    simulate_programs(50, 200, seed=0).write_h5ad(tmp_path / "my cells.h5ad")
    main(["init", "proj", "--data", "my cells.h5ad"])
    assert "scdgm prepare --input" in capsys.readouterr().out
    project = tmp_path / "proj"
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["data"] == {"dataset": "my-cells", "raw": str(tmp_path / "my cells.h5ad"),
                              "prepared": "data/prepared/my-cells.h5ad"}
    assert params["register"]["name"] == "my-cells" and params["register"]["model_dir"] == "artifacts/my-cells-champion"
    assert "# fixed: genes detected per cell" in (project / "params.yaml").read_text()  # the commented defaults
    mlproject = yaml.safe_load((project / "MLproject").read_text())
    assert mlproject["entry_points"]["prepare"]["parameters"]["input"]["default"] == str(tmp_path / "my cells.h5ad")
    entries = mlproject["entry_points"]  # one-step entry points take a family; the tune entry sweeps them all
    assert entries["train"]["parameters"]["model"]["default"] == "vae"
    assert entries["tune"]["parameters"]["model"]["default"] == "vae,ldvae,ae,gan,dbm,pca"
    ignored = (project / ".gitignore").read_text().split()
    assert all(f"/{name}" in ignored or f"/{name}/" in ignored for name in STATE)
    assert (project / ".git").is_dir() and "analytics = false" in (project / ".dvc" / "config").read_text()
    before = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text("seed: 7\n")
    assert "--force" in fails(["init", "proj", "--data", "my cells.h5ad"], capsys)
    assert (project / "params.yaml").read_text() == "seed: 7\n"
    main(["init", "proj", "--data", "my cells.h5ad", "--force"])
    assert (project / "params.yaml").read_text() == before
    assert "no such file" in fails(["init", "other", "--data", "missing.h5ad"], capsys)
    assert not (tmp_path / "other").exists()


def test_init_pipeline_is_the_repositorys_without_fetch_and_source_deps() -> None:
    repo = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    starter = yaml.safe_load((Path(scdgm.__file__).parent / "resources" / "project" / "dvc.yaml").read_text())
    assert list(starter["stages"]) == [name for name in repo["stages"] if name != "fetch"]
    for name, stage in starter["stages"].items():
        expected = dict(repo["stages"][name])
        expected["cmd"] = " ".join(expected["cmd"].replace("--params params.yaml", "").split())
        expected["deps"] = [dep for dep in expected["deps"] if str(dep).startswith(("${", "reports/"))]
        assert {**stage, "cmd": " ".join(stage["cmd"].split())} == expected, name
    assert starter["plots"] == repo["plots"]
