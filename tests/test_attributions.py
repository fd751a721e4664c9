"""Integrated-gradient attributions of a VAE's latent means from the typical cell: completeness (per latent and
along a direction), planted program genes, and the typical-cell baseline itself."""
import numpy as np
import pytest
import torch

from scdgm import models
from scdgm.errors import InputError
from scdgm.interpret.attributions import (
    batch_attributions,
    cell_attributions,
    global_attributions,
    integrated_gradients,
    latent_mean_function,
    top_attributed_genes,
    typical_baselines,
    typical_profile,
)
from scdgm.interpret.loadings import gene_statistics
from scdgm.pipelines.simulate import simulate_programs


@pytest.fixture(scope="module")
def fitted():
    adata = simulate_programs(500, 150, n_types=3, n_programs=4, genes_per_program=15, seed=3)
    model = models.create_model(
        "vae", {"n_latent": 4, "n_hidden": 64, "max_epochs": 25, "device": "cpu", "progress": False, "seed": 0}
    )
    model.fit(adata)
    return model, adata, typical_profile(adata.X)


def test_completeness_from_the_typical_cell(fitted):
    """Attributions of a cell sum to f(x) - f(typical cell at x's depth), per latent and along a direction."""
    model, adata, profile = fitted
    cells = adata[:20]
    attributions = cell_attributions(model, cells, profile, n_steps=64)
    function = latent_mean_function(model)
    x = torch.as_tensor(cells.X.toarray())
    baselines = typical_baselines(x, torch.as_tensor(profile, dtype=torch.float32))
    np.testing.assert_allclose(baselines.sum(dim=1).numpy(), x.sum(dim=1).numpy(), rtol=1e-5)
    with torch.no_grad():
        difference = (function(x) - function(baselines)).numpy()
    assert attributions.shape == (20, model.n_latent, adata.n_vars)
    error = np.abs(attributions.sum(axis=2) - difference)
    assert error.max() < 0.03 * np.abs(difference).max() + 1e-3
    directions = torch.as_tensor(np.random.default_rng(0).normal(size=(20, model.n_latent)), dtype=torch.float32)
    projected = integrated_gradients(function, x, baselines, None, None, 64, directions=directions).numpy()
    with torch.no_grad():
        moved = (function(x, None, directions) - function(baselines, None, directions)).numpy()
    assert np.abs(projected.sum(axis=1) - moved).max() < 0.03 * np.abs(moved).max() + 1e-3


def test_the_typical_cell_has_nothing_to_attribute(fitted):
    """A cell with exactly the typical composition is its own baseline: every attribution is 0."""
    model, adata, profile = fitted
    typical = adata[:3].copy()
    typical.X = np.outer([500.0, 1000.0, 2000.0], profile).astype(np.float32)
    assert np.abs(cell_attributions(model, typical, profile, n_steps=8)).max() < 1e-6


def test_planted_program_genes_dominate(fitted):
    model, adata, profile = fitted
    table = global_attributions(model, adata, profile, n_cells=120, n_steps=16, seed=0)
    program = adata.var["program"].to_numpy() >= 0
    assert table.shape == (adata.n_vars, model.n_latent)
    assert (table.to_numpy()[program].mean(axis=0) > 2 * table.to_numpy()[~program].mean(axis=0)).sum() >= 3
    weights = gene_statistics(adata.X, adata.var_names, 0.01)["weight"]
    top = top_attributed_genes(table, 10, weights)
    assert top["gene"].isin(adata.var_names[program]).mean() >= 0.8
    assert set(top.columns) == {"factor", "rank", "gene", "attribution", "score"}
    np.testing.assert_allclose(top["score"], top["attribution"] * weights[top["gene"]].to_numpy())


def test_one_cell_matches_the_batched_result(fitted):
    model, adata, profile = fitted
    batch = next(iter(model.inference_batches(adata[:1])))
    single = batch_attributions(latent_mean_function(model), batch, [2], torch.as_tensor(profile, dtype=torch.float32),
                                n_steps=16)
    batched = cell_attributions(model, adata[:5], profile, latents=[2], n_steps=16)
    assert single.shape == (1, 1, adata.n_vars)
    np.testing.assert_allclose(single.numpy()[0], batched[0], rtol=1e-4, atol=1e-6)


def test_models_without_encoder_are_refused(fitted):
    _, adata, _ = fitted
    with pytest.raises(InputError, match="encoder"):
        latent_mean_function(models.create_model("pca", {}))
    with pytest.raises(InputError, match="no counts"):
        typical_profile(adata.X[:0])
