"""Gene attributions of each latent mean for non-linear models, by integrated gradients (Captum).

The attributed function maps a cell's counts to its latent means through the model's own encoder (a
`CountEncoder`'s `encode_counts`, which recomputes the log library size from the input), so attributions are of
counts alone. The baseline is the typical cell at the cell's own depth: the reference cells' pooled composition
(`typical_profile`) times the cell's library size, so attributions explain "this cell against a typical cell as
deeply sequenced" (an all-zero baseline would credit every detected gene, housekeeping genes most). Gene i's
attribution to latent j is (x_i - b_i) times the average gradient of mean_j along the straight path from b to x,
and the attributions of a cell sum to mean_j(x) - mean_j(b) (completeness, up to the quadrature error of
`n_steps` points). Genes are ranked by attribution × gene weight (`loadings.gene_statistics`).
"""
from __future__ import annotations

from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from captum.attr import IntegratedGradients

from scdgm.errors import InputError
from scdgm.interpret.loadings import top_genes
from scdgm.models.base import CountEncoder, GenerativeModel
from scdgm.models.data import Batch, CountBatches, model_counts

CHUNK_ELEMENTS = 2**24
"""Path points x genes held at once (64 MB of float32): bounds memory whatever the number of cells."""


class LatentMean:
    """counts (cells x genes) -> latent mean (cells x latents) through a model's count encoder, or, given
    `direction` (cells x latents), each cell's latent mean projected on its own direction (cells)."""

    def __init__(self, model: CountEncoder) -> None:
        self.model = model

    @property
    def device(self) -> torch.device:
        return self.model.device

    def __call__(
        self, x: torch.Tensor, batch_index: torch.Tensor | None = None, direction: torch.Tensor | None = None
    ) -> torch.Tensor:
        mean = self.model.encode_counts(x, batch_index)
        return mean if direction is None else (mean * direction).sum(dim=1)


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


def typical_profile(counts: sp.csr_matrix) -> np.ndarray:
    """The reference cells' pooled composition (each gene's share of all their counts): times a library size,
    the expected counts of a typical cell that deep."""
    totals = np.asarray(counts.sum(axis=0), dtype=np.float64).ravel()
    if totals.sum() <= 0:
        raise InputError("the reference cells have no counts: no typical cell to compare with")
    return totals / totals.sum()


def typical_baselines(x: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
    """Per cell (rows of `x`), the typical cell at that cell's library size: library × `profile`."""
    return x.sum(dim=1, keepdim=True) * profile


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
    baselines: torch.Tensor,
    targets: torch.Tensor | None = None,
    batch_index: torch.Tensor | None = None,
    n_steps: int = 16,
    directions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attributions (cells x genes), from `baselines` (cells x genes), of latent `targets[c]` for each cell c, or
    with `directions` (cells x latents, no targets) of each cell's latent mean projected on its direction; in
    chunks of cells."""
    if n_steps < 2:
        raise InputError(f"n_steps must be at least 2, got {n_steps}")
    method = IntegratedGradients(function)
    step = max(1, CHUNK_ELEMENTS // max(n_steps * x.shape[1], 1))
    parts = []
    for start in range(0, x.shape[0], step):
        rows = slice(start, start + step)
        inputs = x[rows].detach().requires_grad_(True)
        extra = (
            None if batch_index is None else batch_index[rows],
            None if directions is None else directions[rows],
        )
        parts.append(
            method.attribute(
                inputs, baselines=baselines[rows].detach(), target=None if targets is None else targets[rows],
                additional_forward_args=extra, n_steps=n_steps,
            ).detach()
        )
    return torch.cat(parts) if parts else x.new_zeros(x.shape)


def batch_attributions(
    function: LatentMean, batch: Batch, latents: Sequence[int], profile: torch.Tensor, n_steps: int = 16
) -> torch.Tensor:
    """Attributions (cells x len(latents) x genes) of the chosen latents for every cell of `batch`, each from the
    typical cell at its depth (`profile`: `typical_profile` as a tensor on the batch's device)."""
    n_cells, k = batch.x.shape[0], len(latents)
    x = batch.x.repeat_interleave(k, dim=0)
    targets = torch.as_tensor(list(latents), device=x.device).repeat(n_cells)
    codes = batch.batch_index.repeat_interleave(k) if batch.batch_index is not None else None
    baselines = typical_baselines(x, profile)
    return integrated_gradients(function, x, baselines, targets, codes, n_steps).reshape(n_cells, k, -1)


def _profile_tensor(model: GenerativeModel, profile: np.ndarray, device: torch.device) -> torch.Tensor:
    profile = np.asarray(profile, dtype=np.float32).ravel()
    if profile.size != len(model.genes):
        raise InputError(f"the typical-cell profile has {profile.size} genes, the model {len(model.genes)}")
    return torch.as_tensor(profile, device=device)


def cell_attributions(
    model: GenerativeModel, adata: ad.AnnData, profile: np.ndarray, latents: Sequence[int] | None = None,
    n_steps: int = 16, batch_size: int = 256,
) -> np.ndarray:
    """Per-cell attributions, cells x latents x genes (model gene order), of `latents` (all by default), from the
    typical cell of composition `profile` (`typical_profile` of the reference cells) at each cell's depth."""
    function = latent_mean_function(model)
    latents = list(range(model.n_latent)) if latents is None else list(latents)
    typical = _profile_tensor(model, profile, function.device)
    batches = model_batches(model, adata, batch_size, function.device)
    parts = [batch_attributions(function, batch, latents, typical, n_steps).cpu() for batch in batches]
    return torch.cat(parts).numpy()


def global_attributions(
    model: GenerativeModel, adata: ad.AnnData, profile: np.ndarray, n_cells: int = 300, n_steps: int = 16,
    seed: int = 0, batch_size: int = 64,
) -> pd.DataFrame:
    """Mean |attribution| (from the typical cell of composition `profile`) per gene (rows, model gene order) and
    latent (columns) over up to `n_cells` cells drawn at random (seeded); cells are processed in batches, never all
    held at once."""
    function = latent_mean_function(model)
    typical = _profile_tensor(model, profile, function.device)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(adata.n_obs, size=min(n_cells, adata.n_obs), replace=False))
    latents = list(range(model.n_latent))
    total = torch.zeros(len(latents), len(model.genes), dtype=torch.float64)
    for batch in model_batches(model, adata[chosen], batch_size, function.device):
        total += batch_attributions(function, batch, latents, typical, n_steps).abs().sum(dim=0).double().cpu()
    table = (total / len(chosen)).T.numpy()
    return pd.DataFrame(table, index=list(model.genes), columns=[f"latent_{j}" for j in latents])


def top_attributed_genes(attributions: pd.DataFrame, n: int = 10, weights: pd.Series | None = None) -> pd.DataFrame:
    """Per latent, the `n` genes with the largest mean |attribution| × weight (`loadings.top_genes`): columns
    factor, rank, gene, attribution, score."""
    return top_genes(attributions, n, value="attribution", weights=weights).drop(columns="sign")
