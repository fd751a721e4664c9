"""Count matrices out of AnnData (checked to be counts), gene alignment by name, the training/validation split,
device choice and mini-batches from sparse data."""
from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from scdgm.errors import InputError

VALIDATION_CHUNK = 1 << 24  # stored values checked at once by validate_counts (bounded temporary memory)
MAX_COUNT = 2**24
"""The largest count accepted per entry: float32, in which models compute, holds every integer up to 2**24
exactly; larger values are refused rather than silently rounded (or overflowing a library size)."""
VALIDATION_FRACTION = 0.1
"""Share of the cells held out for validation (early stopping) when the data have no obs['split']."""
MIN_CELLS_FOR_VALIDATION = 10
CLI_NON_INTEGER_HINT = "pass --allow-non-integer if the data really are non-integer"
BAD_VALUE_MESSAGES = {
    "non-finite": "{count} non-finite values (NaN or infinity) in the counts, e.g. {example}",
    "negative": "{count} negative values in the counts, e.g. {example}",
    "non-integer": "{count} non-integer values in the counts, e.g. {example}: expected raw counts, not normalised or "
    "log data ({hint})",
    "too-large": "{count} counts above 2**24 = 16777216, the largest integer float32 holds exactly, e.g. {example}",
}


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else CPU; an explicit 'cuda' without a GPU is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device={device!r} asked for, but no CUDA device is available")
    return torch.device(device)


def check_device(device: str) -> None:
    """'auto' or a device torch knows by name (cpu, cuda, cuda:1, mps...); whether it exists is checked on use."""
    if device == "auto":
        return
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from None


def layer_name(layer: str | None) -> str:
    """How a count matrix is named in messages: adata.X or adata.layers['NAME']."""
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


def layer_matrix(adata: ad.AnnData, layer: str | None = None) -> np.ndarray | sp.spmatrix:
    """The matrix of `adata.layers[layer]`, or of .X when `layer` is None (not converted)."""
    if layer is not None and layer not in adata.layers:
        present = ", ".join(map(repr, adata.layers.keys())) or "none"
        raise InputError(f"{layer_name(layer)} does not exist (layers present: {present})")
    matrix = adata.X if layer is None else adata.layers[layer]
    if matrix is None:
        raise InputError(f"the AnnData has no count matrix in {layer_name(layer)}")
    return matrix


def counts_view(adata: ad.AnnData, layer: str | None = None) -> ad.AnnData:
    """`adata` itself when `layer` is None, else an AnnData sharing its obs and var whose .X is that layer:
    every model method reads counts from .X, so this is how a layer is read (the input is not modified)."""
    if layer is None:
        return adata
    return ad.AnnData(X=layer_matrix(adata, layer), obs=adata.obs, var=adata.var)


def count_matrix(adata: ad.AnnData) -> sp.csr_matrix:
    """The counts of .X as float32 CSR."""
    return sp.csr_matrix(layer_matrix(adata), dtype=np.float32)


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
    missing = [g for g, s in zip(expected, source, strict=True) if s < 0]
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


STRATA_NOTE = "batch"
"""What `GenerativeModel.fit` stratifies its automatic validation split by (when the model has a batch key)."""


def fit_split(obs: pd.DataFrame, seed: int, strata: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) masks: from obs['split'] when present, else a seeded random split holding out
    VALIDATION_FRACTION of the cells for validation (none below MIN_CELLS_FOR_VALIDATION cells), stratified by
    `strata` (one label per cell: every stratum gives its share), announced with a UserWarning. obs is only
    read: the automatic split is not written anywhere."""
    n_cells = len(obs)
    if "split" in obs:
        split = obs["split"].astype(str).to_numpy()
        train, validation = split == "train", split == "validation"
        if not train.any():
            raise InputError("no training cells: obs['split'] has no 'train' entries")
        return train, validation
    n_validation = round(VALIDATION_FRACTION * n_cells) if n_cells >= MIN_CELLS_FOR_VALIDATION else 0
    validation = np.zeros(n_cells, dtype=bool)
    rng = np.random.default_rng(seed)
    if n_validation:  # every k-th cell of the cells sorted by stratum, randomly within it: strata keep their share
        order = np.lexsort((rng.random(n_cells), np.zeros(n_cells) if strata is None else np.asarray(strata)))
        step = n_cells / n_validation
        validation[order[(rng.random() * step + step * np.arange(n_validation)).astype(np.int64)]] = True
    share = n_validation / max(n_cells, 1)
    warnings.warn(
        f"obs has no 'split' column: training on a random {1 - share:.0%} of the cells and validating (early "
        f"stopping) on the other {share:.0%} ({n_validation} cells, seed {seed}"
        f"{'' if strata is None else ', stratified by ' + STRATA_NOTE}); the AnnData is not modified. "
        "Set obs['split'] to 'train'/'validation'/'test' to choose the cells.",
        UserWarning,
        stacklevel=4,
    )
    return ~validation, validation


def _example(matrix: np.ndarray | sp.spmatrix, adata: ad.AnnData, position: int, values: np.ndarray) -> str:
    """'VALUE at cell C, gene G' for the `position`-th stored value of `matrix` (CSR/CSC data or dense C order)."""
    if sp.issparse(matrix):
        matrix = matrix if matrix.format in ("csr", "csc") else sp.csr_matrix(matrix)
        major = int(np.searchsorted(matrix.indptr, position, side="right") - 1)
        minor = int(matrix.indices[position])
        row, col = (major, minor) if matrix.format == "csr" else (minor, major)
    else:
        row, col = divmod(position, adata.n_vars)
    return f"{values[position]} at cell {adata.obs_names[row]!r}, gene {adata.var_names[col]!r}"


def _bad_value_masks(chunk: np.ndarray, allow_non_integer: bool) -> dict[str, np.ndarray]:
    """Boolean masks of the values in `chunk` that cannot be counts, by problem (see BAD_VALUE_MESSAGES)."""
    if chunk.dtype.kind == "b":
        return {}
    if chunk.dtype.kind != "f":
        masks = {"negative": chunk < 0} if chunk.dtype.kind == "i" else {}
        return {**masks, "too-large": chunk > MAX_COUNT}
    finite = np.isfinite(chunk)
    masks = {"non-finite": ~finite, "negative": (chunk < 0) & finite}
    if not allow_non_integer:
        masks["non-integer"] = (np.floor(chunk) != chunk) & finite
    masks["too-large"] = (chunk > MAX_COUNT) & finite
    return masks


def validate_counts(
    adata: ad.AnnData,
    allow_non_integer: bool = False,
    *,
    layer: str | None = None,
    non_integer_hint: str = CLI_NON_INTEGER_HINT,
) -> None:
    """Raise InputError unless .X (or `layer`) holds a non-empty matrix of finite, non-negative (integer) counts
    of at most MAX_COUNT.

    Checks only the stored values of a sparse matrix, vectorised in chunks, so 1M cells x 2000 genes takes
    about a second; the message says how many values are bad and names one cell and gene, and for
    non-integer values ends with `non_integer_hint` (what the caller can do about it).
    """
    matrix = layer_matrix(adata, layer)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(f"the count matrix is empty: {adata.n_obs} cells x {adata.n_vars} genes")
    if sp.issparse(matrix) and matrix.format not in ("csr", "csc"):
        matrix = sp.csr_matrix(matrix)
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix).reshape(-1)
    if values.dtype.kind not in "biuf":
        raise InputError(f"counts must be numbers, got values of type {values.dtype}")
    found: dict[str, list[int]] = {}  # problem -> [how many, position of the first]
    for start in range(0, values.size, VALIDATION_CHUNK):
        for problem, mask in _bad_value_masks(values[start : start + VALIDATION_CHUNK], allow_non_integer).items():
            count = int(np.count_nonzero(mask))
            tally = found.setdefault(problem, [0, -1])
            if count and tally[1] < 0:
                tally[1] = start + int(np.argmax(mask))
            tally[0] += count
    for problem, (count, position) in found.items():
        if count:
            example = _example(matrix, adata, position, values)
            raise InputError(BAD_VALUE_MESSAGES[problem].format(count=count, example=example, hint=non_integer_hint))


def training_counts(adata: ad.AnnData, layer: str | None = None) -> sp.csr_matrix:
    """The counts a model is fitted on (float32 CSR), checked to be raw counts; the error names the layer and,
    for normalised or log data, says to fit on the raw counts' layer."""
    try:
        validate_counts(
            adata, layer=layer, non_integer_hint="fit on the raw counts, e.g. model.fit(adata, layer='counts')"
        )
    except InputError as exc:
        raise InputError(f"{layer_name(layer)}: {exc}") from None
    return sp.csr_matrix(layer_matrix(adata, layer), dtype=np.float32)


@dataclass
class Batch:
    """One mini-batch on the training device: counts, log library size, batch code and cell indices."""

    x: torch.Tensor
    log_library: torch.Tensor
    batch_index: torch.Tensor | None
    index: torch.Tensor
    whole: bool | None = None
    """Whether every count is a whole number, if known for the whole data set (None: not known), so that
    likelihoods need not check each batch."""
    log_x: torch.Tensor | None = None
    """log1p(x), when taken from a copy made once for the data set (the encoders' input), else None."""

    def encoder_input(self) -> torch.Tensor:
        """log1p(x): the copy made for the data set if there is one, else computed."""
        return self.log_x if self.log_x is not None else torch.log1p(self.x)


class CountBatches:
    """Mini-batches straight from a CSR count matrix: row slicing and densification happen in C, per batch.

    Small matrices are moved to the device once as a dense tensor (fastest, also on GPU); large ones stay
    sparse on the host and only the current batch is densified, so memory is the sparse matrix plus a batch.
    `whole` says whether every count is a whole number, if known (training counts are checked to be): each batch
    carries it, so likelihoods need not check.
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
        whole: bool | None = None,
    ) -> None:
        if counts.shape[0] == 0:
            raise InputError("no cells to batch")
        self.device = torch.device(device)
        self.n_cells, self.n_genes = counts.shape
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last and self.n_cells > self.batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.log_library = torch.from_numpy(log_library_of(counts)).to(self.device)
        self.batch_codes = (
            torch.from_numpy(np.asarray(batch_codes, dtype=np.int64)).to(self.device) if batch_codes is not None else None
        )
        dense_bytes = counts.shape[0] * counts.shape[1] * 4
        self.dense = (
            torch.from_numpy(counts.toarray()).to(self.device) if dense_bytes <= self.DENSE_LIMIT else None
        )
        self.sparse = None if self.dense is not None else counts
        self.whole = whole

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
        index = torch.arange(start, stop)
        return Batch(x=x, log_library=self.log_library[rows], batch_index=codes, index=index, whole=self.whole)

    def take(self, index: torch.Tensor) -> Batch:
        """The batch made of the given cell indices; on dense data it also carries log1p(x), from a copy made for
        the data set on the first call (one gather per batch instead of a log1p pass)."""
        device_index = index.to(self.device)
        codes = self.batch_codes.index_select(0, device_index) if self.batch_codes is not None else None
        log_library = self.log_library.index_select(0, device_index)
        if self.dense is None:
            x = torch.from_numpy(self.sparse[index.numpy()].toarray()).to(self.device, non_blocking=True)
            return Batch(x=x, log_library=log_library, batch_index=codes, index=index, whole=self.whole)
        log_dense = self.__dict__.get("_log_dense")
        if log_dense is None:
            log_dense = self._log_dense = torch.log1p(self.dense)
        x, log_x = self.dense.index_select(0, device_index), log_dense.index_select(0, device_index)
        return Batch(x=x, log_library=log_library, batch_index=codes, index=index, whole=self.whole, log_x=log_x)


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


class RowSource(Protocol):
    """Cells' counts read a range of rows at a time, e.g. an .h5ad on disk (scdgm.chunked.H5adRows)."""

    @property
    def n_cells(self) -> int: ...

    @property
    def n_genes(self) -> int: ...

    def read(self, start: int, stop: int) -> sp.csr_matrix: ...


STREAM_BLOCK = 1024
"""Consecutive cells read together when training batches are drawn from disk: blocks are shuffled, then the cells
of `chunk_cells / STREAM_BLOCK` blocks are shuffled together, so a batch mixes cells from all over the file."""


class StreamedCounts:
    """Counts of some cells of a `RowSource` (`rows`: sorted row numbers, None = all), read `chunk_cells` at a
    time with their columns in `genes` order: what fitting, embedding and sampling read instead of an in-memory
    matrix when the data are larger than memory. Memory is bounded by `chunk_cells`, not by the cells."""

    def __init__(
        self,
        source: RowSource,
        source_genes: Sequence[str],
        genes: Sequence[str] | None = None,
        rows: np.ndarray | None = None,
        chunk_cells: int = 65_536,
    ) -> None:
        self.source = source
        self.source_genes = [str(g) for g in source_genes]
        self.genes = self.source_genes if genes is None else [str(g) for g in genes]
        self.rows = np.arange(source.n_cells, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        self.chunk_cells = int(chunk_cells)
        if self.chunk_cells < 1:
            raise InputError(f"chunk_cells must be at least 1, got {chunk_cells}")
        self.selector = None
        if self.genes != self.source_genes:
            empty = sp.csr_matrix((0, len(self.source_genes)), dtype=np.float32)
            _, missing, _ = align_genes(empty, self.source_genes, self.genes, 0.0)
            position = {g: i for i, g in enumerate(self.source_genes)}
            source_columns = np.array([position[g] for g in self.genes], dtype=np.int64)
            self.selector = sp.csr_matrix(
                (np.ones(len(self.genes), dtype=np.float32), (source_columns, np.arange(len(self.genes)))),
                shape=(len(self.source_genes), len(self.genes)),
            )

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.rows.size), len(self.genes)

    def subset(self, mask: np.ndarray) -> StreamedCounts:
        """The cells of `mask` (one flag per cell of this set), read from the same source."""
        return StreamedCounts(self.source, self.source_genes, self.genes, self.rows[np.asarray(mask)], self.chunk_cells)

    def take(self, start: int, stop: int) -> sp.csr_matrix:
        """Cells start..stop-1 of this set as float32 CSR in `genes` order, read from the source in ranges of at
        most `chunk_cells` rows."""
        wanted = self.rows[start:stop]
        parts = []
        if wanted.size:
            first, last = int(wanted[0]), int(wanted[-1]) + 1
            for low in range(first, last, self.chunk_cells):
                high = min(low + self.chunk_cells, last)
                inside = wanted[np.searchsorted(wanted, low) : np.searchsorted(wanted, high)]
                if inside.size:
                    block = self.source.read(low, high)
                    parts.append(block if inside.size == high - low else block[inside - low])
        matrix = sp.vstack(parts, format="csr") if len(parts) > 1 else (
            parts[0] if parts else sp.csr_matrix((0, len(self.source_genes)), dtype=np.float32)
        )
        if self.selector is not None:
            matrix = sp.csr_matrix(matrix @ self.selector)
        return sp.csr_matrix(matrix, dtype=np.float32)

    def chunks(self) -> Iterator[tuple[int, sp.csr_matrix]]:
        """(first cell, counts) of consecutive chunks of at most `chunk_cells` cells of this set."""
        for start in range(0, self.shape[0], self.chunk_cells):
            yield start, self.take(start, min(start + self.chunk_cells, self.shape[0]))

    def validate(self, obs_names: Sequence[str], allow_non_integer: bool = False, hint: str = CLI_NON_INTEGER_HINT) -> None:
        """`validate_counts` chunk by chunk; the error names the cell (from `obs_names`, one per cell of the
        source) and gene."""
        if self.shape[0] == 0 or self.shape[1] == 0:
            raise InputError(f"the count matrix is empty: {self.shape[0]} cells x {self.shape[1]} genes")
        obs_names = np.asarray(obs_names)
        for start, chunk in self.chunks():
            names = pd.Index(obs_names[self.rows[start : start + chunk.shape[0]]])
            cells = ad.AnnData(X=chunk, obs=pd.DataFrame(index=names.astype(str)), var=pd.DataFrame(index=self.genes))
            validate_counts(cells, allow_non_integer, non_integer_hint=hint)


Counts = sp.csr_matrix | StreamedCounts
"""Cells' counts as a model reads them: in memory (float32 CSR) or streamed from disk."""


def count_chunks(counts: Counts) -> Iterator[sp.csr_matrix]:
    """The counts in row chunks: an in-memory matrix as one chunk, streamed ones `chunk_cells` at a time."""
    if isinstance(counts, StreamedCounts):
        for _, chunk in counts.chunks():
            yield chunk
    else:
        yield counts


def subset_counts(counts: Counts, mask: np.ndarray) -> Counts:
    """The cells of `mask`: a row selection in memory, or a narrower streamed set."""
    return counts.subset(mask) if isinstance(counts, StreamedCounts) else counts[mask]


def log_library_of(counts: sp.csr_matrix) -> np.ndarray:
    """log total counts of each cell (at least log 1), float32: the observed library size of the models."""
    library = np.asarray(counts.sum(axis=1)).ravel()
    return np.log(np.maximum(library, 1.0)).astype(np.float32)


class StreamBatches:
    """Mini-batches of `StreamedCounts`, drawn from disk: the `CountBatches` of data larger than memory.

    In order (inference), chunks are read one after the other. Shuffled (training), the cells' blocks of
    STREAM_BLOCK are permuted each epoch and read `chunk_cells` cells at a time, whose cells are permuted again
    before batching (the last cells of a window wait for the next), so memory holds one window. `log_library`
    and `batch_codes` cover every cell (one pass over the data when built).
    """

    def __init__(
        self,
        counts: StreamedCounts,
        batch_codes: np.ndarray | None = None,
        batch_size: int = 128,
        shuffle: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
        whole: bool | None = None,
    ) -> None:
        self.counts = counts
        self.n_cells, self.n_genes = counts.shape
        if self.n_cells == 0:
            raise InputError("no cells to batch")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last and self.n_cells > self.batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.whole = whole
        self.log_library = torch.from_numpy(np.concatenate([log_library_of(c) for c in count_chunks(counts)]))
        self.log_library = self.log_library.to(self.device)
        self.batch_codes = (
            torch.from_numpy(np.asarray(batch_codes, dtype=np.int64)).to(self.device) if batch_codes is not None else None
        )

    def __len__(self) -> int:
        full, rest = divmod(self.n_cells, self.batch_size)
        return full if (self.drop_last or rest == 0) else full + 1

    def _batch(self, matrix: sp.csr_matrix, positions: np.ndarray) -> Batch:
        """The batch of the rows of `matrix` holding cells `positions` (row i of matrix = positions[i])."""
        x = torch.from_numpy(matrix.toarray()).to(self.device, non_blocking=True)
        index = torch.from_numpy(positions)
        device_index = index.to(self.device)
        codes = self.batch_codes.index_select(0, device_index) if self.batch_codes is not None else None
        log_library = self.log_library.index_select(0, device_index)
        return Batch(x=x, log_library=log_library, batch_index=codes, index=index, whole=self.whole)

    def _windows(self) -> Iterator[tuple[sp.csr_matrix, np.ndarray]]:
        """(counts, cell positions) of successive windows: chunks in order, or shuffled blocks, cells permuted."""
        if not self.shuffle:
            for start, chunk in self.counts.chunks():
                yield chunk, np.arange(start, start + chunk.shape[0], dtype=np.int64)
            return
        n_blocks = -(-self.n_cells // STREAM_BLOCK)
        order = torch.randperm(n_blocks, generator=self.generator).numpy()
        per_window = max(1, self.counts.chunk_cells // STREAM_BLOCK)
        for first in range(0, n_blocks, per_window):
            blocks = np.sort(order[first : first + per_window])
            parts, positions = [], []
            for block in blocks:
                start, stop = int(block) * STREAM_BLOCK, min((int(block) + 1) * STREAM_BLOCK, self.n_cells)
                parts.append(self.counts.take(start, stop))
                positions.append(np.arange(start, stop, dtype=np.int64))
            matrix, cells = sp.vstack(parts, format="csr"), np.concatenate(positions)
            mix = torch.randperm(cells.size, generator=self.generator).numpy()
            yield matrix[mix], cells[mix]

    def __iter__(self) -> Iterator[Batch]:
        left: tuple[sp.csr_matrix, np.ndarray] | None = None
        for matrix, cells in self._windows():
            if left is not None:
                matrix, cells = sp.vstack([left[0], matrix], format="csr"), np.concatenate([left[1], cells])
            usable = cells.size - cells.size % self.batch_size
            for start in range(0, usable, self.batch_size):
                yield self._batch(matrix[start : start + self.batch_size], cells[start : start + self.batch_size])
            left = (matrix[usable:], cells[usable:]) if usable < cells.size else None
        if left is not None and not self.drop_last:
            yield self._batch(*left)


def make_batches(
    counts: Counts,
    batch_codes: np.ndarray | None = None,
    batch_size: int = 128,
    shuffle: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
    drop_last: bool = False,
    whole: bool | None = None,
) -> CountBatches | StreamBatches:
    """Mini-batches of in-memory counts (`CountBatches`) or of counts streamed from disk (`StreamBatches`)."""
    kind = StreamBatches if isinstance(counts, StreamedCounts) else CountBatches
    return kind(counts, batch_codes=batch_codes, batch_size=batch_size, shuffle=shuffle, seed=seed, device=device,
                drop_last=drop_last, whole=whole)
