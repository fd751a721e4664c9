"""scVI-style variational autoencoder of counts (VAE) and its linearly decoded variant (LDVAE).

The encoder reads log1p counts (plus a one-hot batch) and gives a diagonal Gaussian posterior; the decoder
turns a latent into softmax gene proportions that, times the library size, are the mean of an NB, ZINB or
Poisson likelihood. VAE and LDVAE share one module: an MLP decoder or a single linear layer (LDVAE), whose
weights are then interpretable as gene loadings (Svensson et al. 2020).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import anndata as ad
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from scdgm.errors import InputError, ScdgmError
from scdgm.models.base import (
    EpochCallback,
    LinearDecoder,
    TrainingHistory,
    check_at_least,
    check_non_negative,
    check_rate,
)
from scdgm.models.data import Batch, Counts, count_chunks, split_mask
from scdgm.models.likelihoods import CountLikelihood, LibraryPrior, gaussian_kl, log_normal_density
from scdgm.models.nn import Linear, mlp, with_batch
from scdgm.models.torch_model import TorchCountEncoder, TrainConfig
from scdgm.models.training import Adam, StepContext

VAR_EPS = 1e-4
MAX_LOG_VAR = 12.0
LOADINGS_TARGET_SUM = 1e4  # counts per cell of the log-normalised expression LDVAE loadings are read against


@dataclass
class VAEConfig(TrainConfig):
    """Hyperparameters of VAE and LDVAE (scVI defaults). For LDVAE `n_hidden`/`n_layers` shape the encoder only,
    and `batch_norm` also normalises the linear decoder's output (folded into `loadings`)."""

    n_latent: int = 10
    n_hidden: int = 128
    n_layers: int = 1
    dropout: float = 0.1
    batch_norm: bool = True
    likelihood: Literal["nb", "zinb", "poisson"] = "nb"
    dispersion: Literal["gene", "gene-batch"] = "gene"
    library: Literal["observed", "learned"] = "observed"
    beta: float = 1.0
    kl_warmup_fraction: float = 0.3
    n_importance: int = 50

    def check(self) -> None:
        super().check()
        check_architecture(self.n_latent, self.n_hidden, self.n_layers, self.dropout)
        if not 0.0 <= self.kl_warmup_fraction <= 1.0:
            raise ScdgmError(f"kl_warmup_fraction must be in [0, 1], got {self.kl_warmup_fraction}")
        check_non_negative(beta=self.beta)
        check_at_least(1, n_importance=self.n_importance)
        if self.dispersion == "gene-batch" and self.batch_key is None:
            raise ScdgmError("dispersion='gene-batch' needs a batch covariate: set batch_key")


@dataclass
class LDVAEConfig(VAEConfig):
    """LDVAE hyperparameters: the VAE's, plus the rotation of the latent basis applied after training."""

    rotation: Literal["varimax", "none"] = "varimax"


def check_architecture(n_latent: int, n_hidden: int, n_layers: int, dropout: float) -> None:
    """Reject sizes and rates no network can have, with the offending value."""
    check_at_least(1, n_latent=n_latent, n_hidden=n_hidden, n_layers=n_layers)
    check_rate(dropout=dropout)


class Encoder(nn.Module):
    """(Transformed) counts + one-hot batch → optional input dropout (denoising) → MLP → linear head."""

    def __init__(
        self,
        n_genes: int,
        n_batches: int,
        n_hidden: int,
        n_layers: int,
        n_out: int,
        dropout: float,
        batch_norm: bool,
        input_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.n_batches = n_batches
        self.input_dropout = nn.Dropout(input_dropout) if input_dropout > 0 else nn.Identity()
        self.trunk = mlp(n_genes + n_batches, [n_hidden] * n_layers, dropout=dropout, batch_norm=batch_norm)
        self.head = Linear(n_hidden, n_out)

    def forward(self, x: torch.Tensor, batch_index: torch.Tensor | None) -> torch.Tensor:
        return self.head(self.trunk(with_batch(self.input_dropout(x), batch_index, self.n_batches)))


class Decoder(nn.Module):
    """Latent + one-hot batch → per-gene outputs, through an MLP (`hidden` widths) or, with no hidden layer, one
    linear layer with batch norm on its output if asked; a second head gives zero-inflation logits."""

    def __init__(
        self, n_latent: int, n_batches: int, n_genes: int, hidden: Sequence[int], batch_norm: bool, zero_head: bool
    ) -> None:
        super().__init__()
        self.n_batches = n_batches
        self.trunk = mlp(n_latent + n_batches, hidden, batch_norm=batch_norm)
        width = hidden[-1] if hidden else n_latent + n_batches
        normalised = batch_norm and not hidden
        layers: list[nn.Module] = [Linear(width, n_genes, bias=not normalised)]
        if normalised:
            layers.append(nn.BatchNorm1d(n_genes, momentum=0.01, eps=1e-3))
        self.head = nn.Sequential(*layers)
        self.zero_head = Linear(width, n_genes) if zero_head else None

    def forward(self, z: torch.Tensor, batch_index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.trunk(with_batch(z, batch_index, self.n_batches))
        return self.head(h), (self.zero_head(h) if self.zero_head is not None else None)

    def init_baseline(self, values: torch.Tensor) -> None:
        """Start the per-gene output offset (the bias, or batch norm's shift) at `values`, e.g. the log mean
        proportion of each gene: Adam moves a bias by about lr per step, so starting at zero costs epochs."""
        layer = self.head[-1]
        with torch.no_grad():
            layer.bias.copy_(values)

    def linear_weights(self) -> torch.Tensor:
        """Effective weights (genes × inputs) of a linear decoder, its output batch norm folded in."""
        if len(self.trunk):
            raise ScdgmError("the decoder is not linear: it has hidden layers")
        weight = self.head[0].weight
        if len(self.head) > 1:
            norm = self.head[1]
            weight = weight * (norm.weight / torch.sqrt(norm.running_var + norm.eps))[:, None]
        return weight


def positive(raw: torch.Tensor) -> torch.Tensor:
    """A variance from an unconstrained output: exp of the clamped log variance plus a floor, for stability."""
    return torch.exp(raw.clamp(max=MAX_LOG_VAR)) + VAR_EPS


class _DrawWithKL(torch.autograd.Function):
    """z = mean + sqrt(var) noise and KL(N(mean, var) || N(0, 1)) per cell, var = positive(raw), with
    hand-written gradients: one autograd step instead of some twenty on tensors of cells x latents, whose cost
    is all per-operation overhead."""

    @staticmethod
    def forward(
        ctx: Any, mean: torch.Tensor, raw: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        var = positive(raw)
        std = var.sqrt()
        kl = 0.5 * (var + mean.square() - 1.0 - var.log()).sum(-1)
        ctx.save_for_backward(mean, raw, var, std, noise)
        return torch.addcmul(mean, std, noise), kl

    @staticmethod
    def backward(ctx: Any, grad_z: torch.Tensor, grad_kl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        mean, raw, var, std, noise = ctx.saved_tensors
        grad_kl = grad_kl[:, None]
        grad_mean = torch.addcmul(grad_z, grad_kl, mean)
        grad_var = torch.addcmul(0.5 * grad_kl * (1.0 - var.reciprocal()), grad_z, noise / (2.0 * std))
        return grad_mean, grad_var * (var - VAR_EPS) * (raw <= MAX_LOG_VAR), None


@dataclass
class Posterior:
    """q(z | x) and, with a learned library, q(log library | x) (shapes (cells, n_latent) and (cells, 1))."""

    mean: torch.Tensor
    var: torch.Tensor
    library_mean: torch.Tensor | None
    library_var: torch.Tensor | None


class VAEModule(nn.Module):
    """The torch side of VAE and LDVAE: ELBO with KL warm-up, posterior/prior draws and generation."""

    def __init__(self, n_genes: int, n_batches: int, config: VAEConfig, linear_decoder: bool) -> None:
        super().__init__()
        self.config = config
        self.n_latent = config.n_latent
        self.learned_library = config.library == "learned"
        n_out = 2 * config.n_latent + (2 if self.learned_library else 0)
        self.encoder = Encoder(
            n_genes, n_batches, config.n_hidden, config.n_layers, n_out, config.dropout, config.batch_norm
        )
        self.likelihood = CountLikelihood(config.likelihood, n_genes, n_batches, config.dispersion)
        hidden = [] if linear_decoder else [config.n_hidden] * config.n_layers
        self.decoder = Decoder(
            config.n_latent, n_batches, n_genes, hidden, config.batch_norm, self.likelihood.zero_inflated
        )
        self.library_prior = LibraryPrior(n_batches)
        self.register_buffer("rotation", torch.eye(config.n_latent))

    # --- the reported latent basis ------------------------------------------------------------------------
    # Training works in the encoder's basis; embeddings, draws and loadings are reported in the basis
    # `rotation` picks (identity unless set after training): public z = internal z @ rotation. The prior is
    # rotation invariant, so the model is the same; only a posterior variance becomes the diagonal of the
    # rotated covariance.
    def to_public(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.rotation

    def to_internal(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.rotation.T

    # --- model pieces ----------------------------------------------------------------------------------
    def posterior(self, batch: Batch) -> Posterior:
        out = self.encoder(batch.encoder_input(), batch.batch_index)
        k = self.n_latent
        if not self.learned_library:
            return Posterior(out[:, :k], positive(out[:, k:]), None, None)
        return Posterior(out[:, :k], positive(out[:, k : 2 * k]), out[:, 2 * k : 2 * k + 1], positive(out[:, -1:]))

    def decode(
        self, z: torch.Tensor, log_library: torch.Tensor, batch_index: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log NB/Poisson mean (log softmax proportions + log library) and zero-inflation logits."""
        logits, zero_logits = self.decoder(z, batch_index)
        return F.log_softmax(logits, dim=-1) + log_library[:, None], zero_logits

    def _log_px(self, batch: Batch, z: torch.Tensor, library: torch.Tensor | None) -> torch.Tensor:
        """log p(x | z, library) of each cell (the observed library when `library` is None)."""
        logits, zero_logits = self.decoder(z, batch.batch_index)
        log_library = batch.log_library if library is None else library[:, 0]
        return self.likelihood.log_prob_from_logits(
            batch.x, logits, log_library, zero_logits, batch.batch_index, batch.whole
        )

    def _draw(self, batch: Batch) -> tuple[Posterior, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """One reparameterised draw of (z, log library) per cell and log p(x | z, library)."""
        post = self.posterior(batch)
        z = post.mean + post.var.sqrt() * torch.randn_like(post.mean)
        library = None
        if self.learned_library:
            library = post.library_mean + post.library_var.sqrt() * torch.randn_like(post.library_mean)
        return post, z, library, self._log_px(batch, z, library)

    def _library_prior(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        mean, var = self.library_prior.parameters_for(batch.batch_index, batch.x.shape[0])
        return mean[:, None], var[:, None]

    def elbo_terms(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-cell reconstruction term -log p(x | z, l) (one draw) and analytic KL divergence: the draws of
        `_draw` (same noise, same order), the latent one and its KL fused (`_DrawWithKL`)."""
        out = self.encoder(batch.encoder_input(), batch.batch_index)
        k = self.n_latent
        mean = out[:, :k]
        z, kl = _DrawWithKL.apply(mean, out[:, k : 2 * k], torch.randn_like(mean))
        library = None
        if self.learned_library:
            library_mean, library_var = out[:, 2 * k : 2 * k + 1], positive(out[:, -1:])
            library = library_mean + library_var.sqrt() * torch.randn_like(library_mean)
            kl = kl + gaussian_kl(library_mean, library_var, *self._library_prior(batch))
        return -self._log_px(batch, z, library), kl

    def log_importance_weight(self, batch: Batch) -> torch.Tensor:
        """log p(x, z, l) - log q(z, l | x) for one posterior draw per cell (its mean over draws is the ELBO)."""
        post, z, library, log_px = self._draw(batch)
        weight = log_px + log_normal_density(z, 0.0, 1.0) - log_normal_density(z, post.mean, post.var)
        if self.learned_library:
            weight = weight + log_normal_density(library, *self._library_prior(batch))
            weight = weight - log_normal_density(library, post.library_mean, post.library_var)
        return weight

    # --- training hooks --------------------------------------------------------------------------------
    def configure_optimizers(self) -> list[Adam]:
        return [adam(self.parameters(), self.config)]

    def kl_weight(self, ctx: StepContext) -> float:
        """beta, reached linearly over the first `kl_warmup_fraction` of training."""
        warmup = self.config.kl_warmup_fraction
        return self.config.beta * (min(1.0, ctx.progress / warmup) if warmup > 0 else 1.0)

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        reconstruction, kl = self.elbo_terms(batch)
        loss = (reconstruction + self.kl_weight(ctx) * kl).mean()
        ctx.optimize(loss)
        return {"loss": loss.detach(), "reconstruction": reconstruction.mean().detach(), "kl": kl.mean().detach()}

    def validation_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        """The loss at the full KL weight, so early stopping compares epochs like with like."""
        reconstruction, kl = self.elbo_terms(batch)
        loss = (reconstruction + self.config.beta * kl).mean()
        return {"loss": loss, "reconstruction": reconstruction.mean(), "kl": kl.mean()}

    # --- GenerativeModule hooks ------------------------------------------------------------------------
    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        post = self.posterior(batch)
        return self.to_public(post.mean), post.var @ self.rotation**2

    def draw_posterior(self, batch: Batch) -> torch.Tensor:
        post = self.posterior(batch)
        return self.to_public(post.mean + post.var.sqrt() * torch.randn_like(post.mean))

    def draw_prior(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        device = self.library_prior.mean.device
        log_library, batch_index = self.library_prior.sample(n)
        return torch.randn(n, self.n_latent, device=device), log_library, batch_index

    def generate(self, z: torch.Tensor, log_library: torch.Tensor, batch_index: torch.Tensor | None) -> torch.Tensor:
        log_mu, zero_logits = self.decode(self.to_internal(z), log_library, batch_index)
        return self.likelihood.sample(log_mu, zero_logits, batch_index)

    def expected(self, batch: Batch) -> torch.Tensor:
        """Mean counts at the posterior mean (and, if learned, the posterior mean log library)."""
        post = self.posterior(batch)
        library = batch.log_library if post.library_mean is None else post.library_mean[:, 0]
        return self.likelihood.mean(*self.decode(post.mean, library, batch.batch_index))


def log_mean_proportion(counts: Counts) -> torch.Tensor:
    """log of each gene's share of all counts (one pseudo-count per gene): the decoder's starting baseline."""
    totals = sum(np.asarray(chunk.sum(axis=0), dtype=np.float64).ravel() for chunk in count_chunks(counts)) + 1.0
    return torch.from_numpy(np.log(totals / totals.sum()).astype(np.float32))


def adam(parameters: Iterable[nn.Parameter], config: TrainConfig) -> Adam:
    """Adam as scVI configures it (eps 0.01), fused into one kernel."""
    return Adam(parameters, lr=config.lr, weight_decay=config.weight_decay, eps=0.01)


class VAE(TorchCountEncoder):
    """scVI-style VAE: NB/ZINB/Poisson likelihood, observed or learned library, optional batch covariate."""

    kind = "vae"
    Config = VAEConfig
    linear_decoder: ClassVar[bool] = False

    def warmup_epochs(self) -> int:
        """The KL warm-up (kl_warmup_fraction of max_epochs): best state, early stopping and LR steps start after
        it, so the model kept has the full KL weight and training always runs past the warm-up."""
        return min(math.ceil(self.config.kl_warmup_fraction * self.config.max_epochs), self.config.max_epochs - 1)

    def build_module(self, n_genes: int, n_batches: int, train_counts: Counts | None) -> VAEModule:
        module = VAEModule(n_genes, n_batches, self.config, self.linear_decoder)
        if train_counts is not None:
            module.decoder.init_baseline(log_mean_proportion(train_counts))
        return module

    @property
    def n_latent(self) -> int:
        return self.config.n_latent

    def heldout_nll(self, adata: ad.AnnData, n_importance: int | None = None) -> dict[str, float]:
        """Mean per-cell negative ELBO (`nll_elbo`, an upper bound) and the importance-sampled negative marginal
        log-likelihood with `n_importance` posterior draws per cell (`nll_marginal`, a tighter bound)."""
        draws = n_importance or self.config.n_importance
        module = self._require_module().eval()
        elbo, marginal = [], []
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.config.seed)
            for cells in self.inference_batches(adata, batch_size=1024):
                batch = dataclasses.replace(cells, whole=torch.equal(cells.x, cells.x.floor()))  # once, not per draw
                weights = torch.stack([module.log_importance_weight(batch) for _ in range(draws)])
                elbo.append(weights.mean(0))
                marginal.append(torch.logsumexp(weights, 0) - math.log(draws))
        return {"nll_elbo": -torch.cat(elbo).mean().item(), "nll_marginal": -torch.cat(marginal).mean().item()}


class LDVAE(VAE, LinearDecoder):
    """Linearly decoded VAE: the same encoder, a linear decoder whose weights are gene loadings per latent.

    The ELBO does not change when the latent basis rotates (isotropic prior), so the factors a fit lands on
    are an arbitrary mix of the biological programs; with rotation='varimax' (default) the reported basis is
    the varimax rotation of the loadings (sparse, one program per factor where the data allow), factors
    ordered by the sum of squared loadings and signed so that their heavy tail is positive.
    """

    kind = "ldvae"
    Config = LDVAEConfig
    linear_decoder = True

    def fit_counts(
        self,
        counts: Counts,
        obs: pd.DataFrame,
        train: np.ndarray,
        validation: np.ndarray,
        callbacks: Sequence[EpochCallback],
    ) -> TrainingHistory:
        """Train, then (rotation='varimax') rotate the reported latent basis to the varimax loadings."""
        history = super().fit_counts(counts, obs, train, validation, callbacks)
        if self.config.rotation == "varimax":
            module = self.module
            weights = module.decoder.linear_weights()[:, : self.n_latent].detach().cpu().double().numpy()
            rotation = torch.from_numpy(varimax(weights)).to(module.rotation)
            module.rotation.copy_(rotation)
        return history

    @property
    def target_sum(self) -> float:
        return LOADINGS_TARGET_SUM

    def loadings(self) -> pd.DataFrame:
        """Gene × latent loadings of the linear decoder (batch norm folded in, as scVI's `get_loadings`), in the
        reported latent basis."""
        module = self._require_module()
        weights = module.decoder.linear_weights()[:, : self.n_latent] @ module.rotation
        columns = [f"latent_{i}" for i in range(self.n_latent)]
        return pd.DataFrame(weights.detach().cpu().numpy(), index=self.genes, columns=columns)

    def variance_explained(self, adata: ad.AnnData | None = None) -> pd.Series:
        """Share of the variance of the decoder's linear predictor captured by each latent.

        With loadings W (genes × latents) and the latent means z of the training cells of `adata` (all cells
        without a split), the predictor of gene g is eta_g = sum_k W_gk z_k (+ constants). Latent k's share is
        sum_g W_gk^2 Var(z_k) / sum_g Var(eta_g); the shares sum to 1 when the latents are uncorrelated and
        otherwise leave the covariance terms out.
        """
        if adata is None:
            raise InputError(f"{self.kind}: variance explained needs the cells (adata)")
        z = self.embed(adata[split_mask(adata, "train")], key_added=None).mean.astype(np.float64)
        loadings = self.loadings()
        weights = loadings.to_numpy(dtype=np.float64)
        predictor = (z - z.mean(0)) @ weights.T
        shares = (weights**2).sum(0) * z.var(0) / predictor.var(0).sum()
        return pd.Series(shares, index=loadings.columns, name="variance_explained")


def varimax(loadings: np.ndarray, max_iter: int = 500, tol: float = 1e-10) -> np.ndarray:
    """Orthogonal rotation R maximising the varimax criterion of `loadings @ R` (Kaiser 1958), then a signed
    permutation: columns by decreasing sum of squares, each signed so that its sum of cubes is positive."""
    n_rows, k = loadings.shape
    rotation = np.eye(k)
    criterion = 0.0
    for _ in range(max_iter):
        rotated = loadings @ rotation
        target = rotated**3 - rotated * (rotated**2).sum(0) / n_rows
        u, singular, vt = np.linalg.svd(loadings.T @ target)
        rotation = u @ vt
        previous, criterion = criterion, singular.sum()
        if previous and criterion < previous * (1 + tol):
            break
    rotated = loadings @ rotation
    order = np.argsort(-(rotated**2).sum(0), kind="stable")
    signs = np.where((rotated[:, order] ** 3).sum(0) < 0, -1.0, 1.0)
    return rotation[:, order] * signs
