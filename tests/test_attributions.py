"""Integrated-gradient attributions of a VAE's latent means: completeness and planted program genes."""
import numpy as np
import pytest
import torch

from scdgm import models
from scdgm.errors import InputError
from scdgm.interpret.attributions import (
    batch_attributions,
    cell_attributions,
    global_attributions,
    latent_mean_function,
    top_attributed_genes,
)
from scdgm.pipelines.simulate import simulate_programs


@pytest.fixture(scope="module")
def fitted():
    adata = simulate_programs(500, 150, n_types=3, n_programs=4, genes_per_program=15, seed=3)
    model = models.create_model(
        "vae", {"n_latent": 4, "n_hidden": 64, "max_epochs": 25, "device": "cpu", "progress": False, "seed": 0}
    )
    model.fit(adata)
    return model, adata


def test_completeness(fitted):
    model, adata = fitted
    cells = adata[:20]
    attributions = cell_attributions(model, cells, n_steps=64)
    function = latent_mean_function(model)
    x = torch.as_tensor(cells.X.toarray())
    with torch.no_grad():
        difference = (function(x) - function(torch.zeros_like(x))).numpy()
    assert attributions.shape == (20, model.n_latent, adata.n_vars)
    error = np.abs(attributions.sum(axis=2) - difference)
    assert error.max() < 0.03 * np.abs(difference).max() + 1e-3


def test_planted_program_genes_dominate(fitted):
    model, adata = fitted
    table = global_attributions(model, adata, n_cells=120, n_steps=16, seed=0)
    program = adata.var["program"].to_numpy() >= 0
    assert table.shape == (adata.n_vars, model.n_latent)
    assert (table.to_numpy()[program].mean(axis=0) > 2 * table.to_numpy()[~program].mean(axis=0)).sum() >= 3
    top = top_attributed_genes(table, 10)
    assert top["gene"].isin(adata.var_names[program]).mean() >= 0.8


def test_one_cell_matches_the_batched_result(fitted):
    model, adata = fitted
    batch = next(iter(model.inference_batches(adata[:1])))
    single = batch_attributions(latent_mean_function(model), batch, [2], n_steps=16)
    batched = cell_attributions(model, adata[:5], latents=[2], n_steps=16)
    assert single.shape == (1, 1, adata.n_vars)
    np.testing.assert_allclose(single.numpy()[0], batched[0], rtol=1e-4, atol=1e-6)


def test_models_without_encoder_are_refused():
    with pytest.raises(InputError, match="encoder"):
        latent_mean_function(models.create_model("pca", {}))
