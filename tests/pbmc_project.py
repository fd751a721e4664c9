"""The README's promise on real data, built once per test session: this repository's DVC pipeline (fetch →
prepare → tune → train → explain → evaluate → register) run by `dvc repro` on 10x PBMC 3k in a scratch git +
DVC project, with the budget cut to minutes (2 sweep trials of 3 epochs, 60 training epochs, 10 permutations).
The end-to-end tests serve its champion and check the lineage DVC recorded, so a fresh clone runs them."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from repo import REPO_ROOT

BIN = Path(sys.executable).parent
STAGE_TIMEOUT_S = 1200


@dataclass(frozen=True)
class PbmcProject:
    """The built project: its folder, its params.yaml (as run), its MLflow store and how long it took."""

    path: Path
    params: dict
    tracking_uri: str
    seconds: float

    @property
    def champion_uri(self) -> str:
        return f"models:/{self.params['register']['name']}@{self.params['register']['alias']}"

    @property
    def prepared(self) -> Path:
        return self.path / self.params["data"]["prepared"]

    def env(self) -> dict[str, str]:
        """The environment of a `scdgm` command run on this project (its store; no run or experiment inherited)."""
        env = {**os.environ, "SCDGM_PROJECT": str(self.path), "MLFLOW_TRACKING_URI": self.tracking_uri,
               "DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        for inherited in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
            env.pop(inherited, None)
        return env


def reduced_params() -> dict:
    """The repository's params.yaml (PBMC 3k) with a budget of minutes on 2 cores: two families swept (LDVAE and
    PCA; `make demo` sweeps all six), the champion trained."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["train"]["common"].update(max_epochs=60, patience=10)
    params["tune"].update(
        models=["ldvae", "pca"], num_samples=2, max_concurrent=2, max_epochs=30, grace_period=10, budgets={},
        spaces={"ldvae": {"n_latent": ["int", 8, 12], "lr": ["loguniform", 0.002, 0.01]}, "pca": {"n_latent": ["int", 8, 12]}},
    )
    params["explain"].update(permutations=10, stability_boot=0, attribution_cells=100)
    return params


def _run(project: PbmcProject, *args: str) -> str:
    done = subprocess.run(args, cwd=project.path, env=project.env(), capture_output=True, text=True,
                          timeout=STAGE_TIMEOUT_S)
    output = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{output}"
    return done.stdout


def build(folder: Path) -> PbmcProject:
    """Copy the pipeline (dvc.yaml, the code its stages depend on) into `folder`, commit it, run `dvc repro`."""
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    pipeline = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    produced = {str(next(iter(out)) if isinstance(out, dict) else out) for stage in pipeline["stages"].values()
                for out in stage.get("outs", []) + stage.get("metrics", [])}  # a checkout's `make demo` outputs stay
    for stage in pipeline["stages"].values():
        for dep in stage.get("deps", []):
            source = REPO_ROOT / str(dep)
            if "${" not in str(dep) and dep not in produced and source.exists() and not (folder / dep).exists():
                if source.is_dir():
                    shutil.copytree(source, folder / dep, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    (folder / dep).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source, folder / dep)
    shutil.copy2(REPO_ROOT / "dvc.yaml", folder / "dvc.yaml")
    params = reduced_params()
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (folder / ".gitignore").write_text("mlflow.db\nmlartifacts/\noptuna.db\nray_results/\n.scdgm/\n__pycache__/\n")
    project = PbmcProject(folder, params, f"sqlite:///{folder / 'mlflow.db'}", 0.0)
    _run(project, "git", "init", "-q")
    _run(project, str(BIN / "dvc"), "init", "-q")
    _run(project, str(BIN / "dvc"), "config", "core.analytics", "false")
    _run(project, "git", "add", "-A")
    _run(project, "git", "-c", "user.name=scdgm-tests", "-c", "user.email=tests@scdgm.invalid", "commit", "-q",
         "-m", "pipeline")
    _run(project, str(BIN / "dvc"), "repro")
    registered = json.loads((folder / "reports" / "registered.json").read_text())
    assert registered["version"] == "1", registered
    return PbmcProject(folder, params, project.tracking_uri, time.perf_counter() - started)
