"""Selection on the authors' reference design, max-statistic permutation p-values, backends and stability."""
import os
import shutil
import tempfile

import numpy as np
import pytest

import scdgm.interpret.loglinear as loglinear
from scdgm.errors import ScdgmError
from scdgm.interpret.loglinear import LogLinearProblem, selection_stability, step_test, stepwise_select
from scdgm.interpret.permutation import permutation_test

SIGNAL = set(range(10))


def reference_design(seed: int = 0, draws: int = 10, posterior_sd: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Hess et al.'s benchmark drawn directly: 1,000 cells in 4 groups with latents N(±2, 1); genes 0–4 follow z1,
    5–9 follow z2, 10–29 are noise. Each of `draws` posterior-like draws per cell redraws the genes and takes
    h = sign(z + N(0, posterior_sd²)) from the true latents."""
    rng = np.random.default_rng(seed)
    centres = np.array([[2, 2], [2, -2], [-2, 2], [-2, -2]])
    z = np.tile(np.repeat(centres, 250, axis=0) + rng.normal(size=(1000, 2)), (draws, 1))
    n = z.shape[0]
    signal = np.hstack([z[:, [0]] + rng.normal(size=(n, 5)) > 0, z[:, [1]] + rng.normal(size=(n, 5)) > 0])
    x = np.hstack([signal, rng.random((n, 20)) < 0.5]).astype(np.uint8)
    h = (z + posterior_sd * rng.normal(size=z.shape) > 0).astype(np.uint8)
    return x, h


@pytest.fixture(scope="module")
def design() -> tuple[np.ndarray, np.ndarray]:
    return reference_design()


def test_signal_genes_come_first_and_are_significant(design):
    x, h = design
    result = stepwise_select(x, h, 12, permutations=200, seed=0)
    assert set(result.genes[:10]) == SIGNAL
    assert all(p < 0.01 for p in result.pvalues[:10])
    assert result.pvalues[10] > 0.05
    assert {result.latents[result.genes.index(g)] for g in range(5)} == {0}
    assert {result.latents[result.genes.index(g)] for g in range(5, 10)} == {1}


def test_alpha_stops_at_the_first_noise_gene(design):
    x, h = design
    result = stepwise_select(x[:2000], h[:2000], 12, permutations=100, alpha=0.05, seed=1)
    assert result.stopped_early and result.stop_pvalue > 0.05
    assert set(result.genes) <= SIGNAL and len(result.genes) == len(result.pvalues) >= 6


def test_pvalue_does_not_depend_on_batching_or_workers(design):
    x, h = design
    problem = LogLinearProblem(x[:1500, 8:], h[:1500])  # genes 8, 9 and the noise genes
    runs = [step_test(problem, [1], 40, seed=3)]
    runs.append(permutation_test(lambda p: problem.null_max((1,), p), runs[0].observed, 1500, 40, batch_size=7,
                                 seed=3, n_jobs=2))
    for run in runs[1:]:
        np.testing.assert_array_equal(run.null, runs[0].null)  # bit-stable
        assert run.pvalue == runs[0].pvalue


def test_pvalues_equal_the_one_hot_formulation(design):
    """The CPU engine's null maxima equal, to float rounding, those of the one-hot product over all strata × latents
    (the torch backend, on torch's CPU device), and so do the p-values: at the first step, at a late step of many
    small strata, and at the first noise step, where p is not at its floor."""
    x, h = design
    fast = LogLinearProblem(x[:3000], h[:3000])
    one_hot = LogLinearProblem(x[:3000], h[:3000])
    one_hot._backend = loglinear._TorchCounts(one_hot.x, "cpu")
    for selected in ([], [0, 5, 1, 6, 2, 7], list(range(10))):
        run, reference = step_test(fast, selected, 60, seed=2), step_test(one_hot, selected, 60, seed=2)
        np.testing.assert_allclose(run.null, reference.null, rtol=1e-10)
        assert run.observed == pytest.approx(reference.observed, rel=1e-12)
        assert run.pvalue == reference.pvalue
    assert 0.05 < run.pvalue < 1 and fast.n_strata(selected) > 200


def test_null_is_the_maximum_over_candidates_and_latents():
    x, h = reference_design(seed=2, draws=1)
    noise_only = LogLinearProblem(x[:, 10:], h)
    test = step_test(noise_only, [], 99, seed=4)
    assert test.null.shape == (99,) and 0 < test.pvalue <= 1
    assert test.pvalue == (1 + (test.null >= test.observed).sum()) / 100
    assert test.pvalue > 0.05  # no signal among the noise genes


def test_early_stop_when_p_exceeds_alpha():
    x, h = reference_design(seed=5, draws=1)
    result = step_test(LogLinearProblem(x[:, 10:], h), [], 400, alpha=0.05, seed=0)
    assert result.stopped_early and result.pvalue > 0.05 and result.null.size < 400
    with pytest.raises(ScdgmError, match="backend"):
        step_test(LogLinearProblem(x, h), [], 10, backend="dask")


def test_selection_stability_favours_signal_genes():
    x, h = reference_design(seed=6, draws=1)
    frequency = selection_stability(x, h, n_genes=4, n_boot=8, seed=0)
    assert frequency.shape == (30,) and frequency.sum() == pytest.approx(4)
    assert frequency[10:].max() == 0 and frequency[:10].max() > 0.5


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_backend_gives_the_threads_result(ray_cluster):
    x, h = reference_design(seed=7, draws=1)
    problem = LogLinearProblem(x, h)
    local = step_test(problem, [0], 30, seed=1)
    remote = step_test(problem, [0], 30, seed=1, backend="ray", n_jobs=2)
    np.testing.assert_allclose(remote.null, local.null, rtol=1e-12)
    assert remote.pvalue == local.pvalue
