"""Discretisation: two-group (Otsu) and strict quantile thresholds, latent rules, sparse = dense, JSON round trip."""
import json

import numpy as np
import pytest
import scipy.sparse as sp

from scdgm.errors import InputError, ScdgmError
from scdgm.interpret.discretize import Discretizer, discretize, fit_discretizer


@pytest.fixture
def counts() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.poisson(rng.gamma(0.5, 2.0, size=(1, 40)), size=(300, 40)).astype(np.float32)
    x[:, 0] = 0  # a gene never detected
    return x


def test_strict_quantile_threshold_means_nonzero_for_sparse_genes(counts):
    x = np.zeros((10, 2))
    x[:3, 0] = [1, 2, 5]          # 70 % zeros: the median is 0, so "non-zero"
    x[:, 1] = np.arange(10)       # median 4.5: the upper half
    bits, _, fitted = discretize(x, np.zeros((10, 1)), gene_cut="quantile")
    assert fitted.gene_thresholds.tolist() == [0.0, 4.5]
    assert bits[:, 0].tolist() == [1, 1, 1] + [0] * 7
    assert bits[:, 1].tolist() == [0] * 5 + [1] * 5
    high = fit_discretizer(counts, quantile=0.9, gene_cut="quantile")
    assert np.array_equal(high.gene_thresholds, np.quantile(counts.astype(np.float64), 0.9, axis=0))


def test_two_group_cut_puts_a_marker_on_where_it_is_high_not_wherever_one_molecule_was_seen():
    rng = np.random.default_rng(3)
    background = rng.poisson(0.4, 800)          # most cells: 0-2 stray molecules
    high = rng.poisson(30.0, 200)               # the cells of the type that expresses it
    x = np.concatenate([background, high]).astype(np.float64)[:, None]
    two_group = fit_discretizer(x)
    assert two_group.gene_cut == "two-group"
    assert background.max() <= two_group.gene_thresholds[0] < high.min()
    assert two_group.genes_binary(x)[:, 0].tolist() == [0] * 800 + [1] * 200
    median = fit_discretizer(x, gene_cut="quantile")  # the median is 0: every stray molecule counts as "on"
    assert median.genes_binary(x)[:800, 0].sum() == (background > 0).sum() > 200


def test_two_group_cut_maximises_between_group_variance_of_log_counts():
    rng = np.random.default_rng(4)
    x = rng.negative_binomial(2, 0.3, size=(200, 6)).astype(np.float64)
    x[:, 5] = 7.0                                # one value only: the cut is that value, the gene never on
    thresholds = fit_discretizer(x).gene_thresholds
    for gene in range(5):
        values = np.log1p(x[:, gene])
        cuts = np.unique(x[:, gene])[:-1]

        def between(cut: float, values: np.ndarray = values, gene: int = gene) -> float:
            low = values[x[:, gene] <= cut]
            up = values[x[:, gene] > cut]
            return len(low) * len(up) * (low.mean() - up.mean()) ** 2

        best = max(cuts, key=between)
        assert thresholds[gene] == best
    assert thresholds[5] == 7.0 and fit_discretizer(x).genes_binary(x)[:, 5].sum() == 0
    with pytest.raises(InputError, match="non-negative"):
        fit_discretizer(-x)
    with pytest.raises(ScdgmError, match="gene_cut"):
        fit_discretizer(x, gene_cut="mixture")


def test_latent_rules():
    z = np.array([[-1.0, 3.0], [0.5, 4.0], [2.0, 5.0]])
    assert fit_discretizer(np.ones((3, 1)), z).latents_binary(z).tolist() == [[0, 1], [1, 1], [1, 1]]
    median = fit_discretizer(np.ones((3, 1)), z, latent_rule="median")
    assert median.latent_thresholds.tolist() == [0.5, 4.0]
    assert median.latents_binary(z).tolist() == [[0, 0], [0, 0], [1, 1]]


def test_sparse_and_dense_inputs_give_identical_results(counts, monkeypatch):
    monkeypatch.setattr("scdgm.interpret.discretize.CHUNK_ELEMENTS", 300 * 7)  # several column blocks
    z = np.random.default_rng(1).normal(size=(300, 3))
    for cut in ("two-group", "quantile"):
        dense_bits, dense_h, dense_rule = discretize(counts, z, gene_cut=cut)
        sparse_bits, sparse_h, sparse_rule = discretize(sp.csr_matrix(counts), z, gene_cut=cut)
        assert sp.issparse(sparse_bits) and sparse_bits.dtype == np.uint8
        assert np.array_equal(dense_rule.gene_thresholds, sparse_rule.gene_thresholds)
        assert np.array_equal(dense_bits, sparse_bits.toarray())
        assert np.array_equal(dense_h, sparse_h)
        assert dense_bits[:, 0].sum() == 0


def test_thresholds_round_trip_through_json(counts):
    z = np.random.default_rng(2).normal(size=(300, 4))
    genes = [f"g{i}" for i in range(40)]
    bits, h, fitted = discretize(counts, z, quantile=0.7, latent_rule="median", genes=genes, gene_cut="quantile")
    loaded = Discretizer.from_dict(json.loads(json.dumps(fitted.to_dict())))
    assert loaded.genes == genes and loaded.quantile == 0.7 and loaded.latent_rule == "median"
    assert loaded.gene_cut == "quantile"
    version_1 = {k: v for k, v in fitted.to_dict().items() if k != "gene_cut"} | {"version": 1}
    assert Discretizer.from_dict(version_1).gene_cut == "quantile"  # written before gene_cut existed
    assert np.array_equal(loaded.genes_binary(counts), bits)
    assert np.array_equal(loaded.latents_binary(z), h)
    columns = [5, 1, 7]
    assert np.array_equal(loaded.genes_binary(sp.csr_matrix(counts), columns=columns).toarray(), bits[:, columns])


def test_bad_inputs_are_user_errors(counts):
    with pytest.raises(InputError, match="NaN"):
        fit_discretizer(np.array([[1.0, np.nan]]))
    with pytest.raises(ScdgmError, match="quantile"):
        fit_discretizer(counts, quantile=1.0)
    fitted = fit_discretizer(counts)
    with pytest.raises(InputError, match="40 gene"):
        fitted.genes_binary(counts[:, :5])
    with pytest.raises(ScdgmError, match="without latents"):
        fitted.latents_binary(np.zeros((2, 2)))
    with pytest.raises(ScdgmError, match="format"):
        Discretizer.from_dict({"format": "other"})
