"""Count likelihoods of the decoders (NB, ZINB, Poisson) with their samplers, the learned gene-wise dispersion,
and the per-batch log-normal model of library size that the count models share.

Everything works in log space: a decoder produces the log mean `log_mu` (log softmax proportions plus log
library) and the dispersion is stored as `log_theta` (NB inverse dispersion: Var = mu + mu^2 / theta), so
log(theta + mu) is a stable logaddexp and no epsilon is needed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from scdgm.errors import ScdgmError

LIKELIHOODS = ("nb", "zinb", "poisson")
DISPERSIONS = ("gene", "gene-batch")


def log_nb(x: torch.Tensor, log_mu: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """Elementwise log NB(x; mean mu, inverse dispersion theta), from log mu and log theta."""
    theta = log_theta.exp()
    log_theta_mu = torch.logaddexp(log_theta, log_mu)
    return (
        theta * (log_theta - log_theta_mu)
        + x * (log_mu - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1.0)
    )


TABLE_SLOTS = 1 << 18
"""Most slots of a count table (see `_CountTable`); beyond it, counts above a common cap are read one by one."""


@dataclass(frozen=True)
class _CountTable:
    """Where each (gene, whole count) pair of a batch sits in a flat per-gene table: gene g's counts
    0..min(max_g, cap) occupy consecutive slots from `start[g]`, genes one after the other (max_g: the gene's
    largest count in the batch; about 8 slots per gene on PBMC 3k at 128 cells)."""

    start: torch.Tensor
    """(genes,) int32: the slot of each gene's count 0."""
    count: torch.Tensor
    """(slots,) the count k of each slot, in the counts' float dtype."""
    gene: torch.Tensor
    """(slots,) int64: the gene of each slot."""
    first: torch.Tensor
    """(slots,) int64: the first slot of each slot's gene."""
    cap: int | None
    """Counts above `cap` have no slot (None: every count has one)."""

    @classmethod
    def of(cls, x: torch.Tensor) -> _CountTable:
        """The table of whole counts x (cells x genes), at most TABLE_SLOTS slots (or one per gene): the cap,
        when one is needed, is the largest that fits."""
        maxima = x.amax(0).cpu().numpy().astype(np.int64)
        cap = None
        if int(maxima.sum()) + maxima.size > TABLE_SLOTS:
            low, high = 0, int(maxima.max())  # the largest c with sum(min(maxima, c) + 1) <= TABLE_SLOTS
            while low < high:
                middle = (low + high + 1) // 2
                fits = int(np.minimum(maxima, middle).sum()) + maxima.size <= TABLE_SLOTS
                low, high = (middle, high) if fits else (low, middle - 1)
            cap = low
            maxima = np.minimum(maxima, cap)
        widths = maxima + 1
        start = np.cumsum(widths) - widths
        gene = np.repeat(np.arange(maxima.size), widths)
        first = start[gene]
        return cls(
            start=torch.from_numpy(start.astype(np.int32)).to(x.device),
            count=torch.from_numpy(np.arange(gene.size) - first).to(x.device, x.dtype),
            gene=torch.from_numpy(gene).to(x.device),
            first=torch.from_numpy(first).to(x.device),
            cap=cap,
        )


class _NBLogProb(torch.autograd.Function):
    """Per-cell NB log-likelihood with hand-written gradients: the training hot path.

    With d = log mu - log theta, log NB = x d - (theta + x) softplus(d) + [lgamma(x + theta) - lgamma(theta)
    - lgamma(x + 1)]. For whole counts the bracket and its theta-derivative psi(x + theta) - psi(theta) are sums
    over j < x of log(theta + j) - log(j + 1) and 1 / (theta + j): per-gene tables over the counts the batch has
    (`_CountTable`), read with one gather per entry, instead of lgamma/digamma on every entry (the slowest
    kernels on CPU). Other counts use lgamma.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, log_mu: torch.Tensor, log_theta: torch.Tensor, rows: torch.Tensor | None, whole: bool
    ) -> torch.Tensor:
        lt = log_theta if rows is None else log_theta.index_select(0, rows)
        theta = lt.exp()
        d = log_mu - lt
        sp = F.softplus(d)
        tx = x + theta
        needs_theta = ctx.needs_input_grad[2]
        gamma_terms, digamma_terms = _gamma_terms(x, log_theta, rows, whole, needs_theta)
        # x d - (x + theta) softplus(d) + gamma terms, summed per cell: three passes (each is one parallel region
        # on CPU, which costs more than the arithmetic when threads sleep between them)
        value = torch.addcmul(gamma_terms, x, d).addcmul_(tx, sp, value=-1.0).sum(-1)
        if ctx.needs_input_grad[1] or needs_theta:
            grad_d = torch.addcmul(x, tx, torch.sigmoid(d), value=-1.0)  # x - (x + theta) mu / (theta + mu)
            ctx.save_for_backward(grad_d, sp if needs_theta else None, theta, digamma_terms, rows)
            ctx.n_rows = log_theta.shape[0]
        return value

    @staticmethod
    def backward(ctx: Any, grad_value: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_d, sp, theta, digamma_terms, rows = ctx.saved_tensors
        grad_mu = grad_d * grad_value[:, None] if ctx.needs_input_grad[1] else None
        grad_theta = None
        if ctx.needs_input_grad[2]:  # d/d log theta of each entry: theta (psi terms - softplus(d)) - grad_d
            if rows is None:  # summed over cells as products with grad_value: no (cells, genes) temporary
                grad_theta = theta * (grad_value @ digamma_terms - grad_value @ sp) - grad_value @ grad_d
            else:
                per_entry = theta * (digamma_terms - sp) - grad_d
                grad_theta = torch.zeros(ctx.n_rows, per_entry.shape[1], dtype=per_entry.dtype, device=per_entry.device)
                grad_theta.index_add_(0, rows, per_entry * grad_value[:, None])
        return None, grad_mu, grad_theta, None, None


def _slot_rows(matrix: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """matrix[index] of a (n, groups) matrix as one gather over its flat values (on CPU, selecting rows of a
    narrow matrix costs several times a flat gather)."""
    groups = matrix.shape[1]
    if groups > 1:
        index = (index[:, None] * groups + torch.arange(groups, device=index.device)).view(-1)
    return matrix.reshape(-1).index_select(0, index).view(-1, groups)


def _earlier_sums(steps: torch.Tensor, table: _CountTable) -> torch.Tensor:
    """For every slot of `table` (rows of `steps`), the sum of `steps` over the earlier slots of its gene: one
    running sum over all slots in float64, less its value at each gene's first slot."""
    running = steps.double().cumsum(0) - steps
    return (running - _slot_rows(running, table.first)).to(steps.dtype)


def _gamma_terms(
    x: torch.Tensor, log_theta: torch.Tensor, rows: torch.Tensor | None, whole: bool, with_digamma: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """lgamma(x + theta) - lgamma(theta) - lgamma(x + 1) and psi(x + theta) - psi(theta) for every entry: from
    per-gene tables when the counts are whole, else with lgamma/digamma."""
    theta_rows = log_theta.exp()
    if not whole:
        theta = theta_rows if rows is None else theta_rows.index_select(0, rows)
        shifted = x + theta
        terms = torch.lgamma(shifted) - torch.lgamma(theta) - torch.lgamma(x + 1.0)
        return terms, (torch.digamma(shifted) - torch.digamma(theta) if with_digamma else None)
    table = _CountTable.of(x)
    groups = theta_rows.shape[0]
    count = table.count[:, None]
    shifted = _slot_rows(theta_rows.T, table.gene) + count  # (slots, groups): theta + k
    index = x.to(torch.int32)
    if table.cap is not None:
        index.clamp_(max=table.cap)
    index += table.start
    if rows is not None:
        index = index * groups + rows.to(torch.int32)[:, None]
    index = index.view(-1)
    gamma_table = _earlier_sums(torch.log(shifted) - torch.log1p(count), table)
    terms = gamma_table.view(-1).index_select(0, index).view_as(x)
    digamma_terms = None
    if with_digamma:
        digamma_terms = _earlier_sums(shifted.reciprocal(), table).view(-1).index_select(0, index).view_as(x)
    if table.cap is not None:  # counts above the cap: exact, one by one
        cell, gene = (x > table.cap).nonzero(as_tuple=True)
        k = x[cell, gene]
        t = theta_rows[0 if rows is None else rows[cell], gene]
        terms.index_put_((cell, gene), torch.lgamma(k + t) - torch.lgamma(t) - torch.lgamma(k + 1.0))
        if with_digamma:
            digamma_terms.index_put_((cell, gene), torch.digamma(k + t) - torch.digamma(t))
    return terms, digamma_terms


class _GammaSums(torch.autograd.Function):
    """Per-cell sum over genes of lgamma(x + theta) - lgamma(theta) - lgamma(x + 1) for whole counts x and one
    theta per gene, from the per-gene tables of `_gamma_terms`, with its theta gradient."""

    @staticmethod
    def forward(ctx: Any, log_theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        terms, digamma_terms = _gamma_terms(x, log_theta, None, True, ctx.needs_input_grad[0])
        ctx.save_for_backward(log_theta, digamma_terms)
        return terms.sum(-1)

    @staticmethod
    def backward(ctx: Any, grad_value: torch.Tensor) -> tuple[torch.Tensor, None]:
        log_theta, digamma_terms = ctx.saved_tensors
        return log_theta.exp() * (grad_value @ digamma_terms), None


class _NBFromLogits(torch.autograd.Function):
    """Per-cell NB log-likelihood without the gamma terms, from the decoder's logits: log mu = log softmax(logits)
    + log library, fused with its gradient.

    With p = softmax(logits), mu = p library and e = mu / theta = exp(d): softplus(d) = log1p(e) and the
    gradient in d, x - (x + theta) sigmoid(d), is (x - mu) / (1 + e); the sum of x d over genes is
    x.logits - total (logsumexp - log library) - x.log theta. So the pass over (cells, genes) takes one softmax
    and one log1p (no softplus, sigmoid or log softmax backward), and the softmax backward is one product."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, logits: torch.Tensor, log_library: torch.Tensor, log_theta: torch.Tensor
    ) -> torch.Tensor:
        p = torch.softmax(logits, -1)
        lse = logits.amax(-1) - p.amax(-1).log()  # logsumexp, from the largest share (at least 1 / genes)
        mu = p * log_library.exp()[:, None]
        e = mu * torch.exp(-log_theta)
        sp = torch.log1p(e)  # softplus(log mu - log theta)
        grad_d = (x - mu).div_(e.add_(1.0))
        total = x.sum(-1)
        theta = log_theta[0].exp()
        value = torch.linalg.vecdot(x, logits - sp) + total * (log_library - lse) - x @ log_theta[0] - sp @ theta
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            row_sums = grad_d.sum(-1)
            grad_logits = torch.addcmul(grad_d, p, row_sums[:, None], value=-1.0)  # softmax backward
            ctx.save_for_backward(grad_logits, grad_d, sp, theta, row_sums)
        return value

    @staticmethod
    def backward(ctx: Any, grad_value: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_logits, grad_d, sp, theta, row_sums = ctx.saved_tensors
        grad_log_theta = None
        if ctx.needs_input_grad[3]:  # d/d log theta: -theta softplus(d) - grad_d, weighted by grad_value
            grad_log_theta = -(theta * (grad_value @ sp) + grad_value @ grad_d)[None]
        grad_library = grad_value * row_sums if ctx.needs_input_grad[2] else None
        grad_logits = grad_logits * grad_value[:, None] if ctx.needs_input_grad[1] else None
        return None, grad_logits, grad_library, grad_log_theta


def nb_log_prob_from_logits(
    x: torch.Tensor, logits: torch.Tensor, log_library: torch.Tensor, log_theta: torch.Tensor
) -> torch.Tensor:
    """Per-cell NB log-likelihood of whole counts x with log mu = log_softmax(logits) + log_library and one
    log theta per gene ((1, genes)): `nb_log_prob(x, log_softmax(logits) + log_library[:, None], log_theta)`
    up to rounding, in fewer passes over (cells, genes)."""
    return _NBFromLogits.apply(x, logits, log_library, log_theta) + _GammaSums.apply(log_theta, x)


def nb_log_prob(
    x: torch.Tensor,
    log_mu: torch.Tensor,
    log_theta: torch.Tensor,
    rows: torch.Tensor | None = None,
    whole: bool | None = None,
) -> torch.Tensor:
    """Per-cell NB log-likelihood (summed over genes) with fused gradients; equals `log_nb(...).sum(-1)`.

    `log_theta` is (1, genes), or (groups, genes) with `rows` giving each cell's group (gene-batch dispersion).
    `whole`: whether every count is a whole number, if known (`Batch.whole`); None checks x.
    """
    if whole is None:
        whole = torch.equal(x, x.floor())
    return _NBLogProb.apply(x, log_mu, log_theta, rows, whole)


def log_zinb(x: torch.Tensor, log_mu: torch.Tensor, log_theta: torch.Tensor, zi_logits: torch.Tensor) -> torch.Tensor:
    """Elementwise log ZINB: NB mixed with a point mass at zero of probability sigmoid(zi_logits).

    At x = 0 the NB term is theta * log(theta / (theta + mu)), so the zero case is a logaddexp of
    log pi = -softplus(-logits) and log(1 - pi) + log NB(0) with log(1 - pi) = -softplus(logits).
    """
    log_not_zero_inflated = -F.softplus(zi_logits)
    nb = log_nb(x, log_mu, log_theta) + log_not_zero_inflated
    zero = torch.logaddexp(-F.softplus(-zi_logits), nb)
    return torch.where(x == 0, zero, nb)


def log_poisson(x: torch.Tensor, log_mu: torch.Tensor) -> torch.Tensor:
    """Elementwise log Poisson(x; rate mu), from log mu."""
    return x * log_mu - log_mu.exp() - torch.lgamma(x + 1.0)


def sample_poisson(log_mu: torch.Tensor) -> torch.Tensor:
    """Poisson draws with rate exp(log_mu)."""
    return torch.poisson(log_mu.exp())


def sample_nb(log_mu: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """NB draws as a Gamma–Poisson mixture: rate ~ Gamma(shape theta, mean mu), counts ~ Poisson(rate)."""
    theta = log_theta.exp().expand_as(log_mu)
    rate = torch.distributions.Gamma(theta, torch.ones_like(theta)).sample() * (log_mu - log_theta).exp()
    return torch.poisson(rate)


def sample_zinb(log_mu: torch.Tensor, log_theta: torch.Tensor, zi_logits: torch.Tensor) -> torch.Tensor:
    """ZINB draws: NB draws set to zero with probability sigmoid(zi_logits)."""
    counts = sample_nb(log_mu, log_theta)
    return torch.where(torch.bernoulli(torch.sigmoid(zi_logits)).bool(), torch.zeros_like(counts), counts)


class CountLikelihood(nn.Module):
    """A count likelihood with its learned dispersion: per gene, or per gene and batch ('gene-batch').

    `log_prob` sums over genes (one value per cell); `mean` and `sample` give the expected and drawn
    counts. For ZINB the decoder supplies per-cell zero-inflation logits.
    """

    def __init__(self, name: str, n_genes: int, n_batches: int = 0, dispersion: str = "gene") -> None:
        super().__init__()
        if name not in LIKELIHOODS:
            raise ScdgmError(f"likelihood must be one of {', '.join(LIKELIHOODS)}, got {name!r}")
        if dispersion not in DISPERSIONS:
            raise ScdgmError(f"dispersion must be one of {', '.join(DISPERSIONS)}, got {dispersion!r}")
        if dispersion == "gene-batch" and n_batches == 0:
            raise ScdgmError("dispersion='gene-batch' needs a batch covariate (batch_key)")
        self.name = name
        self.per_batch = dispersion == "gene-batch"
        if name != "poisson":
            self.log_theta = nn.Parameter(torch.zeros(n_batches if self.per_batch else 1, n_genes))

    @property
    def zero_inflated(self) -> bool:
        """Whether the decoder must supply zero-inflation logits."""
        return self.name == "zinb"

    def dispersion(self, batch_index: torch.Tensor | None) -> torch.Tensor:
        """log theta broadcastable against (cells, genes): one row, or each cell's batch row."""
        if self.per_batch:
            if batch_index is None:
                raise ScdgmError("gene-batch dispersion needs each cell's batch")
            return self.log_theta.index_select(0, batch_index)
        return self.log_theta

    def log_prob(
        self,
        x: torch.Tensor,
        log_mu: torch.Tensor,
        zi_logits: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
        whole: bool | None = None,
    ) -> torch.Tensor:
        """Log-likelihood of each cell's counts (summed over genes); `whole`: whether all counts are whole numbers,
        if known (`Batch.whole`)."""
        if self.name == "poisson":
            return log_poisson(x, log_mu).sum(-1)
        if self.name == "zinb":
            return log_zinb(x, log_mu, self.dispersion(batch_index), zi_logits).sum(-1)
        return nb_log_prob(x, log_mu, self.log_theta, batch_index if self.per_batch else None, whole)

    def log_prob_from_logits(
        self,
        x: torch.Tensor,
        logits: torch.Tensor,
        log_library: torch.Tensor,
        zi_logits: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
        whole: bool | None = None,
    ) -> torch.Tensor:
        """`log_prob` with log mu = log_softmax(logits) + log_library: fused (`nb_log_prob_from_logits`) for NB
        with one dispersion per gene when the counts are known to be whole, else through `log_prob`."""
        if self.name == "nb" and not self.per_batch and whole:
            return nb_log_prob_from_logits(x, logits, log_library, self.log_theta)
        log_mu = F.log_softmax(logits, dim=-1) + log_library[:, None]
        return self.log_prob(x, log_mu, zi_logits, batch_index, whole)

    def mean(self, log_mu: torch.Tensor, zi_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Expected counts: mu, times the probability of not being an inflated zero for ZINB."""
        if self.name == "zinb":
            return torch.exp(log_mu - F.softplus(zi_logits))
        return log_mu.exp()

    def sample(
        self,
        log_mu: torch.Tensor,
        zi_logits: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Counts drawn from the likelihood."""
        if self.name == "poisson":
            return sample_poisson(log_mu)
        log_theta = self.dispersion(batch_index)
        if self.name == "zinb":
            return sample_zinb(log_mu, log_theta, zi_logits)
        return sample_nb(log_mu, log_theta)


class LibraryPrior(nn.Module):
    """Log-normal model of library size per batch, fitted to the training cells (buffers, saved with the model).

    Serves as the prior of a learned log library (scVI) and as the source of library sizes for prior samples;
    the batch of a prior sample is drawn with the training cells' batch frequencies.
    """

    def __init__(self, n_batches: int) -> None:
        super().__init__()
        groups = max(n_batches, 1)
        self.n_batches = n_batches
        self.register_buffer("mean", torch.zeros(groups))
        self.register_buffer("var", torch.ones(groups))
        self.register_buffer("weight", torch.full((groups,), 1.0 / groups))

    def fit(self, log_library: torch.Tensor, batch_index: torch.Tensor | None) -> None:
        """Set mean, variance and frequency of log library size per batch from the training cells."""
        codes = torch.zeros_like(log_library, dtype=torch.long) if batch_index is None else batch_index
        groups = self.mean.numel()
        count = torch.bincount(codes, minlength=groups).to(log_library.dtype)
        total = torch.zeros(groups, dtype=log_library.dtype, device=log_library.device)
        mean = total.index_add(0, codes, log_library) / count.clamp_min(1)
        square = total.index_add(0, codes, (log_library - mean[codes]) ** 2) / count.clamp_min(1)
        overall = log_library.mean()
        self.mean.copy_(torch.where(count > 0, mean, overall))
        self.var.copy_(torch.where(count > 1, square, log_library.var(unbiased=False)).clamp_min(1e-4))
        self.weight.copy_(count / count.sum())

    def parameters_for(self, batch_index: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prior mean and variance of log library for `n` cells of the given batches."""
        if batch_index is None:
            return self.mean[0].expand(n), self.var[0].expand(n)
        return self.mean[batch_index], self.var[batch_index]

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log library sizes and batch codes (None without batches) of `n` synthetic cells."""
        batch_index = torch.multinomial(self.weight, n, replacement=True) if self.n_batches else None
        mean, var = self.parameters_for(batch_index, n)
        return mean + var.sqrt() * torch.randn_like(mean), batch_index


def gaussian_kl(
    mean: torch.Tensor, var: torch.Tensor, prior_mean: torch.Tensor | float = 0.0, prior_var: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """KL(N(mean, var) || N(prior_mean, prior_var)) of diagonal Gaussians, summed over the last dimension."""
    prior_var = torch.as_tensor(prior_var, dtype=mean.dtype, device=mean.device)
    return 0.5 * ((var + (mean - prior_mean) ** 2) / prior_var - 1.0 + torch.log(prior_var) - torch.log(var)).sum(-1)


def log_normal_density(
    x: torch.Tensor, mean: torch.Tensor | float = 0.0, var: torch.Tensor | float = 1.0
) -> torch.Tensor:
    """log N(x; mean, var) of a diagonal Gaussian, summed over the last dimension."""
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    return -0.5 * (math.log(2 * math.pi) + torch.log(var) + (x - mean) ** 2 / var).sum(-1)
