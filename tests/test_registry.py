"""Model registry: register a run's model, move the alias, resolve models:/NAME@ALIAS, attach an explanation."""
import json
from pathlib import Path

import anndata as ad
import mlflow
import numpy as np
import pandas as pd
import pytest
from tracking_helpers import isolated_tracking, write_tiny_prepared

from scdgm.errors import ScdgmError
from scdgm.pipelines import tracking
from scdgm.pipelines.cli import main
from scdgm.pipelines.registry import register

NAME = "tiny-ldvae"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tracked tiny LDVAE and its explanation, in a store of their own: (uri, data, model dir, explanation)."""
    folder = tmp_path_factory.mktemp("registry")
    data = write_tiny_prepared(folder / "tiny.h5ad")
    with pytest.MonkeyPatch.context() as monkeypatch:
        uri = isolated_tracking(monkeypatch, folder)
        out = folder / "ldvae"
        main(["train", "--model", "ldvae", "--data", str(data), "--out", str(out),
              "--set", "max_epochs=3", "--set", "progress=false", "--set", "n_latent=3"])
        main(["explain", "--model", str(out), "--data", str(data), "--out", str(folder / "explanation"),
              "--n-genes", "3", "--permutations", "0", "--set", "explain.plots=false",
              "--set", "explain.prior_cells=0", "--set", "explain.attribution_cells=20"])
    return uri, data, out, folder / "explanation"


def test_register_run_then_model_dir_moves_the_alias(project, monkeypatch, tmp_path):
    uri, data, out, explanation = project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_id = tracking.RunRecord.read(out).run_id

    first = register(NAME, "champion", run_id=run_id)
    client = mlflow.MlflowClient(uri)
    assert first.version == "1" and str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion", dst_path=str(tmp_path / "v1")))
    assert {"config.json", "genes.txt", "weights.safetensors"} <= {p.name for p in (local / "artifacts" / "model_dir").iterdir()}

    record = tmp_path / "registered.json"
    main(["register", "--model", str(out), "--explanation", str(explanation), "--name", NAME, "--out", str(record)])
    second = json.loads(record.read_text())
    assert second["version"] == "2" and second["model_uri"] == f"models:/{NAME}@champion"
    assert second["run_id"] == run_id
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"
    assert client.get_model_version(NAME, "1").aliases == []

    cells = ad.read_h5ad(data)[:10]
    counts = pd.DataFrame(cells.layers["counts"].toarray().astype(np.int64), columns=cells.var_names)
    predicted = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(counts)
    assert list(predicted.columns) == ["latent_0", "latent_1", "latent_2", "pattern", "label"]
    assert predicted["pattern"].str.fullmatch("[01]{3}").all()
    assert set(predicted["label"]) <= set(cells.obs["cell_type"].astype(str))
    artifacts = {a.path for a in client.list_artifacts(run_id, "model_files/explanation")}
    assert "model_files/explanation/explanation.json" in artifacts


def test_register_refuses_unknown_runs_and_mixed_sources(project, monkeypatch):
    uri, _, out, _ = project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(ScdgmError, match="not found"):
        register(NAME, run_id="0" * 32)
    with pytest.raises(ScdgmError, match="exactly one"):
        register(NAME, run_id="0" * 32, model_dir=out)


def test_evaluate_writes_dvc_metrics_history_figures_and_logs_to_the_run(project, tmp_path):
    uri, data, out, explanation = project
    reports = tmp_path / "reports"
    main(["evaluate", "--model", str(out), "--data", str(data), "--explanation", str(explanation),
          "--out", str(reports / "metrics.json"), "--history", str(reports / "history.csv"),
          "--figures", str(reports / "figures")])
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["n_cells"] > 0 and "nll_elbo" in metrics["test"] and "knn_accuracy" in metrics["test"]
    assert 0 <= metrics["explanation"]["label_transfer_accuracy"] <= 1
    assert metrics["explanation"]["selected_genes"] == 3
    history = pd.read_csv(reports / "history.csv")
    assert list(history["epoch"]) == [0, 1, 2] and {"train_loss", "validation_loss", "lr"} <= set(history)
    assert {p.name for p in (reports / "figures").iterdir()} == {"loss.png", "latent_test.png"}
    run = mlflow.MlflowClient(uri).get_run(tracking.RunRecord.read(out).run_id)
    assert run.data.metrics["test_nll_elbo"] == pytest.approx(metrics["test"]["nll_elbo"])
    assert run.data.metrics["label_transfer_accuracy"] == pytest.approx(metrics["explanation"]["label_transfer_accuracy"])
