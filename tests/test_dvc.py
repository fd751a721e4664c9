"""DVC: the project's pipeline definition, and a tiny simulate -> prepare project that reproduces incrementally."""
import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from repo import REPO_ROOT

BIN = Path(sys.executable).parent
TINY_PIPELINE = {
    "stages": {
        "simulate": {
            "cmd": "scdgm data simulate --n-cells 300 --n-genes 200 --n-programs 5 --genes-per-program 10 "
            "--seed ${seed} --out data/simulated.h5ad",
            "outs": ["data/simulated.h5ad"],
        },
        "prepare": {
            "cmd": "scdgm prepare --input data/simulated.h5ad --out data/prepared.h5ad --label-key cell_type "
            "--params params.yaml",
            "deps": ["data/simulated.h5ad"],
            "params": ["seed", "prepare"],
            "outs": ["data/prepared.h5ad"],
        },
    }
}
TINY_PARAMS = {"seed": 0, "prepare": {"min_genes": 10, "max_genes": None, "n_top_genes": 200}}  # keeps all 200 genes


def dvc(project: Path, *args: str) -> str:
    """Run the venv's dvc in `project` (analytics off, the venv's scdgm first on PATH); return its output."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        [str(BIN / "dvc"), *args], cwd=project, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_project_pipeline_tracks_code_params_and_data():
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages)[:2] == ["fetch", "prepare"]
    assert stages["fetch"]["cmd"].startswith("scdgm data fetch")
    prepare = stages["prepare"]
    code = {"pipelines/prepare.py", "pipelines/annotate.py", "pipelines/io.py", "pipelines/resources/pbmc_markers.tsv"}
    assert code <= set(prepare["deps"])
    assert stages["fetch"]["outs"][0] in prepare["deps"]
    assert set(prepare["params"]) == {"seed", "prepare"}
    config = configparser.ConfigParser()
    config.read(REPO_ROOT / ".dvc" / "config")
    assert config["core"]["analytics"] == "false"
    remote = config["core"]["remote"]
    url = config[f"'remote \"{remote}\"'"]["url"]
    assert not os.path.isabs(url)  # works wherever the repository is cloned
    ignored = (REPO_ROOT / ".dvc" / ".gitignore").read_text().split()
    assert f"/{url}" in ignored


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    """A git repository holding a copy of the project's DVC configuration and a simulate -> prepare pipeline."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".dvc").mkdir()
    for name in (".dvc/config", ".dvc/.gitignore", ".dvcignore"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(TINY_PIPELINE, sort_keys=False))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    return tmp_path


def test_repro_is_incremental_and_data_round_trips_through_the_remote(tiny_project):
    first = dvc(tiny_project, "repro")
    assert "Running stage 'simulate'" in first and "Running stage 'prepare'" in first
    assert "Data and pipelines are up to date." in dvc(tiny_project, "repro")

    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    params["prepare"]["split"] = {"train": 0.6, "validation": 0.2, "test": 0.2}
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params))
    third = dvc(tiny_project, "repro")
    assert "Running stage 'prepare'" in third and "Running stage 'simulate'" not in third
    lock = yaml.safe_load((tiny_project / "dvc.lock").read_text())
    assert lock["stages"]["prepare"]["params"]["params.yaml"]["prepare"]["split"]["train"] == 0.6

    prepared = tiny_project / "data" / "prepared.h5ad"
    content = prepared.read_bytes()
    dvc(tiny_project, "push")
    shutil.rmtree(tiny_project / ".dvc" / "cache")
    prepared.unlink()
    dvc(tiny_project, "pull")
    assert prepared.read_bytes() == content


def test_the_demo_pipeline_is_the_only_one_dvc_collects() -> None:
    """`dvc repro` in this repository sees the demo's stages only: scdgm init's template dvc.yaml (package data)
    would otherwise be collected as a second pipeline whose ${data.*} cannot resolve."""
    stages = dvc(REPO_ROOT, "stage", "list", "--all")
    names = [line.split()[0] for line in stages.splitlines() if line.strip()]
    assert names == list(yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"])


@pytest.mark.parametrize("pipeline", [REPO_ROOT / "dvc.yaml", REPO_ROOT / "scdgm" / "resources" / "project" / "dvc.yaml"])
def test_each_plot_is_listed_once(pipeline: Path) -> None:
    """`dvc plots show` draws a file once per listing: stage-level plots and top-level plots must not overlap, and
    figures that a sweep may legitimately skip are not listed (a missing plot is an error in DVC)."""
    document = yaml.safe_load(pipeline.read_text())
    listed = [next(iter(p)) if isinstance(p, dict) else p for p in document.get("plots", [])]
    for stage in document["stages"].values():
        listed += [next(iter(p)) if isinstance(p, dict) else p for p in stage.get("plots", [])]
    assert len(listed) == len(set(listed)), listed
    assert not [p for p in listed if p.endswith(("_importance.png", "_history.png"))]
