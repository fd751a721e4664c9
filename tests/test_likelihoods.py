"""Count likelihoods against scipy.stats (float64, 1e-6), the fused NB against the plain one (values and
gradients, whole and other counts, counts beyond the table's cap), sampler moments, dispersion per gene-batch,
the library-size prior and the Gaussian KL."""
import numpy as np
import pytest
import torch
from scipy import stats

from scdgm.errors import ScdgmError
from scdgm.models.likelihoods import (
    TABLE_SLOTS,
    CountLikelihood,
    LibraryPrior,
    gaussian_kl,
    log_nb,
    log_normal_density,
    log_poisson,
    log_zinb,
    nb_log_prob,
    nb_log_prob_from_logits,
    sample_nb,
    sample_poisson,
    sample_zinb,
)

X = np.array([0, 0, 1, 3, 7, 40, 150, 0, 2, 1000], dtype=np.float64)
MU = np.array([1e-6, 2.5, 0.3, 3.0, 50.0, 35.0, 160.0, 1e3, 1e-3, 900.0])
THETA = np.array([0.5, 1e-3, 2.0, 1e4, 0.1, 30.0, 5.0, 1.0, 8.0, 2e3])
LOGITS = np.array([-3.0, 0.0, 2.0, -20.0, 15.0, 1.0, -1.0, 5.0, 0.5, -8.0])


def t(values: np.ndarray) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_nb_matches_scipy():
    expected = stats.nbinom.logpmf(X, THETA, THETA / (THETA + MU))
    got = log_nb(t(X), t(np.log(MU)), t(np.log(THETA))).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_zinb_matches_scipy():
    pi = 1 / (1 + np.exp(-LOGITS))
    nb = stats.nbinom.pmf(X, THETA, THETA / (THETA + MU))
    log_nb_pmf = stats.nbinom.logpmf(X, THETA, THETA / (THETA + MU))
    expected = np.where(X == 0, np.log(pi + (1 - pi) * nb), np.log1p(-pi) + log_nb_pmf)
    got = log_zinb(t(X), t(np.log(MU)), t(np.log(THETA)), t(LOGITS)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_zinb_is_stable_for_extreme_logits():
    x = t(np.array([0.0, 0.0, 5.0]))
    got = log_zinb(x, t(np.log([3.0, 3.0, 3.0])), t(np.log([2.0, 2.0, 2.0])), t(np.array([80.0, -80.0, -80.0])))
    assert torch.isfinite(got).all()
    assert got[0].item() == pytest.approx(0.0, abs=1e-12)  # certain inflated zero


def test_poisson_matches_scipy():
    got = log_poisson(t(X), t(np.log(MU))).numpy()
    np.testing.assert_allclose(got, stats.poisson.logpmf(X, MU), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("integer", "whole"), [(True, True), (True, None), (True, False), (False, None), (False, False)])
def test_fused_nb_equals_plain_nb_per_cell(integer, whole):
    """Whole counts read per-gene tables (told so, or found so when `whole` is None), others use lgamma; a
    count far above the rest (500) widens only its gene's table."""
    generator = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.rand(6, 40, generator=generator, dtype=torch.float64) * 20)
    x[0, :3] = torch.tensor([0.0, 1.0, 500.0], dtype=torch.float64)
    if not integer:
        x = x + 0.25
    log_mu = torch.randn(6, 40, generator=generator, dtype=torch.float64) * 2
    log_theta = torch.randn(1, 40, generator=generator, dtype=torch.float64)
    expected = log_nb(x, log_mu, log_theta).sum(-1)
    torch.testing.assert_close(nb_log_prob(x, log_mu, log_theta, whole=whole), expected, rtol=1e-10, atol=1e-9)


def test_fused_nb_beyond_the_table_cap_values_and_gradients():
    """Counts whose tables would pass TABLE_SLOTS are capped; those above the cap are exact one by one, with
    the same values and gradients as autograd through the plain NB."""
    generator = torch.Generator().manual_seed(2)
    x = torch.poisson(torch.rand(5, 8, generator=generator, dtype=torch.float64) * 30)
    x[1, 3], x[4, 6] = TABLE_SLOTS, TABLE_SLOTS // 2  # together more slots than the table holds
    log_mu = torch.randn(5, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    log_theta = torch.randn(1, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    fused = nb_log_prob(x, log_mu, log_theta, whole=True)
    plain = log_nb(x, log_mu, log_theta).sum(-1)
    torch.testing.assert_close(fused, plain, rtol=1e-9, atol=1e-8)
    weights = torch.randn(5, generator=generator, dtype=torch.float64)
    fused_grads = torch.autograd.grad((fused * weights).sum(), (log_mu, log_theta))
    plain_grads = torch.autograd.grad((plain * weights).sum(), (log_mu, log_theta))
    for got, expected in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-7)


def test_fused_nb_gradients_with_and_without_groups():
    generator = torch.Generator().manual_seed(1)
    x = torch.poisson(torch.rand(5, 7, generator=generator, dtype=torch.float64) * 30)
    x[0, 0] = 90.0
    log_mu = torch.randn(5, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    shared = torch.randn(1, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    grouped = torch.randn(3, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    rows = torch.tensor([0, 2, 2, 1, 0])
    assert torch.autograd.gradcheck(lambda m, th: nb_log_prob(x, m, th), (log_mu, shared))
    assert torch.autograd.gradcheck(lambda m, th: nb_log_prob(x, m, th, rows), (log_mu, grouped))


def test_nb_from_logits_equals_nb_of_log_softmax_with_gradients():
    """The training path (softmax fused into the NB, gamma terms apart) gives the values and the gradients in
    the logits, the log library and log theta of `nb_log_prob` on log_softmax(logits) + log library."""
    generator = torch.Generator().manual_seed(3)
    x = torch.poisson(torch.rand(6, 30, generator=generator, dtype=torch.float64) * 8)
    x[2, 4] = 300.0
    logits = torch.randn(6, 30, generator=generator, dtype=torch.float64).mul_(3).requires_grad_()
    log_library = torch.randn(6, generator=generator, dtype=torch.float64).add_(6).requires_grad_()
    log_theta = torch.randn(1, 30, generator=generator, dtype=torch.float64, requires_grad=True)
    inputs = (logits, log_library, log_theta)
    fused = nb_log_prob_from_logits(x, *inputs)
    plain = log_nb(x, torch.log_softmax(logits, -1) + log_library[:, None], log_theta).sum(-1)
    torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-8)
    weights = torch.randn(6, generator=generator, dtype=torch.float64)
    fused_grads = torch.autograd.grad((fused * weights).sum(), inputs)
    plain_grads = torch.autograd.grad((plain * weights).sum(), inputs)
    for got, expected in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8)
    likelihood = CountLikelihood("nb", 30)
    with torch.no_grad():
        likelihood.log_theta.copy_(log_theta)
        log_mu = torch.log_softmax(logits, -1) + log_library[:, None]
        for whole in (True, None):  # fused only when known whole; else log_prob on log_softmax + log library
            got = likelihood.log_prob_from_logits(x.float(), logits.float(), log_library.float(), whole=whole)
            torch.testing.assert_close(got, likelihood.log_prob(x.float(), log_mu.float()), rtol=1e-5, atol=1e-3)


def _moments(draws: torch.Tensor) -> tuple[float, float]:
    return draws.mean().item(), draws.var().item()


def test_samplers_have_the_right_moments():
    torch.manual_seed(0)
    n, mu, theta = 200_000, 6.0, 2.0
    log_mu = torch.full((n,), np.log(mu))
    mean, var = _moments(sample_nb(log_mu, torch.tensor(np.log(theta), dtype=torch.float32)))
    assert mean == pytest.approx(mu, rel=0.02) and var == pytest.approx(mu + mu**2 / theta, rel=0.05)
    mean, var = _moments(sample_poisson(log_mu))
    assert mean == pytest.approx(mu, rel=0.02) and var == pytest.approx(mu, rel=0.05)
    draws = sample_zinb(log_mu, torch.tensor(np.log(theta), dtype=torch.float32), torch.zeros(n))
    zero = 0.5 + 0.5 * (theta / (theta + mu)) ** theta
    assert (draws == 0).float().mean().item() == pytest.approx(zero, abs=0.01)
    assert draws.mean().item() == pytest.approx(0.5 * mu, rel=0.03)


def test_count_likelihood_mean_dispersion_and_choices():
    x = torch.tensor([[0.0, 3.0], [1.0, 0.0], [4.0, 2.0]])
    log_mu = torch.log(torch.tensor([[1.0, 2.0], [0.5, 1.0], [3.0, 2.0]]))
    nb = CountLikelihood("nb", 2)
    torch.testing.assert_close(nb.log_prob(x, log_mu), log_nb(x, log_mu, torch.zeros(1, 2)).sum(-1))
    grouped = CountLikelihood("nb", 2, n_batches=2, dispersion="gene-batch")
    with torch.no_grad():
        grouped.log_theta.copy_(torch.tensor([[0.0, 0.0], [1.0, -1.0]]))
    batch = torch.tensor([1, 0, 1])
    expected = log_nb(x, log_mu, grouped.log_theta[batch]).sum(-1)
    torch.testing.assert_close(grouped.log_prob(x, log_mu, batch_index=batch), expected)
    zinb = CountLikelihood("zinb", 2)
    torch.testing.assert_close(zinb.mean(log_mu, torch.zeros(3, 2)), 0.5 * log_mu.exp())
    with pytest.raises(ScdgmError, match="likelihood must be one of"):
        CountLikelihood("gaussian", 2)
    with pytest.raises(ScdgmError, match="needs a batch covariate"):
        CountLikelihood("nb", 2, dispersion="gene-batch")


def test_library_prior_fits_each_batch_and_samples_its_frequencies():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 3, 3000)
    log_library = rng.normal(6 + codes, 0.2 + 0.1 * codes)
    prior = LibraryPrior(3)
    prior.fit(torch.tensor(log_library, dtype=torch.float32), torch.tensor(codes))
    for b in range(3):
        assert prior.mean[b].item() == pytest.approx(log_library[codes == b].mean(), abs=1e-4)
        assert prior.var[b].item() == pytest.approx(log_library[codes == b].var(), rel=1e-3)
    torch.manual_seed(0)
    sampled, batch = prior.sample(6000)
    assert np.bincount(batch.numpy(), minlength=3) / 6000 == pytest.approx(np.bincount(codes) / 3000, abs=0.03)
    assert sampled[batch == 2].mean().item() == pytest.approx(8.0, abs=0.05)


def test_gaussian_kl_and_density_match_torch_distributions():
    mean, var = torch.randn(4, 3, dtype=torch.float64), torch.rand(4, 3, dtype=torch.float64) + 0.1
    prior_mean, prior_var = torch.randn(4, 3, dtype=torch.float64), torch.rand(4, 3, dtype=torch.float64) + 0.1
    q = torch.distributions.Normal(mean, var.sqrt())
    p = torch.distributions.Normal(prior_mean, prior_var.sqrt())
    expected = torch.distributions.kl_divergence(q, p).sum(-1)
    torch.testing.assert_close(gaussian_kl(mean, var, prior_mean, prior_var), expected)
    standard = torch.distributions.Normal(0.0, 1.0)
    torch.testing.assert_close(gaussian_kl(mean, var), torch.distributions.kl_divergence(q, standard).sum(-1))
    torch.testing.assert_close(log_normal_density(mean, prior_mean, prior_var), p.log_prob(mean).sum(-1))
