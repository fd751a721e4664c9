"""`scdgm train/embed/sample` through the real CLI entry point, `train_model` and hyperparameter resolution:
outputs in place, metrics.json, atomic model directories, and one-line errors with exit code 2."""
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import yaml
from tracking_helpers import isolated_tracking

from scdgm.errors import ScdgmError
from scdgm.models import load_model
from scdgm.pipelines.cli import main
from scdgm.pipelines.prepare import split_cells
from scdgm.pipelines.simulate import simulate_programs
from scdgm.pipelines.train import model_params, save_model_dir, train_model

FAST = ["--set", "max_epochs=3", "--set", "progress=false", "--set", "n_importance=5"]


@pytest.fixture(scope="module", autouse=True)
def tracking_store(tmp_path_factory):
    """`scdgm train` records an MLflow run: keep this module's runs in a store of its own."""
    with pytest.MonkeyPatch.context() as patch:
        yield isolated_tracking(patch, tmp_path_factory.mktemp("mlflow"))


@pytest.fixture(scope="module")
def cells() -> ad.AnnData:
    adata = simulate_programs(400, 60, seed=5, genes_per_program=6)
    adata.obs["split"] = split_cells(adata.obs["cell_type"], {"train": 0.8, "validation": 0.1, "test": 0.1}, 5)
    return adata


@pytest.fixture(scope="module")
def data_file(cells, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "cells.h5ad"
    cells.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def trained(data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "vae"
    main(["train", "--model", "vae", "--data", str(data_file), "--out", str(out), *FAST])
    return out


def fails(argv: list[str], capsys) -> str:
    """Run the CLI, expect exit code 2 and return the one-line message."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_train_writes_a_loadable_model_with_metrics(trained, cells):
    assert {"config.json", "genes.txt", "metrics.json", "weights.safetensors"} <= {p.name for p in trained.iterdir()}
    metrics = json.loads((trained / "metrics.json").read_text())
    expected = {"nll_elbo", "knn_accuracy", "mmd_prior", "training_seconds", "best_epoch", "validation_loss"}
    assert expected <= set(metrics)
    model = load_model(str(trained))
    assert model.kind == "vae" and model.config.max_epochs == 3 and model.config.n_importance == 5
    assert model.genes == list(cells.var_names) and len(model.history.epochs) == 3
    assert not [p for p in trained.parent.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_embed_adds_mean_and_variance(trained, data_file, cells, tmp_path):
    out = tmp_path / "embedded.h5ad"
    main(["embed", "--model", str(trained), "--data", str(data_file), "--out", str(out)])
    embedded = ad.read_h5ad(out)
    assert embedded.obsm["X_scdgm"].shape == embedded.obsm["X_scdgm_var"].shape == (cells.n_obs, 10)
    assert np.array_equal(embedded.obsm["X_scdgm"], load_model(str(trained)).embed(cells).mean)
    assert list(embedded.obs["split"]) == list(cells.obs["split"])


def test_sample_posterior_and_prior(trained, data_file, cells, tmp_path):
    posterior = tmp_path / "posterior.h5ad"
    main(["sample", "--model", str(trained), "--data", str(data_file), "--draws", "2", "--out", str(posterior)])
    drawn = ad.read_h5ad(posterior)
    assert drawn.shape == (2 * cells.n_obs, cells.n_vars) and list(drawn.var_names) == list(cells.var_names)
    assert np.array_equal(drawn.obs["source_cell"], np.tile(np.arange(cells.n_obs), 2))
    assert list(drawn.obs["cell_type"][: cells.n_obs]) == list(cells.obs["cell_type"])
    prior = tmp_path / "prior.h5ad"
    main(["sample", "--model", str(trained), "--source", "prior", "--n", "25", "--seed", "1", "--out", str(prior)])
    drawn = ad.read_h5ad(prior)
    assert drawn.shape == (25, cells.n_vars) and drawn.uns["scdgm_sample"]["source"] == "prior"
    assert drawn.obsm["X_scdgm"].shape == (25, 10)


def test_bad_input_gives_one_line_and_leaves_no_directory(data_file, tmp_path, capsys):
    out = tmp_path / "model"
    base = ["train", "--data", str(data_file), "--out", str(out)]
    assert "unknown model 'bogus'" in fails([*base, "--model", "bogus"], capsys)
    assert "unknown hyperparameter(s) n_factors" in fails([*base, "--model", "vae", "--set", "n_factors=3"], capsys)
    assert "n_latent: expected int" in fails([*base, "--model", "ae", "--set", "n_latent=many"], capsys)
    missing = ["train", "--model", "vae", "--data", str(tmp_path / "none.h5ad"), "--out", str(out)]
    assert "does not exist" in fails(missing, capsys)
    assert "batch_key 'donor'" in fails([*base, "--model", "vae", *FAST, "--set", "batch_key=donor"], capsys)
    prior = ["sample", "--model", str(out), "--source", "prior", "--out", str(tmp_path / "s.h5ad")]
    assert "pass --n" in fails(prior, capsys)
    embed = ["embed", "--model", str(out), "--data", str(data_file), "--out", str(tmp_path / "e.h5ad")]
    assert "model directory not found" in fails(embed, capsys)
    assert not any(tmp_path.iterdir())


def test_data_without_split_gets_a_seeded_validation_split(cells, tmp_path):
    unsplit = cells.copy()
    del unsplit.obs["split"]
    path = tmp_path / "unsplit.h5ad"
    unsplit.write_h5ad(path)
    with pytest.warns(UserWarning, match="split"):  # says so
        main(["train", "--model", "ldvae", "--data", str(path), "--out", str(tmp_path / "ld"), *FAST])
    metrics = json.loads((tmp_path / "ld" / "metrics.json").read_text())
    assert "train_loss" in metrics and "validation_loss" in metrics
    main(["train", "--model", "ae", "--data", str(path), "--out", str(tmp_path / "ld"), "--set", "max_epochs=1",
          "--overwrite"])
    assert load_model(str(tmp_path / "ld")).kind == "ae"  # an earlier model directory is replaced on request


def test_an_existing_non_model_directory_is_not_overwritten(data_file, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    argv = ["train", "--model", "vae", "--data", str(data_file), "--out", str(tmp_path / "notes"), *FAST]
    message = fails(argv, capsys)
    assert "not a model directory" in message and (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def test_params_yaml_sections_then_overrides(tmp_path):
    config = {"seed": 7, "train": {"common": {"max_epochs": 9, "lr": 0.01, "batch_size": 64}, "vae": {"n_latent": 4}}}
    params = model_params("vae", config, ["n_latent=6", "lr=1e-3"])
    assert params["seed"] == 7 and params["max_epochs"] == 9 and params["n_latent"] == 6 and params["lr"] == 1e-3
    assert model_params("pca", {"train": {"common": {"max_epochs": 9}}}).get("max_epochs") is None
    with pytest.raises(ScdgmError, match="not a hyperparameter of any model"):
        model_params("vae", {"train": {"common": {"epochs": 5}}})
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"vae": {"n_hidden": "wide"}}}))
    from scdgm.pipelines.config import load_params

    with pytest.raises(ScdgmError, match="n_hidden: expected int"):
        model_params("vae", load_params(path))


def test_train_model_calls_back_every_epoch_and_save_is_atomic(cells, tmp_path):
    seen = []
    model, metrics = train_model("vae", cells, {"max_epochs": 2, "progress": False}, [lambda e, m: seen.append((e, m))])
    assert [e for e, _ in seen] == [0, 1] and "validation_loss" in seen[0][1]
    assert metrics["epochs"] == 2.0 and model.metadata["metrics"] == metrics
    target = tmp_path / "m"
    save_model_dir(model, metrics, target)
    assert json.loads((target / "metrics.json").read_text()) == pytest.approx(metrics)
    with pytest.raises(ScdgmError, match="cannot save a model that has not been fitted"):
        save_model_dir(type(model)(), {}, tmp_path / "unfitted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
