"""The linear baseline: PPCA in closed form agrees with sklearn's PCA and with the textbook posterior and
likelihood; factor analysis runs behind the same interface; sampling, saving and seeding behave."""
import numpy as np
import pytest
from scipy.linalg import subspace_angles
from scipy.stats import multivariate_normal
from sklearn.decomposition import PCA as SklearnPCA

from scdgm.errors import InputError
from scdgm.models import GenerativeModel
from scdgm.models.evaluation import PCASpace
from scdgm.models.pca import PCA
from scdgm.pipelines.prepare import split_cells
from scdgm.pipelines.simulate import simulate_programs

SPLIT = {"train": 0.7, "validation": 0.15, "test": 0.15}


@pytest.fixture(scope="module")
def adata():
    data = simulate_programs(400, 80, genes_per_program=10, seed=3)
    data.obs["split"] = split_cells(data.obs["cell_type"], SPLIT, seed=3)
    return data


@pytest.fixture(scope="module")
def ppca(adata):
    model = PCA(n_latent=5)
    model.fit(adata)
    return model


def log_normalised(adata):
    return PCASpace().features(adata.X)


def test_ppca_spans_the_sklearn_pca_subspace(adata, ppca):
    train = log_normalised(adata[adata.obs["split"] == "train"])
    reference = SklearnPCA(n_components=5).fit(train)
    assert np.degrees(subspace_angles(ppca.loadings().to_numpy(), reference.components_.T)).max() < 0.01
    scores = reference.transform(log_normalised(adata))
    embedding = ppca.embed(adata).mean
    coefficients, *_ = np.linalg.lstsq(np.c_[scores, np.ones(len(scores))], embedding, rcond=None)
    residual = embedding - np.c_[scores, np.ones(len(scores))] @ coefficients
    assert np.abs(residual).max() < 1e-4 * np.abs(embedding).max()


def test_variance_explained_is_the_eigenvalue_share_less_noise(adata, ppca):
    train = log_normalised(adata[adata.obs["split"] == "train"])
    reference = SklearnPCA(n_components=5).fit(train)
    eigenvalues = reference.explained_variance_ * (len(train) - 1) / len(train)  # ML (1/n) covariance
    sigma2 = ppca.state_tensors()["noise_variance"][0].item()
    shares = ppca.variance_explained()
    assert list(shares.index) == list(ppca.loadings().columns) == [f"latent_{i}" for i in range(5)]
    assert np.all(np.diff(shares.to_numpy()) <= 1e-12) and 0 < shares.sum() < 1
    np.testing.assert_allclose(shares.to_numpy(), (eigenvalues - sigma2) / train.var(axis=0).sum(), rtol=1e-4)


def test_posterior_and_likelihood_have_the_closed_forms(adata, ppca):
    tensors = {k: v.cpu().numpy() for k, v in ppca.state_tensors().items()}
    w, mu, sigma2 = tensors["loadings"], tensors["mean"], tensors["noise_variance"][0]
    cells = adata[:20]
    centred = log_normalised(cells) - mu
    m = w.T @ w + sigma2 * np.eye(5)
    embedding = ppca.embed(cells)
    np.testing.assert_allclose(embedding.mean, centred @ np.linalg.solve(m, w.T).T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(embedding.var, np.tile(sigma2 * np.diag(np.linalg.inv(m)), (20, 1)), rtol=1e-4)
    covariance = w @ w.T + sigma2 * np.eye(len(mu))
    expected = -multivariate_normal(mu, covariance).logpdf(log_normalised(cells)).mean()
    assert ppca.heldout_nll(cells)["gaussian_nll_lognorm"] == pytest.approx(expected, rel=1e-8)


def test_factor_analysis_runs_behind_the_same_interface(adata, ppca):
    fa = PCA(method="fa", n_latent=5)
    history = fa.fit(adata)
    assert {"train_loss", "validation_loss"} <= set(history.epochs[0])
    assert fa.loadings().shape == (adata.n_vars, 5)
    assert 0 < fa.variance_explained().sum() < 1
    test = adata[adata.obs["split"] == "test"]
    # FA's free per-gene noise fits at least as well as PPCA's single noise variance.
    assert fa.heldout_nll(test)["gaussian_nll_lognorm"] < ppca.heldout_nll(test)["gaussian_nll_lognorm"]
    assert np.all(fa.embed(test).var > 0)


def test_samples_are_counts_aligned_with_their_cells(adata, ppca):
    cells = adata[:30]
    draws = ppca.sample(cells, draws=2, seed=1)
    assert draws.x.shape == (60, adata.n_vars) and draws.z.shape == (60, 5)
    assert np.array_equal(draws.cell_index, np.tile(np.arange(30), 2))
    assert np.all(draws.x >= 0) and np.array_equal(draws.x, np.round(draws.x))
    # posterior latents scatter around the cell's posterior mean
    mean = ppca.embed(cells).mean
    assert np.corrcoef(draws.z[:30, 0], mean[:, 0])[0, 1] > 0.9
    prior = ppca.sample(n=50, source="prior", seed=1)
    assert prior.x.shape == (50, adata.n_vars) and prior.cell_index is None
    assert np.array_equal(prior.x, ppca.sample(n=50, source="prior", seed=1).x)
    assert not np.array_equal(prior.x, ppca.sample(n=50, source="prior", seed=2).x)
    expected = ppca.reconstruct(cells)
    assert expected.shape == (30, adata.n_vars) and np.all(expected >= 0)


def test_save_load_round_trip(adata, ppca, tmp_path):
    ppca.save(tmp_path / "pca")
    loaded = GenerativeModel.load(tmp_path / "pca")
    assert isinstance(loaded, PCA) and loaded.genes == ppca.genes
    np.testing.assert_array_equal(loaded.embed(adata).mean, ppca.embed(adata).mean)
    np.testing.assert_array_equal(loaded.sample(adata[:10], seed=4).x, ppca.sample(adata[:10], seed=4).x)
    assert loaded.heldout_nll(adata) == ppca.heldout_nll(adata)


def test_genes_are_aligned_by_name(adata, ppca):
    reordered = adata[:10, ::-1].copy()
    np.testing.assert_allclose(ppca.embed(reordered).mean, ppca.embed(adata[:10]).mean, rtol=1e-6)
    with pytest.raises(InputError):
        ppca.embed(reordered[:, :40])


def test_options_are_checked():
    with pytest.raises(InputError, match="method"):
        PCA(method="ica")
    with pytest.raises(InputError, match="not been fitted"):
        PCA().embed(simulate_programs(5, 80, genes_per_program=10))
