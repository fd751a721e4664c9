"""Binarise synthetic genes and latents by rules that are kept, so real cells can later be cut the same way.

Gene i is 1 where x_i > t_i (strict). The threshold t_i comes from the synthetic counts of gene i by one of
two rules: "two-group" splits log1p(x_i) into the two groups with the least within-group variance (Otsu's
criterion: 1-D two-means, the equal-variance limit of a two-component mixture), so a marker is "on" where it is
high rather than wherever one molecule was seen; "quantile" cuts at quantile(x_i, q) (with q = 0.5 a gene
that is zero in most cells becomes "non-zero"). Latent j is 1 where z_j > 0 ("sign") or z_j > its median
("median"). The fitted `Discretizer` keeps the per-gene and per-latent thresholds and round-trips through a
JSON-friendly dict.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp

from scdgm.errors import InputError, ScdgmError

LatentRule = Literal["sign", "median"]
GeneCut = Literal["two-group", "quantile"]
GENE_CUTS: tuple[str, ...] = ("two-group", "quantile")
Matrix = np.ndarray | sp.spmatrix | sp.sparray

FORMAT = "scdgm-discretizer"
FORMAT_VERSION = 2
"""Version 2 added `gene_cut`; version 1 dicts (quantile thresholds) are still read."""
CHUNK_ELEMENTS = 1 << 24
"""At most this many matrix entries are made dense at a time when computing gene quantiles."""


@dataclass(frozen=True)
class Discretizer:
    """Fitted thresholds: gene i is 1 where x_i > gene_thresholds[i], latent j where z_j > latent_thresholds[j]."""

    gene_thresholds: np.ndarray
    quantile: float
    """The quantile of the "quantile" cut (recorded, unused by "two-group")."""
    latent_rule: LatentRule = "sign"
    latent_thresholds: np.ndarray | None = None
    genes: list[str] | None = None
    gene_cut: GeneCut = "quantile"

    def genes_binary(self, x: Matrix, columns: Sequence[int] | None = None) -> np.ndarray | sp.csr_matrix:
        """Binarise cells × genes (all genes, or only `columns`); sparse input stays sparse (uint8 0/1)."""
        thresholds = self.gene_thresholds if columns is None else self.gene_thresholds[np.asarray(columns)]
        if columns is not None:
            x = x[:, np.asarray(columns)]
        if x.ndim != 2 or x.shape[1] != thresholds.shape[0]:
            raise InputError(f"expected a cells × {thresholds.shape[0]} gene matrix, got shape {x.shape}")
        return _above(x, thresholds)

    def latents_binary(self, z: np.ndarray) -> np.ndarray:
        """Binarise cells × latents with the kept latent rule (uint8 0/1)."""
        if self.latent_thresholds is None:
            raise ScdgmError("this discretizer was fitted without latents")
        z = np.asarray(z)
        if z.ndim != 2 or z.shape[1] != self.latent_thresholds.shape[0]:
            raise InputError(f"expected a cells × {self.latent_thresholds.shape[0]} latent matrix, got {z.shape}")
        return (z > self.latent_thresholds).astype(np.uint8)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (floats are written exactly by json)."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "gene_cut": self.gene_cut,
            "quantile": float(self.quantile),
            "gene_thresholds": [float(t) for t in self.gene_thresholds],
            "latent_rule": self.latent_rule,
            "latent_thresholds": None if self.latent_thresholds is None
            else [float(t) for t in self.latent_thresholds],
            "genes": None if self.genes is None else list(self.genes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Discretizer:
        """Inverse of `to_dict`; a dict of another format or version is a user error."""
        if data.get("format") != FORMAT or data.get("version") not in (1, FORMAT_VERSION):
            raise ScdgmError(f"not a {FORMAT} v{FORMAT_VERSION} dict (format={data.get('format')!r})")
        latents = data["latent_thresholds"]
        return cls(
            gene_thresholds=np.asarray(data["gene_thresholds"], dtype=np.float64),
            quantile=float(data["quantile"]),
            latent_rule=data["latent_rule"],
            latent_thresholds=None if latents is None else np.asarray(latents, dtype=np.float64),
            genes=data["genes"],
            gene_cut=data.get("gene_cut", "quantile"),  # absent in version 1
        )


def fit_discretizer(
    x: Matrix,
    z: np.ndarray | None = None,
    quantile: float = 0.5,
    latent_rule: LatentRule = "sign",
    genes: Sequence[str] | None = None,
    gene_cut: GeneCut = "two-group",
) -> Discretizer:
    """Learn per-gene thresholds from x (cells × genes) by `gene_cut` and, if z is given, the latent thresholds."""
    if gene_cut not in GENE_CUTS:
        raise ScdgmError(f"gene_cut must be one of {', '.join(GENE_CUTS)}, got {gene_cut!r}")
    if not 0.0 <= quantile < 1.0:
        raise ScdgmError(f"quantile must be in [0, 1), got {quantile}")
    if latent_rule not in ("sign", "median"):
        raise ScdgmError(f"latent_rule must be 'sign' or 'median', got {latent_rule!r}")
    if x.ndim != 2 or x.shape[0] == 0:
        raise InputError(f"expected a non-empty cells × genes matrix, got shape {x.shape}")
    if genes is not None and len(genes) != x.shape[1]:
        raise InputError(f"{len(genes)} gene names for {x.shape[1]} genes")
    if gene_cut == "quantile":
        thresholds = np.concatenate([np.quantile(block, quantile, axis=0) for block in _dense_column_blocks(x)])
    else:
        thresholds = two_group_thresholds(x)
    latent_thresholds = None
    if z is not None:
        z = np.asarray(z, dtype=np.float64)
        if z.ndim != 2 or z.shape[0] != x.shape[0]:
            raise InputError(f"latents have shape {z.shape}, expected {x.shape[0]} rows")
        _check_finite(z, "latents")
        latent_thresholds = np.zeros(z.shape[1]) if latent_rule == "sign" else np.median(z, axis=0)
    return Discretizer(thresholds, quantile, latent_rule, latent_thresholds, None if genes is None else list(genes),
                       gene_cut)


def two_group_thresholds(x: Matrix) -> np.ndarray:
    """Per gene, the cut t (one of its observed values) that splits log1p(x) into {<= t} and {> t} with the largest
    between-group variance (Otsu); a gene with a single value gets that value (never on). Counts must be >= 0."""
    thresholds = []
    for block in _dense_column_blocks(x):
        if (block < 0).any():
            raise InputError("the two-group cut needs non-negative counts; use gene_cut 'quantile' for other values")
        for column in block.T:
            values, counts = np.unique(column, return_counts=True)
            thresholds.append(values[_otsu_index(np.log1p(values), counts)])
    return np.asarray(thresholds, dtype=np.float64)


def _otsu_index(values: np.ndarray, counts: np.ndarray) -> int:
    """Index k of sorted distinct `values` (with multiplicities) maximising w0 w1 (mean0 - mean1)^2 when the
    values up to k form the lower group; the first maximum wins, so the result is deterministic."""
    if len(values) < 2:
        return 0
    total = counts.sum()
    weight = np.cumsum(counts)[:-1] / total
    below = np.cumsum(values * counts)[:-1] / total
    mean = below[-1] + values[-1] * counts[-1] / total
    between = (mean * weight - below) ** 2 / (weight * (1.0 - weight))
    return int(np.argmax(between))


def discretize(
    x: Matrix,
    z: np.ndarray,
    quantile: float = 0.5,
    latent_rule: LatentRule = "sign",
    genes: Sequence[str] | None = None,
    gene_cut: GeneCut = "two-group",
) -> tuple[np.ndarray | sp.csr_matrix, np.ndarray, Discretizer]:
    """Fit the thresholds on synthetic cells and return (binary genes, binary latents, the fitted rule)."""
    discretizer = fit_discretizer(x, z, quantile, latent_rule, genes, gene_cut)
    return discretizer.genes_binary(x), discretizer.latents_binary(z), discretizer


def _dense_column_blocks(x: Matrix) -> Iterator[np.ndarray]:
    """Yield x as dense float64 column blocks of at most CHUNK_ELEMENTS entries, checking values are finite."""
    x = x.tocsc() if sp.issparse(x) else np.asarray(x)
    width = max(1, CHUNK_ELEMENTS // x.shape[0])
    for start in range(0, x.shape[1], width):
        block = x[:, start:start + width]
        block = block.toarray() if sp.issparse(block) else block
        block = np.asarray(block, dtype=np.float64)
        _check_finite(block, "expression")
        yield block


def _above(x: Matrix, thresholds: np.ndarray) -> np.ndarray | sp.csr_matrix:
    """1 where x > threshold of its column; sparse input gives sparse output unless a threshold is negative."""
    if not sp.issparse(x):
        return (np.asarray(x) > thresholds).astype(np.uint8)
    if (thresholds < 0).any():
        return (x.toarray() > thresholds).astype(np.uint8)
    csr = sp.csr_matrix(x, copy=True)
    csr.sum_duplicates()
    coo = csr.tocoo()
    keep = coo.data > thresholds[coo.col]
    data = np.ones(int(keep.sum()), dtype=np.uint8)
    return sp.csr_matrix((data, (coo.row[keep], coo.col[keep])), shape=x.shape)


def _check_finite(values: np.ndarray, what: str) -> None:
    """Reject NaN or infinite values, which no threshold can order."""
    if not np.isfinite(values).all():
        raise InputError(f"{what} contain NaN or infinite values")
