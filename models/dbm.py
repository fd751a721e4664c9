"""Deep Boltzmann machine (Salakhutdinov & Hinton 2009) on binarised expression: visible units v (gene
detected, x > threshold), two binary hidden layers h1, h2, energy E = −vᵀW1h1 − h1ᵀW2h2 − bᵀv − c1ᵀh1 − c2ᵀh2.

Training: persistent contrastive divergence. Data-dependent expectations come from mean-field inference
q(h1, h2 | v); model expectations from `n_chains` persistent block-Gibbs chains (`gibbs_steps` sweeps per
update; their v and h2 enter as probabilities given the chain's h1, which lowers the variance). The gradient
is expressed as the surrogate loss mean E(v, μ1, μ2) − mean E(chain states) (states detached), so the shared
loop's `ctx.optimize` backpropagates, clips and steps it. Optional greedy pre-training: `pretrain_epochs`
epochs of CD-1 on the first RBM (v, h1), then as many on the second (mean-field h1 of the data, h2); they
count towards max_epochs and patience. Reported per epoch: train_loss (pseudo-NLL estimated from one random
gene per cell), train_energy_gap (the surrogate) or train_pretrain_gap, train_reconstruction (BCE of v under
its mean-field reconstruction); validation_loss (exact pseudo-NLL, the early-stopping metric) and
validation_reconstruction.

Latent (documented choice): both hidden layers concatenated, [h1, h2]; `embed` gives the mean-field
probabilities and p(1 − p) as variance, samples carry the binary states [h1, h2] that produced them.
Held-out pseudo-log-likelihood: exact over every visible unit, with h1 summed out analytically and h2 held at
its mean-field probabilities (an approximation — the exact conditional would also sum over h2).
"""
from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
import torch
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits, softplus

from scdgm.models.base import check_at_least, check_non_negative, check_positive, require
from scdgm.models.data import Batch, Counts, count_chunks, model_counts
from scdgm.models.torch_model import TorchModel, TrainConfig
from scdgm.models.training import StepContext

PLL_CHUNK = 2**24  # cells × genes × hidden units evaluated at once by the exact pseudo-likelihood


@dataclass
class DBMConfig(TrainConfig):
    """Hyperparameters of the deep Boltzmann machine (lr, epochs, batch size... from TrainConfig)."""

    n_hidden1: int = 128
    n_hidden2: int = 32
    threshold: float = 0.0
    """A gene is 'on' in a cell when its count exceeds this."""
    mean_field_steps: int = 10
    gibbs_steps: int = 5
    """Block-Gibbs sweeps of the persistent chains per parameter update."""
    n_chains: int = 500
    pretrain_epochs: int = 0
    """Epochs of greedy CD-1 pre-training per RBM (0: none), run before the joint PCD epochs."""
    posterior_steps: int = 1
    """Gibbs sweeps of a posterior draw: hidden states drawn from the cell's mean-field posterior, then
    `posterior_steps − 1` free sweeps, then the visible units."""
    burn_in: int = 500
    """Gibbs sweeps from random states before a prior draw is taken."""
    init_scale: float = 0.1
    batch_size: int = 32
    max_epochs: int = 400
    patience: int = 30

    def check(self) -> None:
        super().check()
        require(self.batch_key is None, "dbm: batch covariates are not modelled; leave batch_key unset")
        check_at_least(1, n_hidden1=self.n_hidden1, n_hidden2=self.n_hidden2, mean_field_steps=self.mean_field_steps,
                       gibbs_steps=self.gibbs_steps, n_chains=self.n_chains, posterior_steps=self.posterior_steps)
        check_at_least(0, pretrain_epochs=self.pretrain_epochs, burn_in=self.burn_in)
        check_non_negative(threshold=self.threshold)
        check_positive(init_scale=self.init_scale)


def bernoulli(p: torch.Tensor) -> torch.Tensor:
    """0/1 draws with success probabilities `p` (several times faster than torch.bernoulli on CPU)."""
    return (torch.rand_like(p) < p).to(p.dtype)


def rbm_free_energy(
    visible: torch.Tensor, weight: torch.Tensor, visible_bias: torch.Tensor, hidden_bias: torch.Tensor
) -> torch.Tensor:
    """Free energy of each visible row of a binary RBM (hidden units summed out)."""
    return -(visible @ visible_bias) - softplus(visible @ weight + hidden_bias).sum(1)


class DBMModule(nn.Module):
    """Weights, persistent chains and the inference, sampling and training steps of the DBM."""

    def __init__(self, n_genes: int, config: DBMConfig, visible_rate: torch.Tensor | None) -> None:
        super().__init__()
        self.config = config
        h1, h2 = config.n_hidden1, config.n_hidden2
        self.w1 = nn.Parameter(torch.randn(n_genes, h1) * config.init_scale)
        self.w2 = nn.Parameter(torch.randn(h1, h2) * config.init_scale)
        rate = visible_rate if visible_rate is not None else torch.full((n_genes,), 0.5)
        self.b = nn.Parameter(torch.logit(rate.clamp(1e-3, 1 - 1e-3)))
        self.c1 = nn.Parameter(torch.zeros(h1))
        self.c2 = nn.Parameter(torch.zeros(h2))
        self.register_buffer("chain_v", bernoulli(rate.expand(config.n_chains, -1).contiguous()))
        self.register_buffer("chain_h1", bernoulli(torch.full((config.n_chains, h1), 0.5)))
        self.register_buffer("chain_h2", bernoulli(torch.full((config.n_chains, h2), 0.5)))
        self.library_prior = None  # binary expression: library sizes are not modelled

    # --- conditionals ----------------------------------------------------------------------------------
    def binarise(self, x: torch.Tensor) -> torch.Tensor:
        return (x > self.config.threshold).to(x.dtype)

    def h1_logits(self, v: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        return v @ self.w1 + h2 @ self.w2.T + self.c1

    def v_logits(self, h1: torch.Tensor) -> torch.Tensor:
        return h1 @ self.w1.T + self.b

    def h2_logits(self, h1: torch.Tensor) -> torch.Tensor:
        return h1 @ self.w2 + self.c2

    def mean_field(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed-point mean-field posterior q(h1)q(h2) given v, started bottom-up."""
        mu1 = torch.sigmoid(v @ self.w1 + self.c1)
        mu2 = torch.sigmoid(self.h2_logits(mu1))
        for _ in range(self.config.mean_field_steps):
            mu1 = torch.sigmoid(self.h1_logits(v, mu2))
            mu2 = torch.sigmoid(self.h2_logits(mu1))
        return mu1, mu2

    def gibbs_sweep(
        self, h1: torch.Tensor, h2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One block-Gibbs sweep: the even layers (v, h2) given h1, then h1 given them; returns (v, h1, h2)."""
        v = bernoulli(torch.sigmoid(self.v_logits(h1)))
        h2 = bernoulli(torch.sigmoid(self.h2_logits(h1)))
        h1 = bernoulli(torch.sigmoid(self.h1_logits(v, h2)))
        return v, h1, h2

    def energy(self, v: torch.Tensor, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        """Energy of each row's joint state (states may be mean-field probabilities)."""
        return -(
            ((v @ self.w1) * h1).sum(1) + ((h1 @ self.w2) * h2).sum(1) + v @ self.b + h1 @ self.c1 + h2 @ self.c2
        )

    # --- pseudo-likelihood -----------------------------------------------------------------------------
    def pseudo_nll(self, v: torch.Tensor, exact: bool = True) -> torch.Tensor:
        """Per-cell −Σ_i log p(v_i | v_−i) with h1 summed out and h2 at its mean-field value.

        Flipping v_i changes the free energy F(v) = −bᵀv − Σ_j softplus(c1 + vW1 + h2W2ᵀ)_j by a closed form.
        `exact` sums over all genes (in chunks); otherwise one random gene per cell, scaled by the gene count.
        """
        _, mu2 = self.mean_field(v)
        pre = self.h1_logits(v, mu2)
        sign = 1.0 - 2.0 * v
        base = softplus(pre).sum(1, keepdim=True)
        n_genes = v.shape[1]
        if not exact:
            gene = torch.randint(n_genes, (v.shape[0],), device=v.device)
            s = sign.gather(1, gene[:, None])
            gain = s[:, 0] * self.b[gene] + softplus(pre + s * self.w1[gene]).sum(1) - base[:, 0]
            return softplus(gain) * n_genes
        step = max(1, PLL_CHUNK // max(v.shape[0] * pre.shape[1], 1))
        total = torch.zeros(v.shape[0], device=v.device)
        for start in range(0, n_genes, step):
            genes = slice(start, start + step)
            s = sign[:, genes]
            flipped = softplus(pre[:, None, :] + s[:, :, None] * self.w1[genes][None]).sum(2)
            total += softplus(s * self.b[genes] + flipped - base).sum(1)
        return total

    def reconstruction_bce(self, v: torch.Tensor, mu1: torch.Tensor) -> torch.Tensor:
        """Per-cell binary cross-entropy of v under its mean-field reconstruction."""
        return binary_cross_entropy_with_logits(self.v_logits(mu1), v, reduction="none").sum(1)

    # --- training ------------------------------------------------------------------------------------
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)]

    def _pretrain_loss(self, v: torch.Tensor, layer: int) -> torch.Tensor:
        """CD-1 surrogate of the RBM of `layer` (free energy of data minus that of its one-step reconstruction)."""
        if layer == 1:
            data, weight, visible_bias, hidden_bias = v, self.w1, self.b, self.c1
        else:
            with torch.no_grad():
                data = torch.sigmoid(v @ self.w1 + self.c1)
            weight, visible_bias, hidden_bias = self.w2, self.c1.detach(), self.c2
        with torch.no_grad():
            hidden = bernoulli(torch.sigmoid(data @ weight + hidden_bias))
            model = bernoulli(torch.sigmoid(hidden @ weight.T + visible_bias))
        gap = rbm_free_energy(data, weight, visible_bias, hidden_bias) - rbm_free_energy(
            model, weight, visible_bias, hidden_bias
        )
        return gap.mean()

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        v = self.binarise(batch.x)
        with torch.no_grad():
            mu1, mu2 = self.mean_field(v)
            logs = {"reconstruction": self.reconstruction_bce(v, mu1).mean().item()}
        pretrain = self.config.pretrain_epochs
        if ctx.epoch < 2 * pretrain:
            loss = self._pretrain_loss(v, 1 if ctx.epoch < pretrain else 2)
            logs["pretrain_gap"] = loss.item()
        else:
            with torch.no_grad():
                chain_v, chain_h1, chain_h2 = self.chain_v, self.chain_h1, self.chain_h2
                for _ in range(self.config.gibbs_steps):
                    chain_v, chain_h1, chain_h2 = self.gibbs_sweep(chain_h1, chain_h2)
                self.chain_v.copy_(chain_v)
                self.chain_h1.copy_(chain_h1)
                self.chain_h2.copy_(chain_h2)
                model_v, model_h2 = torch.sigmoid(self.v_logits(chain_h1)), torch.sigmoid(self.h2_logits(chain_h1))
            loss = self.energy(v, mu1, mu2).mean() - self.energy(model_v, chain_h1, model_h2).mean()
            logs["energy_gap"] = loss.item()
        ctx.optimize(loss, 0)
        with torch.no_grad():
            logs["loss"] = self.pseudo_nll(v, exact=False).mean().item()
        return logs

    def validation_step(self, batch: Batch, ctx: StepContext) -> dict[str, float]:
        v = self.binarise(batch.x)
        mu1, _ = self.mean_field(v)
        return {
            "loss": self.pseudo_nll(v).mean().item(),
            "reconstruction": self.reconstruction_bce(v, mu1).mean().item(),
        }

    # --- GenerativeModule hooks ------------------------------------------------------------------------
    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.cat(self.mean_field(self.binarise(batch.x)), dim=1)
        return mean, mean * (1.0 - mean)

    def draw_posterior(self, batch: Batch) -> torch.Tensor:
        mu1, mu2 = self.mean_field(self.binarise(batch.x))
        h1, h2 = bernoulli(mu1), bernoulli(mu2)
        for _ in range(self.config.posterior_steps - 1):
            _, h1, h2 = self.gibbs_sweep(h1, h2)
        return torch.cat([h1, h2], dim=1)

    def draw_prior(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        device = self.w1.device
        h1 = bernoulli(torch.full((n, self.config.n_hidden1), 0.5, device=device))
        h2 = bernoulli(torch.full((n, self.config.n_hidden2), 0.5, device=device))
        for _ in range(self.config.burn_in):
            _, h1, h2 = self.gibbs_sweep(h1, h2)
        return torch.cat([h1, h2], dim=1), torch.zeros(n, device=device), None

    def generate(self, z: torch.Tensor, log_library: torch.Tensor, batch_index: torch.Tensor | None) -> torch.Tensor:
        return bernoulli(torch.sigmoid(self.v_logits(z[:, : self.config.n_hidden1])))

    def expected(self, batch: Batch) -> torch.Tensor:
        mu1, _ = self.mean_field(self.binarise(batch.x))
        return torch.sigmoid(self.v_logits(mu1))


class DBM(TorchModel):
    """Two-hidden-layer deep Boltzmann machine on detected/not-detected expression, trained by PCD."""

    kind = "dbm"
    Config = DBMConfig
    output = "binary"

    @property
    def n_latent(self) -> int:
        return self.config.n_hidden1 + self.config.n_hidden2

    def build_module(self, n_genes: int, n_batches: int, train_counts: Counts | None) -> DBMModule:
        rate = None
        if train_counts is not None:
            chunks = count_chunks(train_counts)
            on = sum(np.asarray((chunk > self.config.threshold).sum(axis=0)).ravel() for chunk in chunks)
            on = on / train_counts.shape[0]
            rate = torch.from_numpy(on.astype(np.float32))
        return DBMModule(n_genes, self.config, rate)

    def binarise(self, adata: ad.AnnData) -> np.ndarray:
        """The 0/1 expression the model sees for `adata`'s cells, in the model's gene order."""
        return (model_counts(adata, self.genes).toarray() > self.config.threshold).astype(np.float32)

    def heldout_nll(self, adata: ad.AnnData) -> dict[str, float]:
        """Mean per-cell pseudo-NLL of the binarised cells, exact over all genes (h2 at mean field)."""
        parts = self._map(self.inference_batches(adata), lambda m, b: m.pseudo_nll(m.binarise(b.x)))
        return {"pseudo_nll": float(torch.cat(parts).mean())}
