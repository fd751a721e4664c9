"""scdgm as a user gets it: a non-editable install into a fresh virtual environment, used from an empty folder
outside the repository. The README's own-data section runs word for word; every file it writes lands in the
user's folder and nothing under site-packages changes."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from docblocks import blocks
from repo import REPO_ROOT

OWN_DATA = "## Use it on your own data"
STATE_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "SCDGM_PROJECT", "VIRTUAL_ENV")


def source_copy(target: Path) -> Path:
    """The repository's files as a clone has them (tracked and untracked-not-ignored), so that building the
    wheel leaves no build/ or egg-info folder in the checkout."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        if (REPO_ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, target / name)
    return target


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment holding a plain (non-editable) install of scdgm; its bin folder."""
    root = tmp_path_factory.mktemp("install")
    source = source_copy(root / "source")
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    assert uv, "uv is installed by `make install`"
    env = {k: v for k, v in os.environ.items() if k not in STATE_VARIABLES}
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(root / "venv")], check=True, env=env)
    subprocess.run([uv, "pip", "install", "-q", "--compile-bytecode", "--python", str(root / "venv" / "bin" / "python"),
                    str(source)], check=True, env=env, timeout=900)
    return root / "venv" / "bin"


def user_env(bin_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in STATE_VARIABLES}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return env


def site_packages(bin_dir: Path) -> Path:
    return next((bin_dir.parent / "lib").glob("python3*/site-packages"))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


def python(bin_dir: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / "python"), "-c", code], cwd=cwd, env=user_env(bin_dir),
                          capture_output=True, text=True, timeout=300)


def test_one_import_name(venv: Path, tmp_path: Path) -> None:
    installed = site_packages(venv)
    assert not [name for name in ("models", "pipelines", "interpret", "serving") if (installed / name).exists()]
    assert python(venv, "import scdgm.models, scdgm.interpret, scdgm.serving.app, scdgm.pipelines.cli",
                  tmp_path).returncode == 0
    for bare in ("models", "pipelines", "interpret", "serving"):
        assert "ModuleNotFoundError" in python(venv, f"import {bare}", tmp_path).stderr
    shown = python(venv, "import scdgm.defaults as d; print(d.default_params()['train']['common']['max_epochs'])",
                   tmp_path)
    assert shown.stdout.strip() == "400", shown.stderr  # the packaged defaults travel with the wheel


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_readme_own_data_section_runs_in_a_folder_of_ones_own(venv: Path, tmp_path: Path) -> None:
    install, pipeline, serve = blocks(REPO_ROOT / "README.md", OWN_DATA, "bash")
    assert "needs:" in install and "pip install" in install  # the one step the fixture does instead
    installed = site_packages(venv)
    before = snapshot(installed)
    work = tmp_path / "work"
    work.mkdir()
    env = user_env(venv)
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", pipeline], cwd=work, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    project = work / "myproject"
    for state in ("params.yaml", "dvc.yaml", "MLproject", ".dvc", "mlflow.db", "mlartifacts", "optuna.db",
                  "ray_results", "reports/tune", "artifacts/cells-vae/config.json", "artifacts/cells-vae/explanation"):
        assert (project / state).exists(), state
    assert sorted(p.name for p in work.iterdir()) == ["cells.h5ad", "myproject"]

    port = free_port()
    server_line, request_line = [line for line in serve.splitlines() if line.strip()]
    server_argv = shlex.split(server_line.rstrip(" &").replace("--port 8000", f"--port {port}"))
    server = subprocess.Popen(server_argv, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        answer = subprocess.run(["bash", "-c", request_line.replace(":8000", f":{port}")], cwd=project, env=env,
                                capture_output=True, text=True, timeout=120)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert answer.returncode == 0, answer.stderr
    explained = json.loads(answer.stdout)
    assert explained["model"] == "cells-vae" and explained["n_cells"] == len(explained["cells"]) > 1000
    assert snapshot(installed) == before, "files under site-packages changed"
    assert sorted(p.name for p in work.iterdir()) == ["cells.h5ad", "myproject"]
