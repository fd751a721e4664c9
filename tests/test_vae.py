"""VAE and LDVAE: planted cell types and programs recovered on simulated counts, held-out likelihood against a
latent-free NB, KL warm-up and validation loss, options (ZINB, learned library, batches), persistence and
seeded determinism; a slow check of LDVAE factors on PBMC 3k marker genes."""
import dataclasses

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from scdgm.errors import ScdgmError
from scdgm.models import create_model, load_model
from scdgm.models.data import split_mask
from scdgm.models.evaluation import knn_accuracy
from scdgm.models.likelihoods import gaussian_kl
from scdgm.models.training import LoopConfig, StepContext
from scdgm.models.vae import LDVAE, MAX_LOG_VAR, VAE, VAEConfig, _DrawWithKL, positive, varimax
from scdgm.pipelines.prepare import split_cells
from scdgm.pipelines.simulate import simulate_programs

SPLIT = {"train": 0.8, "validation": 0.1, "test": 0.1}
QUIET = {"progress": False}


def simulated(n_cells: int, n_genes: int, seed: int = 0, **kwargs) -> ad.AnnData:
    adata = simulate_programs(n_cells, n_genes, seed=seed, **kwargs)
    adata.obs["split"] = split_cells(adata.obs["cell_type"], SPLIT, seed)
    return adata


@pytest.fixture(scope="module")
def cells() -> ad.AnnData:
    return simulated(2000, 300)


@pytest.fixture(scope="module")
def small() -> ad.AnnData:
    return simulated(300, 60, seed=1, genes_per_program=5, n_batches=2, batch_effect=0.3)


@pytest.fixture(scope="module")
def vae(cells) -> VAE:
    model = create_model("vae", {"max_epochs": 40, **QUIET})
    model.fit(cells)
    return model


@pytest.fixture(scope="module")
def ldvae(cells) -> LDVAE:
    model = create_model("ldvae", {"max_epochs": 40, **QUIET})
    model.fit(cells)
    return model


def split_of(adata: ad.AnnData, name: str) -> ad.AnnData:
    return adata[split_mask(adata, name)]


@pytest.mark.parametrize("name", ["vae", "ldvae"])
def test_latents_classify_held_out_cell_types(cells, name, request):
    model = request.getfixturevalue(name)
    train, test = split_of(cells, "train"), split_of(cells, "test")
    accuracy = knn_accuracy(
        model.embed(train).mean, train.obs["cell_type"], model.embed(test).mean, test.obs["cell_type"]
    )
    assert accuracy >= 0.9


def test_ldvae_factors_recover_planted_programs(cells, ldvae):
    loadings = ldvae.loadings()
    assert list(loadings.index) == list(cells.var_names) and loadings.shape == (300, 10)
    program = cells.var["program"].to_numpy()
    precisions = []
    for k in range(program.max() + 1):
        genes = set(cells.var_names[program == k])
        best = max(
            len(set(loadings[factor].mul(sign).nlargest(len(genes)).index) & genes) / len(genes)
            for factor in loadings.columns
            for sign in (1, -1)
        )
        precisions.append(best)
    assert np.mean(precisions) >= 0.8, precisions


def test_ldvae_variance_explained_shares(cells, ldvae):
    shares = ldvae.variance_explained(cells)
    assert list(shares.index) == list(ldvae.loadings().columns)
    assert (shares >= 0).all() and 0.5 < shares.sum() < 1.2
    assert shares.iloc[:6].sum() > 0.8  # four type contrasts and two cell states carry the signal


def test_vae_heldout_nll_beats_a_per_gene_nb(cells, vae):
    train = split_of(cells, "train").X.toarray()
    test = split_of(cells, "test").X.toarray()
    mean, var = train.mean(0) + 1e-3, train.var(0)
    theta = np.where(var > mean, mean**2 / np.maximum(var - mean, 1e-12), 1e6)
    baseline = -stats.nbinom.logpmf(test, theta, theta / (theta + mean)).sum(1).mean()
    nll = vae.heldout_nll(split_of(cells, "test"))
    assert nll["nll_marginal"] <= nll["nll_elbo"] + 1e-3
    assert nll["nll_elbo"] < baseline - 20, (nll, baseline)


def test_history_reports_terms_and_validation_uses_the_full_kl_weight(vae):
    first, last = vae.history.epochs[0], vae.history.epochs[-1]
    for epoch in (first, last):
        assert {"train_loss", "train_reconstruction", "train_kl", "validation_loss"} <= set(epoch)
        assert epoch["validation_loss"] == pytest.approx(
            epoch["validation_reconstruction"] + epoch["validation_kl"], rel=1e-5
        )
    assert first["train_loss"] < first["train_reconstruction"] + 0.5 * first["train_kl"]  # warm-up weight < 1
    assert 0 <= vae.history.best_epoch < len(vae.history.epochs)


def test_fused_latent_draw_and_kl_equal_the_plain_terms():
    """`elbo_terms` draws z and its KL in one autograd step: same draw, same KL, same gradients as the
    unfused expressions (float64 gradcheck), the clamped log variance included."""
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(6, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    raw = (torch.randn(6, 3, generator=generator, dtype=torch.float64) * 4).requires_grad_()
    with torch.no_grad():
        raw[0, 0] = MAX_LOG_VAR + 1.0
    noise = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    z, kl = _DrawWithKL.apply(mean, raw, noise)
    var = positive(raw)
    torch.testing.assert_close(z, mean + var.sqrt() * noise)
    torch.testing.assert_close(kl, gaussian_kl(mean, var))
    assert torch.autograd.gradcheck(lambda m, r: _DrawWithKL.apply(m, r, noise), (mean, raw))


def test_kl_weight_reaches_beta_at_the_warmup_fraction():
    module = VAE(VAEConfig(beta=2.0, kl_warmup_fraction=0.5, max_epochs=10)).build_module(5, 0, None)
    ctx = StepContext([], LoopConfig(), max_epochs=10)
    weights = []
    for epoch in (0, 2, 5, 9):
        ctx.epoch = epoch
        weights.append(module.kl_weight(ctx))
    assert weights == pytest.approx([0.0, 0.8, 2.0, 2.0])


def test_no_warmup_epoch_is_kept_and_training_runs_past_the_warmup(small):
    """The best state, early stopping and LR steps start once the KL weight is full: with patience 1 a fit
    still trains through the warm-up, and the epoch it keeps is one at the full KL weight."""
    model = create_model("vae", {"max_epochs": 12, "kl_warmup_fraction": 0.5, "patience": 1, **QUIET})
    assert model.warmup_epochs() == 6 and create_model("ae", {"max_epochs": 12}).warmup_epochs() == 0
    model.fit(small)
    assert len(model.history.epochs) >= 7 and model.history.best_epoch >= 6


def test_automatic_validation_split_is_stratified_by_batch(small):
    """Without obs['split'], a model with a batch key validates on every batch in proportion."""
    from scdgm.models.data import fit_split

    obs = small.obs.drop(columns="split", errors="ignore")
    batches = obs["batch"].astype(str).to_numpy()
    with pytest.warns(UserWarning, match="stratified by batch"):
        _, validation = fit_split(obs, 0, batches)
    shares = pd.Series(validation).groupby(batches).mean()
    assert len(shares) == 2 and (shares - 0.1).abs().max() <= 0.01
    model = create_model("vae", {"max_epochs": 1, "batch_key": "batch", **QUIET})
    with pytest.warns(UserWarning, match="stratified by batch"):
        model.fit(ad.AnnData(X=small.X, obs=obs, var=small.var))


def test_posterior_draws_are_row_aligned_with_their_cells(cells, vae):
    test = split_of(cells, "test")
    samples = vae.sample(test, draws=2)
    assert samples.x.shape == (2 * test.n_obs, test.n_vars) and samples.z.shape == (2 * test.n_obs, 10)
    assert np.array_equal(samples.cell_index, np.tile(np.arange(test.n_obs), 2))
    libraries = np.log(np.asarray(test.X.sum(1)).ravel())
    assert np.corrcoef(np.log1p(samples.x[: test.n_obs].sum(1)), libraries)[0, 1] > 0.8
    types = test.obs["cell_type"].to_numpy()
    means = {t: samples.z[: test.n_obs][types == t].mean(0) for t in np.unique(types)}
    assigned = [min(means, key=lambda t: np.linalg.norm(z - means[t])) for z in samples.z[test.n_obs :]]
    assert np.mean(np.array(assigned) == types) > 0.9  # the second draw of cell i still looks like cell i


def test_prior_samples_look_like_cells(cells, vae):
    samples = vae.sample(n=500, source="prior", seed=3)
    assert samples.cell_index is None and samples.x.shape == (500, 300)
    observed = np.log(np.asarray(cells.X.sum(1)).ravel())
    assert np.log(samples.x.sum(1)).mean() == pytest.approx(observed.mean(), abs=0.15)
    assert np.array_equal(samples.x, vae.sample(n=500, source="prior", seed=3).x)


@pytest.mark.parametrize("name", ["vae", "ldvae"])
def test_save_load_embeds_and_samples_identically(cells, name, request, tmp_path):
    model = request.getfixturevalue(name)
    model.save(tmp_path / name)
    loaded = load_model(str(tmp_path / name))
    assert type(loaded) is type(model) and loaded.config == model.config
    test = split_of(cells, "test")
    before, after = model.embed(test), loaded.embed(test)
    assert np.array_equal(before.mean, after.mean) and np.array_equal(before.var, after.var)
    assert np.array_equal(model.sample(test, seed=5).x, loaded.sample(test, seed=5).x)
    assert np.array_equal(model.reconstruct(test), loaded.reconstruct(test))


def test_ldvae_rotation_keeps_the_model(cells, ldvae):
    rotation = ldvae.module.rotation.numpy()
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(10), atol=1e-5)
    unrotated = LDVAE(dataclasses.replace(ldvae.config, rotation="none"))
    unrotated.genes, unrotated.module = ldvae.genes, ldvae.module
    test = split_of(cells, "test")
    assert np.allclose(ldvae.reconstruct(test), unrotated.reconstruct(test))
    weights = ldvae.module.decoder.linear_weights().detach().numpy()
    np.testing.assert_allclose(ldvae.loadings().to_numpy(), weights @ rotation, atol=1e-5)
    assert np.allclose(varimax(ldvae.loadings().to_numpy()), np.eye(10), atol=1e-3)  # already varimax


def test_training_is_seeded_and_deterministic(small):
    def fit(seed: int) -> VAE:
        model = create_model("vae", {"max_epochs": 2, "seed": seed, **QUIET})
        model.fit(small)
        return model

    first, second, other = fit(0), fit(0), fit(1)
    for name, tensor in first.state_tensors().items():
        assert torch.equal(tensor, second.state_tensors()[name]), name
    assert first.history.epochs == second.history.epochs  # the loss history too, bit for bit
    assert first.history.epochs != other.history.epochs
    assert np.array_equal(first.embed(small).mean, second.embed(small).mean)
    assert not np.array_equal(first.embed(small).mean, other.embed(small).mean)
    assert first.device.type == "cpu" or torch.cuda.is_available()  # device="auto"


@pytest.mark.parametrize(
    "options",
    [
        {"likelihood": "zinb", "library": "learned", "batch_key": "batch", "dispersion": "gene-batch"},
        {"likelihood": "poisson", "n_layers": 2, "batch_norm": False},
    ],
)
def test_likelihood_library_and_batch_options(small, options, tmp_path):
    model = create_model("vae", {"max_epochs": 3, "n_latent": 4, "n_importance": 5, **options, **QUIET})
    model.fit(small)
    test = split_of(small, "test")
    nll = model.heldout_nll(test)
    assert np.isfinite(list(nll.values())).all()
    embedding = model.embed(test)
    assert embedding.mean.shape == (test.n_obs, 4) and (embedding.var > 0).all()
    prior = model.sample(n=50, source="prior")
    assert prior.x.shape == (50, small.n_vars) and (prior.x >= 0).all()
    assert np.all(model.reconstruct(test) >= 0)
    model.save(tmp_path / "m")
    assert np.array_equal(load_model(str(tmp_path / "m")).embed(test).mean, embedding.mean)


def test_unknown_batch_values_and_bad_options_are_user_errors(small):
    model = create_model("vae", {"max_epochs": 1, "batch_key": "batch", **QUIET})
    model.fit(small)
    other = small[:10].copy()
    other.obs["batch"] = "batch_9"
    with pytest.raises(ScdgmError, match="unknown batch value"):
        model.embed(other)
    with pytest.raises(ScdgmError, match="likelihood: expected one of 'nb', 'zinb', 'poisson'"):
        create_model("vae", {"likelihood": "gaussian"})
    with pytest.raises(ScdgmError, match="kl_warmup_fraction"):
        create_model("vae", {"kl_warmup_fraction": 2.0})
    with pytest.raises(ScdgmError, match="unknown hyperparameter"):
        create_model("ldvae", {"n_factors": 3})
    with pytest.raises(ScdgmError, match="needs a batch covariate"):
        create_model("vae", {"dispersion": "gene-batch"})


@pytest.mark.slow
def test_ldvae_factors_group_pbmc_marker_pairs():
    from scdgm.pipelines.config import load_params
    from scdgm.pipelines.fetch import load_pbmc3k
    from scdgm.pipelines.prepare import prepare

    adata = prepare(load_pbmc3k(), load_params()["prepare"], seed=0)
    model = create_model("ldvae", {"n_latent": 10, "max_epochs": 200, "patience": 20, **QUIET})
    model.fit(adata)
    loadings = model.loadings()
    tops = [set(loadings[f].mul(sign).nlargest(20).index) for f in loadings.columns for sign in (1, -1)]
    for pair in (("S100A8", "S100A9"), ("CD79A", "CD79B"), ("GNLY", "NKG7")):
        assert all(gene in loadings.index for gene in pair), pair
        assert any(set(pair) <= top for top in tops), pair
