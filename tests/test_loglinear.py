"""The closed-form G² equals per-table Poisson GLM and IPF fits; formats and code paths agree; bad input fails."""
import numpy as np
import pytest
import scipy.sparse as sp

import scdgm.interpret.loglinear as loglinear
from scdgm.errors import InputError, ScdgmError
from scdgm.interpret.loglinear import LogLinearProblem, g2_matrix, stepwise_select
from scdgm.interpret.reference import contingency_table, glm_deviance, ipf_deviance, reference_g2_matrix


def random_problem(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Small sparse-ish binary genes and latents, with some structure and many empty cells."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 2))
    x = (z @ rng.normal(size=(2, 6)) + rng.normal(size=(n, 6)) > 0.8).astype(np.uint8)
    h = (z + rng.normal(size=(n, 2)) > 0).astype(np.uint8)
    x[:, 5] = 0  # a constant gene: zero margins
    return x, np.hstack([h, (rng.random((n, 1)) < 0.3).astype(np.uint8)])


@pytest.mark.parametrize("n", [30, 150])
@pytest.mark.parametrize("selected", [(), (1,), (1, 3)])
@pytest.mark.parametrize("model", ["conditional", "joint"])
@pytest.mark.parametrize("empty_cell", [0.0, 0.5])
def test_closed_form_equals_glm_deviance(n, selected, model, empty_cell):
    x, h = random_problem(n, seed=n + len(selected))
    fast = g2_matrix(x, h, selected, model, empty_cell)
    glm = reference_g2_matrix(x, h, selected, model, empty_cell, method="glm")
    assert np.array_equal(np.isnan(fast), np.isnan(glm))
    assert np.isnan(fast[list(selected)]).all()
    np.testing.assert_allclose(fast, glm, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("model", ["conditional", "joint"])
def test_ipf_agrees_and_correction_changes_totals(model):
    x, h = random_problem(40, seed=3)
    selected = (0, 1, 2)  # 8 strata of x_S for 40 samples: some are empty
    np.testing.assert_allclose(g2_matrix(x, h, selected, model, 0.5),
                               reference_g2_matrix(x, h, selected, model, 0.5, method="ipf"), rtol=1e-6, atol=1e-8)
    table = contingency_table(x, h, selected, gene=4, latent=0)
    assert (table == 0).any()
    plain, corrected = glm_deviance(table, model), glm_deviance(table, model, empty_cell=0.5)
    assert plain == pytest.approx(ipf_deviance(table, model), rel=1e-6)
    assert corrected == pytest.approx(ipf_deviance(table, model, empty_cell=0.5), rel=1e-6)
    assert corrected != pytest.approx(plain, rel=1e-3)


def test_plain_g2_is_twice_n_times_mutual_information():
    x, h = random_problem(200, seed=4)
    table = contingency_table(x, h, (), gene=0, latent=0) / 200
    outer = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True)
    mutual_information = (table * np.log(table / outer)).sum()
    assert g2_matrix(x, h)[0, 0] == pytest.approx(2 * 200 * mutual_information, rel=1e-10)


def test_formats_and_count_paths_agree(monkeypatch):
    x, h = random_problem(120, seed=5)
    expected = {s: g2_matrix(x, h, s, "joint", 0.5) for s in [(), (2,), (2, 0, 4)]}
    variants = {"sparse": sp.csr_matrix(x), "bool": x.astype(bool), "float": x.astype(np.float64)}
    for data in variants.values():
        for selected, matrix in expected.items():
            np.testing.assert_allclose(g2_matrix(data, h, selected, "joint", 0.5), matrix, rtol=1e-12)
    monkeypatch.setattr(loglinear, "DENSE_LIMIT_BYTES", 0)  # keep X sparse: sparse × sparse counts
    monkeypatch.setattr(loglinear, "DENSE_STRATA", 0)  # always the sparse one-hot matrix
    monkeypatch.setattr(loglinear, "WORK_ELEMENTS", 64)  # candidates in several chunks
    for selected, matrix in expected.items():
        np.testing.assert_allclose(g2_matrix(sp.csr_matrix(x), h, selected, "joint", 0.5), matrix, rtol=1e-12)
        np.testing.assert_allclose(g2_matrix(x, h, selected, "joint", 0.5), matrix, rtol=1e-12)


@pytest.mark.parametrize("empty_cell", [0.0, 0.5])
def test_torch_backend_matches_numpy(empty_cell):
    """The GPU code path, run here on torch's CPU device."""
    x, h = random_problem(100, seed=6)
    problem = LogLinearProblem(x, h, "conditional", empty_cell)
    expected = problem.g2((0, 3))
    problem._backend = loglinear._TorchCounts(problem.x, "cpu")
    np.testing.assert_allclose(problem.g2((0, 3)), expected, rtol=1e-10, atol=1e-10)


def permuted_reference(x: np.ndarray, h: np.ndarray, selected: tuple[int, ...], permutation: np.ndarray,
                       model: str, empty_cell: float) -> np.ndarray:
    """GLM fits of every table with the rows of (h, x_S) permuted against the candidate genes."""
    moved = x.copy()
    moved[:, list(selected)] = x[permutation][:, list(selected)]
    return reference_g2_matrix(moved, h[permutation], selected, model, empty_cell, method="glm")


ENGINE_PATHS = {
    "dense one-hot product": {"DENSE_STRATA": 1 << 20},
    "gathered rows, tabled strata": {},
    "gathered rows, k log k look-ups": {"TABLE_ELEMENTS": 0},
}


@pytest.mark.parametrize("path", ENGINE_PATHS)
@pytest.mark.parametrize("model", ["conditional", "joint"])
@pytest.mark.parametrize("empty_cell", [0.0, 0.5])
def test_permuted_g2_equals_glm_fits_of_the_permuted_tables(monkeypatch, path, model, empty_cell):
    """Every code path of the CPU engine, on strata of one sample and strata where a latent is constant (which it
    skips with e = 0), against the reference fits of the permuted tables."""
    for name, value in ENGINE_PATHS[path].items():
        monkeypatch.setattr(loglinear, name, value)
    x, h = random_problem(60, seed=13)
    selected = (0, 1, 2, 4)
    problem = LogLinearProblem(x, h, model, empty_cell)
    strata = problem._strata(selected)
    sizes, ones = strata.sizes[:, 0, 0], strata.latent_counts[:, :, 0]
    assert (sizes == 1).any() and ((sizes > 1)[:, None] & ((ones == 0) | (ones == sizes[:, None]))).any()
    permutations = np.stack([np.random.default_rng(k).permutation(60) for k in range(3)])
    values = problem._g2_batch(strata, permutations)
    assert (problem._backend._plan.table.size > 0) == (path == "gathered rows, tabled strata" and empty_cell == 0)
    for permutation, matrix in zip(permutations, values, strict=True):
        expected = permuted_reference(x, h, selected, permutation, model, empty_cell)
        assert np.array_equal(np.isnan(matrix), np.isnan(expected))
        np.testing.assert_allclose(matrix, expected, rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(problem.null_max(selected, permutations),
                                  np.nanmax(values.reshape(3, -1), axis=1))


@pytest.mark.parametrize("model", ["conditional", "joint"])
@pytest.mark.parametrize("empty_cell", [0.0, 0.5])
def test_permutation_engine_equals_the_one_hot_formulation(monkeypatch, model, empty_cell):
    """The CPU engine against the one-hot product of every stratum × latent that the torch backend keeps (run on
    torch's CPU device): the same G² for every permutation to float rounding, at every step, whatever the batch,
    in candidate chunks and from sparse X."""
    x, h = random_problem(150, seed=13)
    permutations = np.stack([np.random.default_rng(k).permutation(150) for k in range(12)])

    def both(data):
        fast, one_hot = LogLinearProblem(data, h, model, empty_cell), LogLinearProblem(data, h, model, empty_cell)
        one_hot._backend = loglinear._TorchCounts(one_hot.x, "cpu")
        return fast, one_hot

    fast, one_hot = both(x)
    for selected in [(), (2,), (2, 0), (2, 0, 4), (2, 0, 4, 1)]:
        expected = one_hot._g2_batch(one_hot._strata(selected), permutations)
        values = fast._g2_batch(fast._strata(selected), permutations)
        np.testing.assert_allclose(values, expected, rtol=1e-10, atol=1e-9)
        in_parts = np.concatenate([fast._g2_batch(fast._strata(selected), part)
                                   for part in np.array_split(permutations, [1, 6])])
        np.testing.assert_array_equal(in_parts, values)  # bit-stable: a permutation's G² ignores its batch
    monkeypatch.setattr(loglinear, "DENSE_LIMIT_BYTES", 0)  # X stays sparse
    monkeypatch.setattr(loglinear, "WORK_ELEMENTS", 512)  # candidates in chunks, no tables
    fast, one_hot = both(sp.csr_matrix(x))
    assert sp.issparse(fast.x)
    for selected in [(), (2, 0, 4, 1)]:
        np.testing.assert_allclose(fast._g2_batch(fast._strata(selected), permutations),
                                   one_hot._g2_batch(one_hot._strata(selected), permutations), rtol=1e-10, atol=1e-9)


def test_null_max_of_the_identity_permutation_is_the_observed_maximum():
    x, h = random_problem(90, seed=7)
    problem = LogLinearProblem(x, h)
    identity = np.arange(90)[None, :]
    assert problem.null_max((2,), identity)[0] == pytest.approx(np.nanmax(problem.g2((2,))), rel=1e-12)


def test_stepwise_selection_picks_the_largest_g2_each_step():
    x, h = random_problem(200, seed=8)
    result = stepwise_select(x, h, 3)
    selected = []
    for step in range(3):
        matrix = g2_matrix(x, h, selected)
        gene, latent = np.unravel_index(np.nanargmax(matrix), matrix.shape)
        assert (result.genes[step], result.latents[step]) == (gene, latent)
        assert result.g2[step] == pytest.approx(matrix[gene, latent])
        np.testing.assert_array_equal(result.matrices[step], matrix)
        selected.append(int(gene))
    assert result.pvalues is None
    frame = result.to_frame([f"g{i}" for i in range(6)])
    assert frame["gene"].tolist() == [f"g{i}" for i in result.genes]


def test_pvalues_at_the_floor_are_flagged_and_ranked_by_g2_over_the_null():
    """Strong signals sit at the floor 1/(B+1); the table says so, gives the permutations' largest G², and G² /
    that maximum still orders the steps (signal genes far above 1, a noise gene near or below it)."""
    rng = np.random.default_rng(3)
    h = (rng.random((400, 2)) < 0.5).astype(np.uint8)
    signal = h ^ (rng.random((400, 2)) < np.array([0.05, 0.25]))  # gene 0 tied to latent 0, gene 1 looser to 1
    x = np.hstack([signal, rng.random((400, 3)) < 0.5]).astype(np.uint8)
    result = stepwise_select(x, h, 3, permutations=49, seed=0)
    frame = result.to_frame()
    assert frame["pvalue_floor"].tolist() == [pytest.approx(1 / 50)] * 3
    assert result.genes[:2] == [0, 1] and frame["at_floor"].tolist() == [True, True, False]
    ratio = frame["g2_over_null_max"].to_numpy()
    assert ratio[0] > ratio[1] > 1 > ratio[2] / 1.5  # resolution where the p-values tie at the floor
    assert (frame["null_max_g2"] > 0).all()


def test_bad_inputs_are_user_errors():
    x, h = random_problem(20, seed=9)
    with pytest.raises(InputError, match="binary"):
        g2_matrix(x * 2, h)
    with pytest.raises(InputError, match="latents must be a 20"):
        g2_matrix(x, h[:5])
    with pytest.raises(ScdgmError, match="model"):
        g2_matrix(x, h, model="saturated")
    with pytest.raises(ScdgmError, match="selected genes"):
        g2_matrix(x, h, (1, 1))
    with pytest.raises(ScdgmError, match="n_genes"):
        stepwise_select(x, h, 0)
    with pytest.raises(ScdgmError, match="alpha needs permutations"):
        stepwise_select(x, h, 2, alpha=0.05)
    with pytest.raises(ScdgmError, match="device"):
        g2_matrix(x, h, device="tpu")
