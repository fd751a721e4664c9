"""The linear baseline: probabilistic PCA (Tipping & Bishop 1999, closed form) or factor analysis on
log-normalised expression, behind the same interface as the deep models.

Data: y = log1p(counts / library × target_sum), gene-centred by the training mean μ. Model: y = μ + W z + ε,
z ~ N(0, I), ε ~ N(0, Ψ) with Ψ = σ²I (PPCA) or diagonal (FA). Posterior: z | y ~ N(Σ Wᵀ Ψ⁻¹ (y − μ), Σ),
Σ = (I + Wᵀ Ψ⁻¹ W)⁻¹ — for PPCA this is M⁻¹ Wᵀ (y − μ) and σ² M⁻¹ with M = WᵀW + σ²I.
Counts from a draw y (documented choice): expm1(y) × library / target_sum, clipped at 0, then Poisson, where the
library is the cell's own (posterior) or drawn from the training library distribution (prior).
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from scdgm.errors import InputError
from scdgm.models.base import (
    Embedding,
    EpochCallback,
    GenerativeModel,
    LinearDecoder,
    ModelConfig,
    Samples,
    Source,
    TrainingHistory,
    check_at_least,
    check_positive,
    check_tensor_shapes,
    require,
)
from scdgm.models.data import (
    Counts,
    StreamedCounts,
    check_device,
    count_chunks,
    expression_to_counts,
    log_normalize,
    make_batches,
    model_counts,
    resolve_device,
    subset_counts,
)
from scdgm.models.likelihoods import LibraryPrior
from scdgm.models.training import seed_everything

METHODS = ("ppca", "fa")
CHUNK = 4096  # cells per chunk when streaming over a count matrix
NOISE_FLOOR = 0.01
"""Noise variances are at least this fraction of the mean per-gene variance: a gene (nearly) constant in the
training cells (FA fits it a ~0 noise) would otherwise dominate the held-out likelihood."""


@dataclass
class PCAConfig(ModelConfig):
    """Hyperparameters of the linear baseline."""

    n_latent: int = 10
    method: str = "ppca"
    target_sum: float = 1e4
    sample_noise: bool = True
    """Add the model's noise ε ~ N(0, Ψ) to sampled log expression (the full generative model) before Poisson."""
    max_iter: int = 1000
    """Iterations of sklearn's FactorAnalysis (method 'fa' only)."""
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        super().check()
        require(self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        check_at_least(1, n_latent=self.n_latent, max_iter=self.max_iter)
        check_at_least(0, seed=self.seed)
        check_positive(target_sum=self.target_sum)
        check_device(self.device)


class PCA(GenerativeModel, LinearDecoder):
    """Probabilistic PCA / factor analysis: closed-form posterior, Gaussian held-out likelihood, Poisson counts."""

    kind = "pca"
    Config = PCAConfig

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self.params: dict[str, torch.Tensor] = {}

    @property
    def n_latent(self) -> int:
        return self.config.n_latent

    @property
    def device(self) -> torch.device:
        return resolve_device(self.config.device)

    @property
    def target_sum(self) -> float:
        return self.config.target_sum

    # --- fitting ---------------------------------------------------------------------------------------
    def fit_counts(
        self,
        counts: Counts,
        obs: pd.DataFrame,
        train: np.ndarray,
        validation: np.ndarray,
        callbacks: Sequence[EpochCallback],
    ) -> TrainingHistory:
        """Fit on the training cells: closed form (PPCA) or sklearn's FactorAnalysis (FA). The history has one
        'epoch' whose train_loss / validation_loss are the mean Gaussian NLL per cell (log-normalised scale)."""
        started = time.perf_counter()
        seed_everything(self.config.seed)
        n_genes = counts.shape[1]
        if self.config.n_latent >= n_genes:
            raise InputError(f"pca: n_latent ({self.config.n_latent}) must be below the number of genes ({n_genes})")
        train_counts = subset_counts(counts, train)
        if self.config.method == "fa" and isinstance(counts, StreamedCounts):
            raise InputError("pca: method 'fa' (sklearn) needs the training cells in memory; these are streamed from "
                             "disk (larger than scale.stream_above_mb): use method 'ppca', which streams")
        fitted = self._fit_ppca(train_counts) if self.config.method == "ppca" else self._fit_fa(train_counts)
        mean, loadings, noise, total = fitted
        order = torch.argsort((loadings**2).sum(0), descending=True)
        loadings = loadings[:, order]
        flip = torch.sign(loadings.gather(0, loadings.abs().argmax(0, keepdim=True)))
        self.params = {
            "mean": mean,
            "loadings": loadings * flip,
            "noise_variance": noise.clamp(min=NOISE_FLOOR * total.item() / n_genes),
            "total_variance": total.reshape(1),
        }
        library_prior = LibraryPrior(0)
        library_prior.fit(make_batches(train_counts).log_library.double(), None)
        self.params.update({f"library_prior.{k}": v.to(self.device) for k, v in library_prior.state_dict().items()})
        metrics = {"train_loss": float(self._gaussian_nll(train_counts).mean())}
        if validation.any():
            metrics["validation_loss"] = float(self._gaussian_nll(subset_counts(counts, validation)).mean())
        metrics["epoch"] = 0
        self.history = TrainingHistory(epochs=[metrics], best_epoch=0, seconds=time.perf_counter() - started)
        for callback in callbacks:
            callback(0, metrics)
        return self.history

    def _log_expression(self, counts: Counts) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Chunks of log-normalised expression (float64 on the model's device) and log library sizes."""
        for batch in make_batches(counts, batch_size=CHUNK, device=self.device):
            yield log_normalize(batch.x, self.config.target_sum).double(), batch.log_library

    def _fit_ppca(self, counts: Counts) -> tuple[torch.Tensor, ...]:
        """Maximum-likelihood PPCA from the eigendecomposition of the gene covariance (streamed over cells)."""
        n_genes, q = counts.shape[1], self.config.n_latent
        total_sum = torch.zeros(n_genes, dtype=torch.float64, device=self.device)
        cross = torch.zeros(n_genes, n_genes, dtype=torch.float64, device=self.device)
        for y, _ in self._log_expression(counts):
            total_sum += y.sum(0)
            cross += y.T @ y
        n = counts.shape[0]
        mean = total_sum / n
        covariance = cross / n - torch.outer(mean, mean)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        top_values, top_vectors = eigenvalues.flip(0)[:q], eigenvectors.flip(1)[:, :q]
        total = torch.trace(covariance)
        sigma2 = ((total - top_values.sum()) / (n_genes - q)).clamp(min=1e-8)
        loadings = top_vectors * (top_values - sigma2).clamp(min=0.0).sqrt()
        return mean, loadings, sigma2.expand(n_genes).clone(), total

    def _fit_fa(self, counts: sp.csr_matrix) -> tuple[torch.Tensor, ...]:
        """Factor analysis by sklearn on the dense log-normalised training cells."""
        from sklearn.decomposition import FactorAnalysis  # here: importing sklearn takes ~1 s; only FA needs it

        y = torch.cat([y for y, _ in self._log_expression(counts)]).cpu().numpy()
        c = self.config
        fa = FactorAnalysis(n_components=c.n_latent, max_iter=c.max_iter, random_state=c.seed)
        fa.fit(y)
        fitted = (fa.mean_, fa.components_.T, fa.noise_variance_, y.var(axis=0, dtype=np.float64).sum())
        return tuple(torch.as_tensor(np.asarray(a), dtype=torch.float64, device=self.device) for a in fitted)

    # --- posterior -------------------------------------------------------------------------------------
    def _require_fitted(self) -> dict[str, torch.Tensor]:
        if not self.params:
            raise InputError("pca: the model has not been fitted or loaded")
        return self.params

    def _library_prior(self) -> LibraryPrior:
        """The log-normal library-size model of the training cells, for prior samples."""
        prior = LibraryPrior(0)
        prefix = "library_prior."
        prior.load_state_dict({k.removeprefix(prefix): v for k, v in self.params.items() if k.startswith(prefix)})
        return prior.to(self.device, torch.float64)

    def _posterior_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ = (I + Wᵀ Ψ⁻¹ W)⁻¹ and the map A = Σ Wᵀ Ψ⁻¹ with posterior mean A (y − μ)."""
        params = self._require_fitted()
        w, psi = params["loadings"], params["noise_variance"]
        scaled = w / psi.unsqueeze(1)
        covariance = torch.linalg.inv(torch.eye(w.shape[1], dtype=w.dtype, device=w.device) + w.T @ scaled)
        return covariance, covariance @ scaled.T

    def _centred(self, cells: ad.AnnData | Counts) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Chunks of (y − μ) for the given cells (AnnData aligned by gene name, or counts), with log libraries."""
        counts = model_counts(cells, self.genes) if isinstance(cells, ad.AnnData) else cells
        mean = self._require_fitted()["mean"]
        for y, log_library in self._log_expression(counts):
            yield y - mean, log_library

    def _posterior_mean(self, cells: ad.AnnData | Counts) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior means of the latent and the cells' log library sizes."""
        _, projection = self._posterior_terms()
        means, libraries = [], []
        for centred, log_library in self._centred(cells):
            means.append(centred @ projection.T)
            libraries.append(log_library)
        return torch.cat(means), torch.cat(libraries)

    def embed_counts(self, counts: Counts, batch: Sequence[str] | np.ndarray | None = None) -> Embedding:
        """Posterior mean and (diagonal) variance of each cell's latent; the variance is the same for all cells."""
        covariance, _ = self._posterior_terms()
        mean, _ = self._posterior_mean(counts)
        var = torch.diagonal(covariance).expand(mean.shape[0], -1)
        return Embedding(mean=mean.float().cpu().numpy(), var=var.float().cpu().numpy())

    def reconstruct(self, adata: ad.AnnData) -> np.ndarray:
        """Expected counts at the posterior mean: expm1(μ + W E[z|y]) × library / target_sum."""
        params = self._require_fitted()
        mean, log_library = self._posterior_mean(adata)
        log_expression = params["mean"] + mean @ params["loadings"].T
        scale = log_library.double().exp() / self.config.target_sum
        expected = torch.expm1(log_expression).clamp(min=0.0) * scale.unsqueeze(1)
        return expected.float().cpu().numpy()

    def _counts_from(self, z: torch.Tensor, log_library: torch.Tensor) -> torch.Tensor:
        """Log expression μ + Wz (+ ε when sample_noise), then Poisson counts at each cell's library size."""
        params = self._require_fitted()
        log_expression = params["mean"] + z @ params["loadings"].T
        if self.config.sample_noise:
            log_expression = log_expression + torch.randn_like(log_expression) * params["noise_variance"].sqrt()
        return expression_to_counts(log_expression, log_library.double(), self.config.target_sum, "poisson")

    def sample_chunks(
        self,
        counts: Counts,
        batch: Sequence[str] | np.ndarray | None = None,
        draws: int = 1,
        seed: int | None = None,
    ) -> Iterator[Samples]:
        """Posterior draws (full covariance) for cells given as counts, a chunk of cells at a time (an in-memory
        matrix is one chunk), `draws` per cell draw-major within the chunk."""
        seed = self.config.seed if seed is None else seed
        covariance, _ = self._posterior_terms()
        factor = torch.linalg.cholesky(covariance).T
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            offset = 0
            for chunk in count_chunks(counts):
                mean, log_library = self._posterior_mean(chunk)
                mean, log_library = mean.repeat(draws, 1), log_library.repeat(draws)
                z = mean + torch.randn(mean.shape, dtype=mean.dtype, device=mean.device) @ factor
                x = self._counts_from(z, log_library)
                cell_index = offset + np.tile(np.arange(chunk.shape[0]), draws)
                offset += chunk.shape[0]
                yield Samples(x=x.float().cpu().numpy(), z=z.float().cpu().numpy(), source="posterior",
                              cell_index=cell_index)

    def sample(
        self,
        adata: ad.AnnData | None = None,
        n: int | None = None,
        source: Source = "posterior",
        draws: int = 1,
        seed: int | None = None,
    ) -> Samples:
        """Latents from the posterior (full covariance) or N(0, I), log expression μ + Wz (+ ε), Poisson counts."""
        self._require_fitted()
        if source == "posterior":
            if adata is None:
                raise InputError("posterior sampling needs cells (adata)")
            (samples,) = self.sample_chunks(model_counts(adata, self.genes), draws=draws, seed=seed)
            return samples
        if source != "prior":
            raise InputError(f"source must be 'posterior' or 'prior', got {source!r}")
        if not n or n < 1:
            raise InputError("prior sampling needs a positive number of cells (n)")
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.config.seed if seed is None else seed)
            z = torch.randn(n, self.n_latent, dtype=torch.float64, device=self.device)
            log_library, _ = self._library_prior().sample(n)
            x = self._counts_from(z, log_library)
        return Samples(x=x.float().cpu().numpy(), z=z.float().cpu().numpy(), source=source)

    # --- likelihood and interpretation -----------------------------------------------------------------
    def _gaussian_nll(self, cells: ad.AnnData | Counts) -> torch.Tensor:
        """Per-cell −log N(y; μ, WWᵀ + Ψ) via the Woodbury identity (no genes × genes inverse)."""
        params = self._require_fitted()
        w, psi = params["loadings"], params["noise_variance"]
        covariance, _ = self._posterior_terms()
        log_det = torch.log(psi).sum() - torch.logdet(covariance)
        parts = []
        for centred, _ in self._centred(cells):
            projected = (centred / psi) @ w
            quadratic = (centred**2 / psi).sum(1) - ((projected @ covariance) * projected).sum(1)
            parts.append(0.5 * (w.shape[0] * math.log(2 * math.pi) + log_det + quadratic))
        return torch.cat(parts)

    def heldout_nll(self, adata: ad.AnnData) -> dict[str, float]:
        """Mean Gaussian NLL per cell of the log-normalised expression — a different scale from count NLLs."""
        return {"gaussian_nll_lognorm": float(self._gaussian_nll(adata).mean())}

    def factor_names(self) -> list[str]:
        """Names of the latent factors, in order of variance explained (named like the LDVAE's latents)."""
        return [f"latent_{i}" for i in range(self.n_latent)]

    def loadings(self) -> pd.DataFrame:
        """Genes × factors loading matrix W (log-normalised expression per unit of latent)."""
        w = self._require_fitted()["loadings"].cpu().numpy()
        return pd.DataFrame(w, index=self.genes, columns=self.factor_names())

    def variance_explained(self, adata: ad.AnnData | None = None) -> pd.Series:
        """Share of the total log-normalised variance carried by each factor, ‖w_k‖² / total variance
        (for PPCA: (λ_k − σ²) / Σλ, the eigenvalue less the noise variance); a property of the fit, so
        `adata` is not used."""
        params = self._require_fitted()
        shares = (params["loadings"] ** 2).sum(0) / params["total_variance"]
        return pd.Series(shares.cpu().numpy(), index=self.factor_names(), name="variance_explained")

    # --- persistence -----------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._require_fitted())

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        n_genes, n_latent = len(self.genes), self.config.n_latent
        expected = {"mean": [n_genes], "loadings": [n_genes, n_latent], "noise_variance": [n_genes],
                    "total_variance": [1]}
        expected.update({f"library_prior.{k}": v.shape for k, v in LibraryPrior(0).state_dict().items()})
        check_tensor_shapes(expected, tensors)
        self.params = {k: v.to(self.device, torch.float64) for k, v in tensors.items()}
