"""Deterministic autoencoder of counts: the VAE's encoder and decoder without the variational posterior.

`loss="nb"` decodes softmax proportions × library size under an NB likelihood with gene-wise dispersion;
`loss="mse"` regresses the log-normalised expression (log1p of counts per 10k) it reads. Dropout in the
encoder or on the input (`input_dropout`, a denoising autoencoder) regularises it; the same dropout, left on at
inference (MC dropout), gives the embedding's variance. Prior samples come from a Gaussian fitted to the
training cells' codes.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn
from torch.nn import functional as F

from scdgm.models.base import Embedding, EpochCallback, TrainingHistory, check_at_least, check_rate
from scdgm.models.data import Batch, Counts, count_chunks, log_normalize, subset_counts
from scdgm.models.likelihoods import CountLikelihood, LibraryPrior
from scdgm.models.torch_model import TorchCountEncoder, TrainConfig
from scdgm.models.training import StepContext
from scdgm.models.vae import Decoder, Encoder, adam, check_architecture, log_mean_proportion

SCALE = 1e4  # counts per cell of the log-normalised input of loss="mse"


@dataclass
class AEConfig(TrainConfig):
    """Hyperparameters of the autoencoder; `mc_passes` dropout passes estimate the embedding variance."""

    n_latent: int = 10
    n_hidden: int = 128
    n_layers: int = 1
    dropout: float = 0.1
    input_dropout: float = 0.0
    batch_norm: bool = True
    loss: Literal["nb", "mse"] = "nb"
    mc_passes: int = 20

    def check(self) -> None:
        super().check()
        check_architecture(self.n_latent, self.n_hidden, self.n_layers, self.dropout)
        check_rate(input_dropout=self.input_dropout)
        check_at_least(2, mc_passes=self.mc_passes)


class AEModule(nn.Module):
    """Encoder → code → decoder, trained on an NB likelihood or squared error of log-normalised expression."""

    def __init__(self, n_genes: int, n_batches: int, config: AEConfig) -> None:
        super().__init__()
        self.config = config
        self.n_latent = config.n_latent
        self.encoder = Encoder(
            n_genes, n_batches, config.n_hidden, config.n_layers, config.n_latent,
            config.dropout, config.batch_norm, config.input_dropout,
        )
        hidden = [config.n_hidden] * config.n_layers
        self.decoder = Decoder(config.n_latent, n_batches, n_genes, hidden, config.batch_norm, zero_head=False)
        self.likelihood = CountLikelihood("nb", n_genes) if config.loss == "nb" else None
        self.library_prior = LibraryPrior(n_batches)
        self.register_buffer("code_mean", torch.zeros(config.n_latent))
        self.register_buffer("code_scale", torch.eye(config.n_latent))

    def inputs(self, batch: Batch) -> torch.Tensor:
        """What the encoder reads: log1p counts (NB), or log1p counts per 10k (MSE, also the target)."""
        if self.likelihood is not None:
            return torch.log1p(batch.x)
        return log_normalize(batch.x, SCALE)

    def code(self, batch: Batch) -> torch.Tensor:
        return self.encoder(self.inputs(batch), batch.batch_index)

    def losses(self, batch: Batch) -> torch.Tensor:
        """Per-cell loss: NB negative log-likelihood of the counts, or summed squared error."""
        out, _ = self.decoder(self.code(batch), batch.batch_index)
        if self.likelihood is None:
            return ((out - self.inputs(batch)) ** 2).sum(-1)
        log_mu = F.log_softmax(out, dim=-1) + batch.log_library[:, None]
        return -self.likelihood.log_prob(batch.x, log_mu)

    # --- training hooks --------------------------------------------------------------------------------
    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [adam(self.parameters(), self.config)]

    def training_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        loss = self.losses(batch).mean()
        ctx.optimize(loss)
        return {"loss": loss.detach()}

    def validation_step(self, batch: Batch, ctx: StepContext) -> dict[str, torch.Tensor]:
        return {"loss": self.losses(batch).mean()}

    # --- GenerativeModule hooks ------------------------------------------------------------------------
    @property
    def stochastic(self) -> bool:
        """Whether dropout makes the code random (and MC dropout meaningful)."""
        return self.config.dropout > 0 or self.config.input_dropout > 0

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Code of each cell (dropout off) and its variance over `mc_passes` dropout passes (zeros without
        dropout: a deterministic encoder has no spread to report)."""
        mean = self.code(batch)
        if not self.stochastic:
            return mean, torch.zeros_like(mean)
        with dropout_active(self):
            passes = torch.stack([self.code(batch) for _ in range(self.config.mc_passes)])
        return mean, passes.var(0)

    def draw_posterior(self, batch: Batch) -> torch.Tensor:
        """One dropout pass of the encoder (the code itself without dropout)."""
        if not self.stochastic:
            return self.code(batch)
        with dropout_active(self):
            return self.code(batch)

    def draw_prior(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        noise = torch.randn(n, self.n_latent, device=self.code_mean.device)
        log_library, batch_index = self.library_prior.sample(n)
        return self.code_mean + noise @ self.code_scale.T, log_library, batch_index

    def decode_mean(self, z: torch.Tensor, log_library: torch.Tensor, batch_index: torch.Tensor | None) -> torch.Tensor:
        """Expected counts: softmax proportions × library (NB), or the decoded log-normalised expression turned
        into proportions (MSE), times the library size."""
        out, _ = self.decoder(z, batch_index)
        if self.likelihood is not None:
            return torch.exp(F.log_softmax(out, dim=-1) + log_library[:, None])
        expression = torch.expm1(out).clamp_min(0)
        return expression / expression.sum(-1, keepdim=True).clamp_min(1e-12) * log_library.exp()[:, None]

    def generate(self, z: torch.Tensor, log_library: torch.Tensor, batch_index: torch.Tensor | None) -> torch.Tensor:
        """NB draws; with loss='mse' (no count likelihood) Poisson draws around the decoded mean."""
        if self.likelihood is not None:
            out, _ = self.decoder(z, batch_index)
            return self.likelihood.sample(F.log_softmax(out, dim=-1) + log_library[:, None])
        return torch.poisson(self.decode_mean(z, log_library, batch_index))

    def expected(self, batch: Batch) -> torch.Tensor:
        return self.decode_mean(self.code(batch), batch.log_library, batch.batch_index)

    def fit_code_prior(self, codes: torch.Tensor) -> None:
        """Gaussian (mean and Cholesky factor of the covariance) of the training cells' codes."""
        centred = codes - codes.mean(0)
        covariance = centred.T @ centred / max(codes.shape[0] - 1, 1)
        jitter = 1e-6 * torch.eye(codes.shape[1], dtype=codes.dtype, device=codes.device)
        self.code_mean.copy_(codes.mean(0))
        self.code_scale.copy_(torch.linalg.cholesky(covariance + jitter))


def mean_log_expression(counts: Counts) -> torch.Tensor:
    """Mean log1p counts per 10k of each gene: the MSE decoder's starting baseline."""
    sums = 0.0
    for chunk in count_chunks(counts):
        totals = np.maximum(np.asarray(chunk.sum(axis=1), dtype=np.float64).ravel(), 1.0)
        sums = sums + np.asarray((sp.diags(SCALE / totals) @ chunk.astype(np.float64)).log1p().sum(axis=0)).ravel()
    return torch.from_numpy((sums / counts.shape[0]).astype(np.float32))


@contextmanager
def dropout_active(module: nn.Module) -> Iterator[None]:
    """Switch the dropout layers (only them: batch norm stays in inference mode) on for MC dropout."""
    layers = [m for m in module.modules() if isinstance(m, nn.Dropout)]
    for layer in layers:
        layer.train()
    try:
        yield
    finally:
        for layer in layers:
            layer.eval()


class Autoencoder(TorchCountEncoder):
    """Count autoencoder (NB or MSE) with MC-dropout embedding variance and a Gaussian prior over codes."""

    kind = "ae"
    Config = AEConfig

    def build_module(self, n_genes: int, n_batches: int, train_counts: Counts | None) -> AEModule:
        module = AEModule(n_genes, n_batches, self.config)
        if train_counts is not None:
            nb = self.config.loss == "nb"
            module.decoder.init_baseline(log_mean_proportion(train_counts) if nb else mean_log_expression(train_counts))
        return module

    @property
    def n_latent(self) -> int:
        return self.config.n_latent

    def fit_counts(
        self,
        counts: Counts,
        obs: pd.DataFrame,
        train: np.ndarray,
        validation: np.ndarray,
        callbacks: Sequence[EpochCallback],
    ) -> TrainingHistory:
        """Train, then fit the Gaussian prior to the codes of the training cells."""
        history = super().fit_counts(counts, obs, train, validation, callbacks)
        labels = self.batch_labels(obs)
        batches = self.count_batches(subset_counts(counts, train), None if labels is None else labels[train])
        self.module.fit_code_prior(torch.cat(self._map(batches, lambda m, b: m.code(b))))
        return history

    def embed_counts(self, counts: Counts, batch: Sequence[str] | np.ndarray | None = None) -> Embedding:
        """Codes and their MC-dropout variance, seeded so the same model embeds the same cells identically."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.config.seed)
            return super().embed_counts(counts, batch)
