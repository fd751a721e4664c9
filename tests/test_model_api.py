"""The notebook API: capabilities declared by type, fit on a layer of counts (with a clear error for normalised data
and an announced, seeded validation split), embeddings in obsm, and `scdgm.interpret.explain` in memory."""
import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import scdgm.interpret
from scdgm.errors import InputError, ScdgmError
from scdgm.interpret import ExplainSettings, Explanation
from scdgm.models import (
    DBM,
    LDVAE,
    PCA,
    VAE,
    WGAN,
    Autoencoder,
    CountEncoder,
    GenerativeModel,
    LinearDecoder,
    model_class,
)
from scdgm.models.data import fit_split
from scdgm.pipelines.simulate import simulate_programs

QUIET = {"max_epochs": 2, "device": "cpu", "progress": False, "n_latent": 3, "n_hidden": 16}


@pytest.fixture()
def cells() -> ad.AnnData:
    """Raw counts in layers['counts'] and log-normalised expression in .X, as scanpy users keep them."""
    adata = simulate_programs(200, 60, n_types=3, n_programs=3, genes_per_program=8, seed=2)
    adata.layers["counts"] = adata.X.copy()
    library = np.asarray(adata.X.sum(axis=1)).ravel()
    adata.X = sp.csr_matrix(sp.diags(1e4 / library) @ adata.X).log1p()
    return adata


def test_capabilities_are_declared_by_type():
    assert isinstance(LDVAE(), LinearDecoder) and isinstance(PCA(), LinearDecoder)
    assert not any(isinstance(model, LinearDecoder) for model in (VAE(), Autoencoder(), WGAN(), DBM()))
    assert all(isinstance(model, CountEncoder) for model in (VAE(), LDVAE(), Autoencoder(), WGAN()))
    assert not isinstance(PCA(), CountEncoder) and not isinstance(DBM(), CountEncoder)
    assert VAE(batch_key="donor").batch_key == "donor" and VAE().batch_key is None and PCA().batch_key is None
    assert model_class("ldvae") is LDVAE
    with pytest.raises(ScdgmError, match="unknown model 'bogus'"):
        model_class("bogus")


def test_log_normalised_input_is_refused_naming_the_layer(cells):
    model = VAE(**QUIET)
    with pytest.raises(InputError, match=r"adata\.X: .*non-integer.*layer='counts'"):
        model.fit(cells)
    with pytest.raises(InputError, match=r"adata\.layers\['raw'\] does not exist \(layers present: 'counts'\)"):
        model.fit(cells, layer="raw")


def test_fit_on_a_layer_announces_a_seeded_split_and_leaves_adata_alone(cells):
    before = cells.copy()
    models = [VAE(seed=1, **QUIET) for _ in range(2)]
    for model in models:
        with pytest.warns(UserWarning, match=r"random 90% of the cells .* other 10% \(20 cells, seed 1\)"):
            model.fit(cells, layer="counts")
    assert "split" not in cells.obs and list(cells.obs.columns) == list(before.obs.columns)
    assert (cells.X != before.X).nnz == 0 and not cells.obsm.keys() - before.obsm.keys()
    first, second = (model.state_tensors() for model in models)
    assert all(np.array_equal(first[name].numpy(), second[name].numpy()) for name in first)
    with pytest.warns(UserWarning):
        train, validation = fit_split(cells.obs, seed=1)
        other = fit_split(cells.obs, seed=2)[1]
    assert validation.sum() == 20 and not (train & validation).any()
    assert not np.array_equal(validation, other)


def test_an_existing_split_is_used_silently(cells):
    cells.obs["split"] = np.where(np.arange(cells.n_obs) % 5 == 0, "validation", "train")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        history = PCA(n_latent=3).fit(cells, layer="counts")
    assert "validation_loss" in history.epochs[0]


def test_embed_writes_obsm_from_the_same_layer(cells):
    model = PCA(n_latent=3)
    with pytest.warns(UserWarning, match="no 'split' column"):
        model.fit(cells, layer="counts")
    embedding = model.embed(cells, layer="counts")
    assert cells.obsm["X_scdgm"].shape == (cells.n_obs, 3) and cells.obsm["X_scdgm_var"].shape == (cells.n_obs, 3)
    np.testing.assert_array_equal(cells.obsm["X_scdgm"], embedding.mean)
    plain = ad.AnnData(X=cells.layers["counts"], obs=cells.obs[[]], var=cells.var[[]])
    np.testing.assert_allclose(model.embed(plain, key_added=None).mean, embedding.mean, rtol=1e-5)
    assert "X_scdgm" not in plain.obsm


def test_explain_returns_an_explanation_that_transfers_saves_and_summarises(cells, tmp_path):
    model = PCA(n_latent=3)
    with pytest.warns(UserWarning, match="no 'split' column"):
        model.fit(cells, layer="counts")
    settings = ExplainSettings(n_genes=4, permutations=20, prior_cells=0, plots=False)
    explanation = scdgm.interpret.explain(model, cells, settings, layer="counts", seed=3)
    assert isinstance(explanation, Explanation)
    assert len(explanation.selected_genes) == 4 and set(explanation.selected_genes) <= set(cells.var_names)
    assert list(explanation.p_values.index) == explanation.selected_genes
    assert ((explanation.p_values > 0) & (explanation.p_values <= 1)).all()

    labels = explanation.transfer(cells, layer="counts")
    assert isinstance(labels, pd.Series) and labels.index.equals(cells.obs_names)
    assert set(labels) <= set(cells.obs["cell_type"].astype(str))
    assert (labels == cells.obs["cell_type"].astype(str)).mean() > 0.5

    summary = cells.uns["scdgm_explanation"]
    assert summary["selected_genes"] == explanation.selected_genes and summary["label_key"] == "cell_type"
    cells.write_h5ad(tmp_path / "cells.h5ad")
    assert list(ad.read_h5ad(tmp_path / "cells.h5ad").uns["scdgm_explanation"]["selected_genes"]) == summary[
        "selected_genes"
    ]

    report = explanation.save(tmp_path / "explanation")
    written = json.loads((tmp_path / "explanation" / "explanation.json").read_text())
    assert [step["gene"] for step in written["selection"]] == explanation.selected_genes
    assert set(written["files"]) == {p.name for p in (tmp_path / "explanation").iterdir()}
    assert report["directory"] == str(tmp_path / "explanation")
    explained = explanation.explainer().explain(cells.layers["counts"][:5])
    assert explained.labels == labels.iloc[:5].tolist()


def test_saved_models_load_through_the_base_class(cells, tmp_path):
    model = LDVAE(**QUIET)
    with pytest.warns(UserWarning):
        model.fit(cells, layer="counts")
    model.save(tmp_path / "model")
    loaded = GenerativeModel.load(tmp_path / "model")
    assert type(loaded) is LDVAE and loaded.genes == model.genes
    np.testing.assert_array_equal(
        loaded.embed(cells, layer="counts", key_added=None).mean, model.embed(cells, layer="counts").mean
    )
    with pytest.raises(InputError, match="needs the cells"):
        loaded.variance_explained()
