"""MLflow tracking: URI resolution, `scdgm train` as a run (params, per-epoch metrics, lineage, artifacts, tags,
a pyfunc that embeds cells aligned by gene name) and failed training recorded as a FAILED run."""
import hashlib
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from repo import REPO_ROOT
from tracking_helpers import isolated_tracking, write_tiny_prepared

from scdgm.pipelines import tracking
from scdgm.pipelines.cli import main

EPOCHS = 3


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny_prepared(tmp_path_factory.mktemp("data") / "tiny.h5ad")


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """One tracked `scdgm train` in its own SQLite store: (tracking URI, model directory, run)."""
    folder = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as monkeypatch:
        uri = isolated_tracking(monkeypatch, folder)
        out = folder / "ldvae"
        main(["train", "--model", "ldvae", "--data", str(tiny_data), "--out", str(out),
              "--set", f"max_epochs={EPOCHS}", "--set", "progress=false", "--set", "n_latent=3"])
    record = tracking.RunRecord.read(out)
    return uri, out, mlflow.MlflowClient(uri).get_run(record.run_id)


def test_tracking_uri_defaults_to_sqlite_in_the_project_and_env_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{REPO_ROOT / 'mlflow.db'}"
    assert tracking.artifact_location(tracking.tracking_uri()) == str(REPO_ROOT / "mlartifacts")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs.db")  # relative: made absolute for Ray trials
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'runs.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"
    assert tracking.artifact_location("http://127.0.0.1:5000") is None  # the server decides


def test_train_run_records_params_epochs_lineage_tags_and_artifacts(trained, tiny_data):
    uri, out, run = trained
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model"] == "ldvae" and params["n_latent"] == "3" and params["max_epochs"] == str(EPOCHS)
    assert params["data.path"] == str(tiny_data) and params["data.n_obs"] == "400"
    assert params["data.md5_source"] == "computed"
    assert params["data.md5"] == hashlib.md5(tiny_data.read_bytes()).hexdigest()  # noqa: S324 - the fingerprint DVC uses
    assert run.inputs.dataset_inputs[0].dataset.digest == params["data.md5"]
    client = mlflow.MlflowClient(uri)
    for key in ("train_loss", "validation_loss", "train_kl", "validation_reconstruction", "lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(EPOCHS)), key
    assert {"nll_elbo", "knn_accuracy", "training_seconds", "best_validation_loss"} <= set(run.data.metrics)
    tags = run.data.tags
    assert tags[tracking.TAG_KIND] == "ldvae" and tags[tracking.TAG_ROLE] == "train"
    assert len(tags[tracking.TAG_COMMIT]) == 40
    files = {a.path for a in client.list_artifacts(run.info.run_id, "model_files")}
    assert "model_files/metrics.json" in files
    logged = json.loads((out / "metrics.json").read_text())
    assert run.data.metrics["nll_elbo"] == pytest.approx(logged["nll_elbo"])


def test_logged_pyfunc_embeds_cells_aligned_by_gene_name(trained, tiny_data):
    import anndata as ad

    from scdgm.models import load_model

    uri, out, run = trained
    adata = ad.read_h5ad(tiny_data)[:20]
    model = load_model(str(out))
    counts = pd.DataFrame(adata.layers["counts"].toarray().astype(np.int64), columns=adata.var_names)
    shuffled = counts[list(reversed(counts.columns))].drop(columns=counts.columns[:2])
    shuffled["NOT_A_MODEL_GENE"] = 7  # ignored by the signature
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    predicted = pyfunc.predict(shuffled)
    assert list(predicted.columns) == ["latent_0", "latent_1", "latent_2"]
    kept = np.ones((1, adata.n_vars))
    kept[0, :2] = 0  # the two dropped genes count as zero
    reference = ad.AnnData(X=adata.layers["counts"].multiply(kept).tocsr(), var=adata.var[[]])
    assert np.allclose(predicted.to_numpy(), model.embed(reference).mean, atol=1e-5)
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model"))
    assert (local / "artifacts" / "model_dir" / "weights.safetensors").is_file()


def test_diverging_training_is_a_failed_run(tiny_data, tmp_path, monkeypatch):
    uri = isolated_tracking(monkeypatch, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", "ldvae", "--data", str(tiny_data), "--out", str(tmp_path / "nan"),
              "--set", "max_epochs=2", "--set", "lr=10000", "--set", "progress=false"])
    assert exit_info.value.code == 2
    runs = mlflow.MlflowClient(uri).search_runs([tracking.experiment_id("scdgm", uri)])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not (tmp_path / "nan").exists()


@pytest.mark.slow
def test_lineage_takes_the_md5_dvc_recorded(pbmc_project, monkeypatch):
    """In the pipeline's PBMC 3k project the prepared data's lineage is the md5 that dvc.lock records, and the
    train stage's MLflow run carries it; a copy DVC does not track gets an md5 computed here."""
    monkeypatch.setenv("SCDGM_PROJECT", str(pbmc_project.path))
    relative = pbmc_project.params["data"]["prepared"]
    lock = yaml.safe_load((pbmc_project.path / "dvc.lock").read_text())
    recorded = next(out for out in lock["stages"]["prepare"]["outs"] if out["path"] == relative)
    lineage = tracking.dataset_lineage(pbmc_project.prepared, 1, 1)
    assert (lineage.md5, lineage.md5_source, lineage.path) == (recorded["md5"], "dvc", str(pbmc_project.prepared))
    record = tracking.RunRecord.read(pbmc_project.path / pbmc_project.params["register"]["model_dir"])
    logged = mlflow.MlflowClient(pbmc_project.tracking_uri).get_run(record.run_id).data.params
    assert (logged["data.md5"], logged["data.md5_source"]) == (recorded["md5"], "dvc")
    assert logged["data.path"] == lineage.path
    copy = pbmc_project.path / "untracked.h5ad"
    copy.write_bytes(pbmc_project.prepared.read_bytes())
    try:
        assert tracking.dataset_lineage(copy, 1, 1).md5_source == "computed"
    finally:
        copy.unlink()
