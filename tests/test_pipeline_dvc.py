"""The whole DVC pipeline, fetch → prepare → tune → train → explain → evaluate → register, on tiny simulated
cells in a scratch git + DVC project: metrics and plots for DVC, a registered model, `dvc exp run -S` (a candidate
that takes `@champion` only by the promotion rule, and leaves the training run's artifacts as they were), and the
`scdgm report` summary."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from repo import REPO_ROOT

BIN = Path(sys.executable).parent
CODE = ("pipelines", "models", "interpret")


def tiny_params(project: Path) -> dict:
    """The project's params.yaml with small sizes and stores inside the scratch project."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["data"] = {"dataset": "sim", "raw": "data/raw/sim.h5ad", "prepared": "data/prepared/sim.h5ad"}
    params["prepare"].update(min_genes=5, max_genes=None, min_cells=3, n_top_genes=60, label_key="cell_type")
    params["train"]["common"].update(max_epochs=3, patience=3)
    params["tune"].update(
        num_samples=2, max_concurrent=1, max_epochs=2, grace_period=1, name="dvc-sweep",
        storage=f"sqlite:///{project / 'optuna.db'}", results_dir=str(project / "ray_results"),
        models=["ldvae", "pca"], budgets={},
        spaces={"ldvae": {"n_latent": ["int", 2, 4], "lr": ["loguniform", 0.001, 0.01]}, "pca": {"n_latent": ["int", 2, 4]}},
    )
    params["explain"].update(n_genes=3, permutations=0, prior_cells=0, attribution_cells=20, stability_boot=0)
    params["register"].update(model_dir="artifacts/sim-champion", name="sim")
    return params


def run(project: Path, *args: str, timeout: float = 900) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_RUN_ID", None)
    result = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def artifact_hashes(client: mlflow.MlflowClient, run_id: str, folder: Path) -> dict[str, str]:
    """sha256 of every artifact file of run `run_id`, by path."""
    local = Path(client.download_artifacts(run_id, "", str(folder)))
    return {str(p.relative_to(local)): hashlib.sha256(p.read_bytes()).hexdigest() for p in local.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_dvc_pipeline_end_to_end(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for name in CODE:
        shutil.copytree(REPO_ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    pipeline = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    pipeline["stages"]["fetch"] = {  # offline: simulated cells stand in for the PBMC download
        "cmd": "scdgm data simulate --n-cells 400 --n-genes 120 --n-types 3 --n-programs 4 --genes-per-program 10 "
        "--seed ${seed} --out ${data.raw}",
        "outs": ["${data.raw}"],
    }
    (project / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_params(project), sort_keys=False))
    (project / ".gitignore").write_text("mlflow.db\noptuna.db\nray_results/\nmlartifacts/\n__pycache__/\n")
    run(project, "git", "init", "-q")
    run(project, str(BIN / "dvc"), "init", "-q")
    run(project, str(BIN / "dvc"), "config", "core.analytics", "false")
    run(project, "git", "add", "-A")
    run(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "tiny pipeline")

    run(project, str(BIN / "dvc"), "repro")
    metrics = json.loads(run(project, str(BIN / "dvc"), "metrics", "show", "--json"))
    shown = json.dumps(metrics)
    assert "knn_accuracy" in shown and "label_transfer_accuracy" in shown  # metrics every family has
    run(project, str(BIN / "dvc"), "plots", "show", "-o", str(tmp_path / "plots"))
    assert (tmp_path / "plots" / "index.html").is_file()
    registered = json.loads((project / "reports" / "registered.json").read_text())
    assert registered["model_uri"] == "models:/sim@champion" and registered["version"] == "1"
    assert registered["promoted"] and "no champion yet" in registered["decision"]["reason"]
    sweep = yaml.safe_load((project / "reports" / "tune" / "best_params.yaml").read_text())
    best = sweep["train"][sweep["champion"]]  # the train stage trains the family the sweep picked
    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    train_id = json.loads((project / "artifacts" / "sim-champion" / "mlflow_run.json").read_text())["run_id"]
    train_run = client.get_run(train_id)
    assert train_run.data.tags["scdgm.model_kind"] == sweep["champion"]
    assert train_run.data.params["n_latent"] == str(best["n_latent"])  # the train stage used the sweep's best
    trained = artifact_hashes(client, train_id, tmp_path / "before")
    evaluations = client.search_runs([train_run.info.experiment_id], f"tags.`scdgm.model_run_id` = '{train_id}'")
    assert {r.data.tags["scdgm.role"] for r in evaluations} == {"explain", "evaluate", "register"}
    assert any("test_knn_accuracy" in r.data.metrics for r in evaluations)  # evaluate's own run, linked

    run(project, str(BIN / "dvc"), "exp", "run", "-S", "explain.n_genes=2")
    experiments = run(project, str(BIN / "dvc"), "exp", "show", "--json")
    assert '"n_genes": 2' in experiments
    registered = json.loads((project / "reports" / "registered.json").read_text())
    assert registered["version"] == "2"  # explain changed, so register ran again: a candidate
    decision = registered["decision"]
    measured = json.loads((project / "reports" / "metrics.json").read_text())["test"]["label_accuracy"]
    assert decision["candidate_value"] == measured and decision["champion_version"] == "1"
    promoted = decision["candidate_value"] > decision["champion_value"]  # the rule: max, min_delta 0
    assert registered["promoted"] == promoted
    champion = client.get_model_version_by_alias("sim", "champion").version
    assert str(champion) == ("2" if promoted else "1")
    assert str(client.get_model_version_by_alias("sim", "candidate").version) == "2"
    assert artifact_hashes(client, train_id, tmp_path / "after") == trained  # the finished run is untouched
    assert client.get_run(train_id).data.metrics == train_run.data.metrics

    report = run(project, str(BIN / "scdgm"), "report", "--reports", "reports", "--params", "params.yaml")
    assert "models:/sim@champion" in report and f"Champion: {sweep['champion']}" in report and "mlflow ui --backend-store-uri" in report
