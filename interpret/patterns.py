"""Patterns of the selected genes: their frequencies, the latent configurations behind each, and a 2-D map.

A cell's pattern is its 0/1 string over the selected genes (in selection order). Two patterns are as far apart
as the distributions of latent configurations (0/1 strings over the latents) among their cells: the distance is
the square root of the Jensen–Shannon divergence (base 2, so in [0, 1]), and classical MDS draws it in 2-D.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scdgm.errors import InputError, ScdgmError


@dataclass
class PatternSummary:
    """The most frequent patterns, their counts, latent-configuration distributions, distances and MDS map."""

    patterns: list[str]
    counts: np.ndarray
    configurations: list[str]
    distributions: np.ndarray
    """(patterns × configurations): share of each latent configuration among the pattern's cells."""
    distances: np.ndarray
    coordinates: np.ndarray

    def to_frame(self) -> pd.DataFrame:
        """One row per pattern: count, share of cells, most common latent configuration and MDS coordinates."""
        return pd.DataFrame({
            "pattern": self.patterns,
            "count": self.counts,
            "fraction": self.counts / self.counts.sum(),
            "top_configuration": [self.configurations[k] for k in self.distributions.argmax(axis=1)],
            "mds_1": self.coordinates[:, 0],
            "mds_2": self.coordinates[:, 1],
        })


def pattern_strings(bits: Any) -> np.ndarray:
    """0/1 string of each row of a binary cells × variables matrix (dense or sparse)."""
    bits = bits.toarray() if sp.issparse(bits) else np.asarray(bits)
    if bits.ndim != 2:
        raise InputError(f"expected a cells × variables matrix, got shape {bits.shape}")
    if not ((bits == 0) | (bits == 1)).all():
        raise InputError("patterns need binary (0/1) values")
    unique, inverse = np.unique(bits.astype(np.uint8), axis=0, return_inverse=True)
    strings = np.array(["".join(map(str, row)) for row in unique], dtype=object)
    return strings[inverse.ravel()]


def summarize_patterns(
    x: Any,
    h: Any,
    genes: Sequence[int],
    latents: Sequence[int] | None = None,
    n_top: int = 20,
) -> PatternSummary:
    """Summarise the n_top most frequent patterns over `genes` of binary x, with h's configurations (all latents
    or only `latents`); ties in frequency are ordered by pattern string."""
    if n_top < 1:
        raise ScdgmError(f"n_top must be >= 1, got {n_top}")
    h = np.asarray(h)
    if h.ndim != 2 or h.shape[0] != x.shape[0]:
        raise InputError(f"latents must have {x.shape[0]} rows, got shape {h.shape}")
    cell_patterns = pattern_strings(x[:, list(genes)])
    cell_configs = pattern_strings(h if latents is None else h[:, list(latents)])
    table = pd.crosstab(cell_patterns, cell_configs)
    totals = table.sum(axis=1)
    order = sorted(table.index, key=lambda pattern: (-totals[pattern], pattern))[:n_top]
    table = table.loc[order]
    counts = table.sum(axis=1).to_numpy()
    distributions = table.to_numpy() / counts[:, None]
    distances = js_distances(distributions)
    return PatternSummary(list(order), counts, list(table.columns), distributions, distances,
                          classical_mds(distances))


def js_distances(distributions: np.ndarray) -> np.ndarray:
    """Square root of the Jensen–Shannon divergence (base 2) between every pair of rows (each a distribution)."""
    p = np.asarray(distributions, dtype=np.float64)
    p = p / p.sum(axis=1, keepdims=True)
    result = np.zeros((p.shape[0], p.shape[0]))
    for i in range(p.shape[0]):
        mixture = (p[i] + p) / 2
        divergence = 0.5 * (_kl(p[i][None, :], mixture) + _kl(p, mixture))
        result[i] = np.sqrt(np.clip(divergence, 0.0, 1.0))
    np.fill_diagonal(result, 0.0)
    return (result + result.T) / 2


def classical_mds(distances: np.ndarray, n_components: int = 2) -> np.ndarray:
    """Classical (Torgerson) MDS: coordinates whose Euclidean distances best match `distances` (rows × n_components).

    Components with non-positive eigenvalues are zero; each axis's sign is fixed so its largest entry is positive.
    """
    d = np.asarray(distances, dtype=np.float64)
    k = d.shape[0]
    centring = np.eye(k) - 1.0 / k
    gram = -0.5 * centring @ (d ** 2) @ centring
    values, vectors = np.linalg.eigh(gram)
    top = np.argsort(values)[::-1][:n_components]
    coordinates = np.zeros((k, n_components))
    used = min(n_components, k)
    coordinates[:, :used] = vectors[:, top] * np.sqrt(np.clip(values[top], 0.0, None))
    signs = np.sign(coordinates[np.abs(coordinates).argmax(axis=0), np.arange(n_components)])
    return coordinates * np.where(signs == 0, 1.0, signs)


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Kullback–Leibler divergence in bits, row-wise, with 0·log 0 = 0."""
    positive = p > 0
    ratio = np.where(positive, p, 1.0) / np.where(positive, q, 1.0)
    return np.where(positive, p * np.log2(ratio), 0.0).sum(axis=-1)
