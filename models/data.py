"""Count matrices out of AnnData (checked to be counts), gene alignment by name, the training/validation split,
device choice and mini-batches from sparse data."""
from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

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
        stacklevel=3,
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
        """The batch made of the given cell indices."""
        device_index = index.to(self.device)
        if self.dense is not None:
            x = self.dense.index_select(0, device_index)
        else:
            x = torch.from_numpy(self.sparse[index.numpy()].toarray()).to(self.device, non_blocking=True)
        codes = self.batch_codes.index_select(0, device_index) if self.batch_codes is not None else None
        log_library = self.log_library.index_select(0, device_index)
        return Batch(x=x, log_library=log_library, batch_index=codes, index=index, whole=self.whole)


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
