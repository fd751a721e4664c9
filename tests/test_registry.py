"""Model registry: register a run's model as a candidate, force the champion alias, resolve models:/NAME@ALIAS,
attach an explanation; evaluate as a run of its own."""
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


def test_register_run_then_model_dir_as_candidates_and_force_the_champion(project, monkeypatch, tmp_path):
    uri, data, out, explanation = project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_id = tracking.RunRecord.read(out).run_id

    first = register(NAME, "champion", run_id=run_id)
    client = mlflow.MlflowClient(uri)
    assert first.version == "1" and first.promoted and str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion", dst_path=str(tmp_path / "v1")))
    assert {"config.json", "genes.txt", "weights.safetensors"} <= {p.name for p in (local / "artifacts" / "model_dir").iterdir()}

    record = tmp_path / "registered.json"
    main(["register", "--model", str(out), "--explanation", str(explanation), "--name", NAME, "--out", str(record)])
    second = json.loads(record.read_text())
    assert second["version"] == "2" and second["candidate_uri"] == f"models:/{NAME}@candidate"
    assert second["model_uri"] == f"models:/{NAME}@champion" and second["champion_version"] == "1"
    assert not second["promoted"] and "no test.label_accuracy" in second["decision"]["reason"]
    assert second["run_id"] == run_id
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"

    main(["register", "--model", str(out), "--explanation", str(explanation), "--name", NAME, "--force", "--out", str(record)])
    assert json.loads(record.read_text())["version"] == "3"
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "3"
    assert client.get_model_version(NAME, "1").aliases == []

    cells = ad.read_h5ad(data)[:10]
    counts = pd.DataFrame(cells.layers["counts"].toarray().astype(np.int64), columns=cells.var_names)
    predicted = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(counts)
    assert list(predicted.columns) == ["latent_0", "latent_1", "latent_2", "pattern", "label"]
    assert predicted["pattern"].str.fullmatch("[01]{3}").all()
    assert set(predicted["label"]) <= set(cells.obs["cell_type"].astype(str))
    explanation_run = tracking.RunRecord.read(explanation).run_id
    assert client.get_model_version(NAME, "3").tags["scdgm.explanation_run_id"] == explanation_run
    artifacts = {a.path for a in client.list_artifacts(explanation_run, "explanation")}
    assert "explanation/explanation.json" in artifacts
    assert client.list_artifacts(run_id, "model_files/explanation") == []  # the training run is left alone


def test_register_refuses_unknown_runs_and_mixed_sources(project, monkeypatch):
    uri, _, out, _ = project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(ScdgmError, match="not found"):
        register(NAME, run_id="0" * 32)
    with pytest.raises(ScdgmError, match="exactly one"):
        register(NAME, run_id="0" * 32, model_dir=out)


def test_evaluate_writes_dvc_metrics_history_figures_and_logs_its_own_run(project, tmp_path):
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
    assert 0 <= metrics["test"]["label_accuracy"] <= 1
    train_id = tracking.RunRecord.read(out).run_id
    assert metrics["evaluated_on"]["model_run_id"] == train_id and len(metrics["evaluated_on"]["cells"]) == 16
    assert metrics["evaluated_on"]["explanation_run_id"] == tracking.RunRecord.read(explanation).run_id
    client = mlflow.MlflowClient(uri)
    assert "test_nll_elbo" not in client.get_run(train_id).data.metrics
    experiment = client.get_run(train_id).info.experiment_id
    [run] = client.search_runs([experiment], f"tags.`scdgm.role` = 'evaluate' and tags.`scdgm.model_run_id` = '{train_id}'")
    assert run.data.tags["mlflow.parentRunId"] == train_id
    assert run.data.metrics["test_nll_elbo"] == pytest.approx(metrics["test"]["nll_elbo"])
    assert run.data.metrics["label_transfer_accuracy"] == pytest.approx(metrics["explanation"]["label_transfer_accuracy"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")} >= {"evaluation/metrics.json"}
