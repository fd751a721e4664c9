"""Gene attributions of each latent mean for non-linear models, by integrated gradients (Captum).

The attributed function maps a cell's counts to its latent means through the model's own encoder (a
`CountEncoder`'s `encode_counts`, which recomputes the log library size from the input), so attributions are of
counts alone. The baseline is the all-zero cell: gene i's attribution to latent j is (x_i - 0) times the average
gradient of mean_j along the straight path from 0 to x, and the attributions of a cell sum to
mean_j(x) - mean_j(0) (completeness, up to the quadrature error of `n_steps` points).
"""
from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import torch
from captum.attr import IntegratedGradients

from scdgm.errors import InputError
from scdgm.interpret.loadings import top_genes
from scdgm.models.base import CountEncoder, GenerativeModel
from scdgm.models.data import Batch, CountBatches, model_counts

CHUNK_ELEMENTS = 2**24
"""Path points x genes held at once (64 MB of float32): bounds memory whatever the number of cells."""


class LatentMean:
    """counts (cells x genes) -> latent mean (cells x latents) through a model's count encoder."""

    def __init__(self, model: CountEncoder) -> None:
        self.model = model

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __call__(self, x: torch.Tensor, batch_index: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.encode_counts(x, batch_index)


def latent_mean_function(model: GenerativeModel) -> LatentMean:
    """The attributed function of a fitted model that declares a count encoder (`CountEncoder`).

    Other models are refused: PCA has no encoder to differentiate, and the DBM binarises the counts before
    encoding, so every gradient with respect to the counts would be zero.
    """
    if not isinstance(model, CountEncoder):
        raise InputError(f"{model.kind}: attributions need a model whose encoder reads the counts differentiably")
    if not model.genes:
        raise InputError(f"{model.kind}: attributions need a fitted model with an encoder")
    return LatentMean(model)


def model_batches(
    model: GenerativeModel, adata: ad.AnnData, batch_size: int, device: torch.device
) -> CountBatches:
    """Batches of `adata`'s cells in the model's gene order with their batch codes, on `device`."""
    counts = model_counts(adata, model.genes)
    codes = model.batch_codes(model.batch_labels(adata.obs), adata.n_obs)
    return CountBatches(counts, batch_codes=codes, batch_size=batch_size, device=device)


def integrated_gradients(
    function: LatentMean,
    x: torch.Tensor,
    targets: torch.Tensor,
    batch_index: torch.Tensor | None = None,
    n_steps: int = 16,
) -> torch.Tensor:
    """Attributions (cells x genes) of latent `targets[c]` for each cell c, zero baseline, in chunks of cells."""
    if n_steps < 2:
        raise InputError(f"n_steps must be at least 2, got {n_steps}")
    method = IntegratedGradients(function)
    step = max(1, CHUNK_ELEMENTS // max(n_steps * x.shape[1], 1))
    parts = []
    for start in range(0, x.shape[0], step):
        rows = slice(start, start + step)
        inputs = x[rows].detach().requires_grad_(True)
        extra = (batch_index[rows],) if batch_index is not None else None
        parts.append(
            method.attribute(
                inputs, baselines=torch.zeros_like(inputs), target=targets[rows],
                additional_forward_args=extra, n_steps=n_steps,
            ).detach()
        )
    return torch.cat(parts) if parts else x.new_zeros(x.shape)


def batch_attributions(function: LatentMean, batch: Batch, latents: Sequence[int], n_steps: int = 16) -> torch.Tensor:
    """Attributions (cells x len(latents) x genes) of the chosen latents for every cell of `batch`."""
    n_cells, k = batch.x.shape[0], len(latents)
    x = batch.x.repeat_interleave(k, dim=0)
    targets = torch.as_tensor(list(latents), device=x.device).repeat(n_cells)
    codes = batch.batch_index.repeat_interleave(k) if batch.batch_index is not None else None
    return integrated_gradients(function, x, targets, codes, n_steps).reshape(n_cells, k, -1)


def cell_attributions(
    model: GenerativeModel, adata: ad.AnnData, latents: Sequence[int] | None = None, n_steps: int = 16, batch_size: int = 256
) -> np.ndarray:
    """Per-cell attributions, cells x latents x genes (model gene order), of `latents` (all by default)."""
    function = latent_mean_function(model)
    latents = list(range(model.n_latent)) if latents is None else list(latents)
    batches = model_batches(model, adata, batch_size, function.device)
    parts = [batch_attributions(function, batch, latents, n_steps).cpu() for batch in batches]
    return torch.cat(parts).numpy()


def global_attributions(
    model: GenerativeModel, adata: ad.AnnData, n_cells: int = 300, n_steps: int = 16, seed: int = 0, batch_size: int = 64
) -> pd.DataFrame:
    """Mean |attribution| per gene (rows, model gene order) and latent (columns) over up to `n_cells` cells
    drawn at random (seeded); cells are processed in batches, never all held at once."""
    function = latent_mean_function(model)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(adata.n_obs, size=min(n_cells, adata.n_obs), replace=False))
    latents = list(range(model.n_latent))
    total = torch.zeros(len(latents), len(model.genes), dtype=torch.float64)
    for batch in model_batches(model, adata[chosen], batch_size, function.device):
        total += batch_attributions(function, batch, latents, n_steps).abs().sum(dim=0).double().cpu()
    table = (total / len(chosen)).T.numpy()
    return pd.DataFrame(table, index=list(model.genes), columns=[f"latent_{j}" for j in latents])


def top_attributed_genes(attributions: pd.DataFrame, n: int = 10) -> pd.DataFrame:
    """Per latent, the `n` genes with the largest mean |attribution|: columns factor, rank, gene, attribution."""
    return top_genes(attributions, n, value="attribution").drop(columns="sign")
