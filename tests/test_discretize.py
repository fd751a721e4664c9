"""Discretisation: strict quantile thresholds, latent rules, sparse = dense, and a JSON round trip."""
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
    bits, _, fitted = discretize(x, np.zeros((10, 1)))
    assert fitted.gene_thresholds.tolist() == [0.0, 4.5]
    assert bits[:, 0].tolist() == [1, 1, 1] + [0] * 7
    assert bits[:, 1].tolist() == [0] * 5 + [1] * 5
    high = fit_discretizer(counts, quantile=0.9)
    assert np.array_equal(high.gene_thresholds, np.quantile(counts.astype(np.float64), 0.9, axis=0))


def test_latent_rules():
    z = np.array([[-1.0, 3.0], [0.5, 4.0], [2.0, 5.0]])
    assert fit_discretizer(np.ones((3, 1)), z).latents_binary(z).tolist() == [[0, 1], [1, 1], [1, 1]]
    median = fit_discretizer(np.ones((3, 1)), z, latent_rule="median")
    assert median.latent_thresholds.tolist() == [0.5, 4.0]
    assert median.latents_binary(z).tolist() == [[0, 0], [0, 0], [1, 1]]


def test_sparse_and_dense_inputs_give_identical_results(counts, monkeypatch):
    monkeypatch.setattr("scdgm.interpret.discretize.CHUNK_ELEMENTS", 300 * 7)  # several column blocks
    z = np.random.default_rng(1).normal(size=(300, 3))
    dense_bits, dense_h, dense_rule = discretize(counts, z)
    sparse_bits, sparse_h, sparse_rule = discretize(sp.csr_matrix(counts), z)
    assert sp.issparse(sparse_bits) and sparse_bits.dtype == np.uint8
    assert np.array_equal(dense_rule.gene_thresholds, sparse_rule.gene_thresholds)
    assert np.array_equal(dense_bits, sparse_bits.toarray())
    assert np.array_equal(dense_h, sparse_h)
    assert dense_bits[:, 0].sum() == 0


def test_thresholds_round_trip_through_json(counts):
    z = np.random.default_rng(2).normal(size=(300, 4))
    genes = [f"g{i}" for i in range(40)]
    bits, h, fitted = discretize(counts, z, quantile=0.7, latent_rule="median", genes=genes)
    loaded = Discretizer.from_dict(json.loads(json.dumps(fitted.to_dict())))
    assert loaded.genes == genes and loaded.quantile == 0.7 and loaded.latent_rule == "median"
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
