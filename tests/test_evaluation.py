"""Shared evaluation: the two-sample statistics, kNN accuracy, the fixed PCA space, reconstruction metrics and
`evaluate_model` on a count model and on the binary DBM."""
import anndata as ad
import numpy as np
import pytest

from scdgm.errors import InputError
from scdgm.models import create_model
from scdgm.models.evaluation import (
    MAX_CELLS,
    PCASpace,
    c2st_auc,
    evaluate_model,
    knn_accuracy,
    mmd_rbf,
    reconstruction_metrics,
)
from scdgm.pipelines.prepare import split_cells
from scdgm.pipelines.simulate import simulate_programs

RNG = np.random.default_rng(0)
A, B = RNG.normal(size=(300, 5)), RNG.normal(size=(300, 5))
SHIFTED = RNG.normal(size=(300, 5)) + np.array([1.5, 0, 0, 0, 0])


def test_mmd_is_zero_for_identical_samples_and_grows_with_the_shift():
    assert mmd_rbf(A, A) == pytest.approx(0.0, abs=1e-12)
    same, shifted = mmd_rbf(A, B), mmd_rbf(A, SHIFTED)
    assert same < 0.02 < shifted
    assert mmd_rbf(SHIFTED, A) == pytest.approx(shifted)


def test_c2st_auc_is_half_for_one_distribution_and_one_for_separated_ones():
    assert c2st_auc(A, B, seed=0) == pytest.approx(0.5, abs=0.08)
    assert c2st_auc(A, A + 10.0, seed=0) > 0.99
    assert c2st_auc(A, SHIFTED, seed=3) == c2st_auc(A, SHIFTED, seed=3)
    with pytest.raises(InputError, match="at least 2 samples"):
        c2st_auc(A[:1], B)


def test_knn_accuracy_on_separated_and_mixed_labels():
    labels = np.repeat(["x", "y"], 150)
    points = np.vstack([A[:150], A[150:] + 8.0])
    assert knn_accuracy(points[::2], labels[::2], points[1::2], labels[1::2]) == 1.0
    assert knn_accuracy(A[::2], labels[::2], A[1::2], labels[1::2], k=5) < 0.75


def test_pca_space_of_log_normalised_and_binary_expression():
    counts = RNG.poisson(2.0, size=(80, 120)).astype(np.float32)
    counts[0] = 0  # a cell with no counts stays at the origin of the features
    space = PCASpace().fit(counts)
    assert space.transform(counts).shape == (80, 50)
    assert space.transform(counts * 3).shape == (80, 50)
    np.testing.assert_allclose(space.transform(counts * 3)[1:], space.transform(counts)[1:], atol=1e-8)
    binary = PCASpace(n_components=10, binary=True).fit(counts)
    np.testing.assert_allclose(binary.transform(counts * 7), binary.transform(counts > 0))
    assert PCASpace().fit(counts[:5]).transform(counts).shape == (80, 4)
    with pytest.raises(InputError, match="before fit"):
        PCASpace().transform(counts)


def test_reconstruction_metrics_for_counts_and_binary_output():
    counts = RNG.poisson(3.0, size=(20, 30)).astype(np.float64)
    perfect = reconstruction_metrics(counts, counts, binary=False)
    assert perfect["reconstruction_mse_log1p"] == 0.0 and perfect["reconstruction_pearson"] == pytest.approx(1.0)
    noisy = reconstruction_metrics(counts + RNG.uniform(0, 3, counts.shape), counts, binary=False)
    assert noisy["reconstruction_mse_log1p"] > 0 and noisy["reconstruction_pearson"] < 1
    binary = reconstruction_metrics((counts > 0) * 0.9 + 0.05, counts, binary=True)
    assert binary["reconstruction_accuracy"] == 1.0 and binary["reconstruction_bce"] == pytest.approx(-np.log(0.95))


@pytest.fixture(scope="module")
def cells() -> ad.AnnData:
    adata = simulate_programs(600, 80, seed=4, genes_per_program=8)
    adata.obs["split"] = split_cells(adata.obs["cell_type"], {"train": 0.7, "validation": 0.1, "test": 0.2}, 4)
    return adata


def test_evaluate_a_count_model(cells):
    model = create_model("vae", {"max_epochs": 15, "n_importance": 10, "progress": False})
    model.fit(cells)
    metrics = model.evaluate(cells)
    expected = {"nll_elbo", "nll_marginal", "reconstruction_mse_log1p", "reconstruction_pearson", "mmd_posterior",
                "c2st_posterior", "mmd_prior", "c2st_prior", "knn_accuracy", "silhouette"}
    assert set(metrics) == expected
    assert all(isinstance(v, float) and np.isfinite(v) for v in metrics.values())
    assert metrics["knn_accuracy"] > 0.8 and metrics["reconstruction_pearson"] > 0.5
    assert metrics["c2st_posterior"] < 0.9 and metrics["mmd_posterior"] < 0.2
    assert evaluate_model(model, cells, "test") == metrics  # seeded: the same numbers again
    unlabelled = cells.copy()
    del unlabelled.obs["cell_type"], unlabelled.obs["split"]
    assert "knn_accuracy" not in evaluate_model(model, unlabelled, None)
    with pytest.raises(InputError, match="no cells in split 'holdout'"):
        model.evaluate(cells, "holdout")


def test_evaluate_the_binary_dbm(cells):
    model = create_model(
        "dbm", {"max_epochs": 2, "n_hidden1": 16, "n_hidden2": 4, "n_chains": 20, "burn_in": 5, "progress": False}
    )
    model.fit(cells)
    metrics = model.evaluate(cells)
    binary_keys = {"reconstruction_bce", "reconstruction_accuracy", "mmd_prior", "c2st_posterior", "knn_accuracy"}
    assert binary_keys <= set(metrics)
    assert 0.5 < metrics["reconstruction_accuracy"] <= 1.0
    assert MAX_CELLS == 2000
