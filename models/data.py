"""Count matrices out of AnnData, gene alignment by name, device choice and mini-batches from sparse data."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

from scdgm.errors import InputError


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; an explicit 'cuda' without a GPU is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device={device!r} asked for, but no CUDA device is available")
    return torch.device(device)


def count_matrix(adata: ad.AnnData) -> sp.csr_matrix:
    """Raw counts as float32 CSR: layers['counts'] when present, else .X."""
    matrix = adata.layers["counts"] if "counts" in adata.layers else adata.X
    if matrix is None:
        raise InputError("the AnnData has no count matrix (.X and layers['counts'] are empty)")
    return sp.csr_matrix(matrix, dtype=np.float32)


def align_genes(
    matrix: sp.csr_matrix, genes: Sequence[str], expected: Sequence[str], max_missing_fraction: float = 1.0
) -> tuple[sp.csr_matrix, list[str], int]:
    """Reorder columns of `matrix` (named `genes`) to `expected`; missing genes become zero columns.

    Returns the aligned matrix, the missing gene names and the number of unknown genes that were dropped.
    Raises when more than `max_missing_fraction` of the expected genes are missing.
    """
    position = {g: i for i, g in enumerate(genes)}
    if len(position) != len(genes):
        raise InputError("gene names are not unique")
    source = np.array([position.get(g, -1) for g in expected], dtype=np.int64)
    missing = [g for g, s in zip(expected, source) if s < 0]
    if len(expected) and len(missing) / len(expected) > max_missing_fraction:
        raise InputError(
            f"{len(missing)} of {len(expected)} expected genes are missing (more than "
            f"{max_missing_fraction:.0%}); first missing: {', '.join(missing[:5])}"
        )
    unknown = len(set(genes) - set(expected))
    if not missing and np.array_equal(source, np.arange(len(genes))):
        return matrix, missing, unknown
    present = source >= 0
    selector = sp.csr_matrix(
        (np.ones(int(present.sum()), dtype=np.float32), (source[present], np.flatnonzero(present))),
        shape=(matrix.shape[1], len(expected)),
    )
    return sp.csr_matrix(matrix @ selector), missing, unknown


def model_counts(adata: ad.AnnData, genes: Sequence[str]) -> sp.csr_matrix:
    """Counts of `adata` with columns in the model's gene order (all genes must be present)."""
    matrix, missing, _ = align_genes(count_matrix(adata), list(map(str, adata.var_names)), genes, 0.0)
    return matrix


def split_mask(adata: ad.AnnData, split: str | None) -> np.ndarray:
    """Boolean mask of the cells in `split`; all cells when `split` is None or obs has no 'split' column."""
    if split is None or "split" not in adata.obs:
        return np.ones(adata.n_obs, dtype=bool)
    mask = (adata.obs["split"].astype(str) == split).to_numpy()
    return mask


@dataclass
class Batch:
    """One mini-batch on the training device: counts, log library size, batch code and cell indices."""

    x: torch.Tensor
    log_library: torch.Tensor
    batch_index: torch.Tensor | None
    index: torch.Tensor


class CountBatches:
    """Mini-batches straight from a CSR count matrix: row slicing and densification happen in C, per batch.

    Small matrices are moved to the device once as a dense tensor (fastest, also on GPU); large ones stay
    sparse on the host and only the current batch is densified, so memory is the sparse matrix plus a batch.
    """

    DENSE_LIMIT = 2**28  # bytes of dense float32 kept on the device at most

    def __init__(
        self,
        counts: sp.csr_matrix,
        batch_codes: np.ndarray | None = None,
        batch_size: int = 128,
        shuffle: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
    ) -> None:
        if counts.shape[0] == 0:
            raise InputError("no cells to batch")
        self.device = torch.device(device)
        self.n_cells = counts.shape[0]
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last and self.n_cells > self.batch_size
        self.generator = torch.Generator().manual_seed(seed)
        library = np.asarray(counts.sum(axis=1)).ravel()
        self.log_library = torch.from_numpy(np.log(np.maximum(library, 1.0)).astype(np.float32)).to(self.device)
        self.batch_codes = (
            torch.from_numpy(np.asarray(batch_codes, dtype=np.int64)).to(self.device) if batch_codes is not None else None
        )
        dense_bytes = counts.shape[0] * counts.shape[1] * 4
        self.dense = (
            torch.from_numpy(counts.toarray()).to(self.device) if dense_bytes <= self.DENSE_LIMIT else None
        )
        self.sparse = None if self.dense is not None else counts

    def __len__(self) -> int:
        full, rest = divmod(self.n_cells, self.batch_size)
        return full if (self.drop_last or rest == 0) else full + 1

    def __iter__(self) -> Iterator[Batch]:
        starts = range(0, len(self) * self.batch_size, self.batch_size)
        if not self.shuffle:
            for start in starts:
                yield self.take_range(start, min(start + self.batch_size, self.n_cells))
            return
        order = torch.randperm(self.n_cells, generator=self.generator)
        for start in starts:
            yield self.take(order[start : start + self.batch_size])

    def take_range(self, start: int, stop: int) -> Batch:
        """The batch of cells start..stop-1 in order, as views where the data are dense (no gather, no copy)."""
        rows = slice(start, stop)
        if self.dense is not None:
            x = self.dense[rows]
        else:
            x = torch.from_numpy(self.sparse[rows].toarray()).to(self.device, non_blocking=True)
        codes = self.batch_codes[rows] if self.batch_codes is not None else None
        return Batch(x=x, log_library=self.log_library[rows], batch_index=codes, index=torch.arange(start, stop))

    def take(self, index: torch.Tensor) -> Batch:
        """The batch made of the given cell indices."""
        device_index = index.to(self.device)
        if self.dense is not None:
            x = self.dense.index_select(0, device_index)
        else:
            x = torch.from_numpy(self.sparse[index.numpy()].toarray()).to(self.device, non_blocking=True)
        codes = self.batch_codes.index_select(0, device_index) if self.batch_codes is not None else None
        return Batch(x=x, log_library=self.log_library.index_select(0, device_index), batch_index=codes, index=index)


def log_normalize(x: torch.Tensor, target_sum: float = 1e4) -> torch.Tensor:
    """log1p(counts / library size × target_sum), the usual log-normalised expression, per row."""
    library = x.sum(dim=-1, keepdim=True).clamp(min=1.0)
    return torch.log1p(x / library * target_sum)


def expression_to_counts(
    log_expression: torch.Tensor, log_library: torch.Tensor, target_sum: float = 1e4, noise: str = "poisson"
) -> torch.Tensor:
    """Counts from log-normalised expression and library sizes: expm1(y) × library / target_sum, then either
    Poisson draws ('poisson') or unbiased stochastic rounding ('round': floor plus a Bernoulli on the rest)."""
    mean = torch.expm1(log_expression).clamp(min=0.0) * (log_library.exp() / target_sum).unsqueeze(-1)
    if noise == "poisson":
        return torch.poisson(mean)
    if noise == "round":
        floor = mean.floor()
        return floor + (torch.rand_like(mean) < mean - floor).to(mean.dtype)
    raise InputError(f"count noise must be 'poisson' or 'round', got {noise!r}")
