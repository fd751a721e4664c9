"""Patterns over selected genes, Jensen–Shannon distances between their latent distributions, and classical MDS."""
import numpy as np
import pytest
import scipy.sparse as sp

from scdgm.interpret.patterns import classical_mds, js_distances, pattern_strings, summarize_patterns


def test_pattern_strings_dense_and_sparse():
    bits = np.array([[1, 0, 1], [0, 0, 0], [1, 0, 1]])
    assert pattern_strings(bits).tolist() == ["101", "000", "101"]
    assert pattern_strings(sp.csr_matrix(bits)).tolist() == ["101", "000", "101"]


def test_js_distance_properties():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(6), size=5)
    p[4] = p[1]                         # identical distributions
    p[3] = [1, 0, 0, 0, 0, 0]
    d = js_distances(np.vstack([p, [[0, 0, 0, 0, 0, 1]]]))
    assert np.allclose(d, d.T) and np.all(np.diag(d) == 0)
    assert d[1, 4] == pytest.approx(0, abs=1e-7)
    assert d[3, 5] == pytest.approx(1.0)  # disjoint supports: JSD = 1 bit
    assert (d >= 0).all() and (d <= 1).all()
    i, j, k = 0, 1, 2                   # sqrt(JSD) is a metric
    assert d[i, k] <= d[i, j] + d[j, k] + 1e-12


def test_classical_mds_recovers_planar_configuration():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(7, 2))
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
    coordinates = classical_mds(distances)
    recovered = np.linalg.norm(coordinates[:, None] - coordinates[None], axis=-1)
    np.testing.assert_allclose(recovered, distances, atol=1e-9)
    assert classical_mds(np.zeros((1, 1))).shape == (1, 2)


def test_summary_counts_distributions_and_map():
    rng = np.random.default_rng(2)
    h = rng.integers(0, 2, size=(500, 2))
    x = np.hstack([h[:, [0]], rng.integers(0, 2, size=(500, 3)), h[:, [1]]])
    summary = summarize_patterns(x, h, genes=[0, 4], n_top=3)
    expected = {f"{a}{b}": int(((h[:, 0] == a) & (h[:, 1] == b)).sum()) for a in (0, 1) for b in (0, 1)}
    top = sorted(expected, key=lambda p: (-expected[p], p))[:3]
    assert summary.patterns == top and summary.counts.tolist() == [expected[p] for p in top]
    np.testing.assert_allclose(summary.distributions.sum(axis=1), 1)
    # each pattern here fixes its latent configuration: distributions are disjoint, all distances are 1
    assert np.allclose(summary.distances + np.eye(3), 1)
    assert summary.coordinates.shape == (3, 2)
    frame = summary.to_frame()
    assert frame["top_configuration"].tolist() == top and frame["count"].sum() == summary.counts.sum()
