"""The passes of `scdgm prepare` over an .h5ad larger than memory, a chunk of cells at a time (prepare.prepare_streamed
runs them in the order of the in-memory `prepare`).

Pass 1 validates the counts and collects each cell's QC metrics; the QC limits follow from those (per-cell arrays).
Pass 2 counts, over the kept cells, the cells detecting each gene and each gene's sum and sum of squares (mean and
variance); the loess fit of scanpy's seurat_v3 flavour runs on those. Pass 3 sums the clipped counts and their
squares (the standardised variance; zeros enter in closed form), pass 4 writes the kept cells x selected genes. Only
one chunk of `scale.chunk_cells` cells is in memory at a time. For integer counts every figure equals the in-memory
one bit for bit (sums in the same order), so the cells, genes and split are the same.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from scdgm.chunked import H5adRows, H5adWriter
from scdgm.errors import InputError
from scdgm.models.data import validate_counts
from scdgm.pipelines.io import detect_format

LOESS_SPAN = 0.3
"""scanpy's default span of the seurat_v3 loess fit of log10 variance on log10 mean."""
BLOCK_VALUES = 1 << 24
"""Stored values turned into float64 temporaries at once when summing clipped counts (bounded extra memory)."""


def streamed_counts(path: Path, format_: str | None, transpose: bool, scale: dict[str, Any]) -> H5adRows | None:
    """The counts of `path` opened for chunked reading when it is an .h5ad whose counts take more than
    `scale['stream_above_mb']` MB in memory; None when `read_counts` reads it (smaller, or another format)."""
    if not path.is_file() or (format_ or detect_format(path)) != "h5ad":
        return None
    rows = open_counts(path)
    if rows.stored_mb <= scale["stream_above_mb"]:
        rows.close()
        return None
    if transpose:
        rows.close()
        raise InputError(f"{path}: --transpose cannot be streamed (the file holds genes as rows) and its counts take "
                         f"{rows.stored_mb:.0f} MB, more than scale.stream_above_mb; store it cells x genes, or raise "
                         "scale.stream_above_mb to read it in memory")
    return rows


def open_counts(path: Path) -> H5adRows:
    """The raw counts of an .h5ad for chunked reading: layers['counts'] when present (the scverse convention, as
    `read_counts`), else .X."""
    try:
        with h5py.File(path, "r") as file:
            layer = "counts" if "layers/counts" in file else None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .h5ad file ({str(exc).splitlines()[0]})") from None
    return H5adRows(path, layer)


def subset(frame: pd.DataFrame, mask: np.ndarray) -> pd.DataFrame:
    """The rows of `mask`, categories no row uses dropped (as subsetting an AnnData does)."""
    frame = frame.iloc[mask].copy()
    for column, values in frame.items():
        if isinstance(values.dtype, pd.CategoricalDtype):
            frame[column] = values.cat.remove_unused_categories()
    return frame


def chunks(rows: H5adRows, chunk_cells: int, description: str) -> Iterator[tuple[int, sp.csr_matrix]]:
    """(first cell, counts without stored zeros) of consecutive chunks of `rows`, with a progress bar."""
    with tqdm(total=rows.n_cells, desc=description, unit="cell", disable=None, leave=False) as bar:
        for start, chunk in rows.chunks(chunk_cells):
            if (chunk.data == 0).any():
                chunk.eliminate_zeros()
            yield start, chunk
            bar.update(chunk.shape[0])


def kept_chunks(
    rows: H5adRows, keep: np.ndarray, chunk_cells: int, description: str
) -> Iterator[tuple[int, sp.csr_matrix]]:
    """(first cell, counts of its kept cells) of each chunk, in file order."""
    for start, chunk in chunks(rows, chunk_cells, description):
        mask = keep[start : start + chunk.shape[0]]
        yield start, chunk if mask.all() else chunk[mask]


def mito_genes(names: Any) -> np.ndarray:
    """Which of the gene `names` are mitochondrial (start with MT-, any case)."""
    return np.asarray([str(g).upper().startswith("MT-") for g in names], dtype=bool)


def count_metrics(counts: Any, mito: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per cell of float32 CSR `counts` without stored zeros: total counts, genes detected and counts of the `mito`
    genes (None without any); each row's figures depend on that row alone, so chunks of cells give the same."""
    total = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    mito_counts = np.asarray(counts[:, mito].sum(axis=1), dtype=np.float64).ravel() if mito.any() else None
    return total, np.diff(counts.indptr), mito_counts


def cell_counts(
    rows: H5adRows,
    cell_names: pd.Index,
    gene_names: pd.Index,
    mito: np.ndarray,
    chunk_cells: int,
    allow_non_integer: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Pass 1: every chunk validated as `read_counts` validates (the error names the file, cell and gene), and
    each cell's total counts, genes detected and MT- counts (None without MT- genes)."""
    total = np.empty(rows.n_cells, dtype=np.float64)
    n_genes = np.empty(rows.n_cells, dtype=np.int64)
    mito_counts = np.empty(rows.n_cells, dtype=np.float64) if mito.any() else None
    genes = pd.DataFrame(index=gene_names)
    for start, chunk in chunks(rows, chunk_cells, "prepare: validate, QC metrics"):
        stop = start + chunk.shape[0]
        cells = ad.AnnData(X=chunk, obs=pd.DataFrame(index=cell_names[start:stop]), var=genes)
        try:
            validate_counts(cells, allow_non_integer=allow_non_integer)
        except InputError as exc:
            raise InputError(f"{rows.path}: {exc}") from exc
        chunk_total, chunk_genes, chunk_mito = count_metrics(chunk, mito)
        total[start:stop], n_genes[start:stop] = chunk_total, chunk_genes
        if mito_counts is not None:
            mito_counts[start:stop] = chunk_mito
    return total, n_genes, mito_counts


def gene_moments(rows: H5adRows, keep: np.ndarray, chunk_cells: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pass 2, over the kept cells: per gene the cells detecting it, the sum of its counts and the sum of their
    squares (squared in float32 and summed in float64, as scanpy's mean and variance are)."""
    detected = np.zeros(rows.n_genes, dtype=np.int64)
    sums = np.zeros(rows.n_genes, dtype=np.float64)
    squares = np.zeros(rows.n_genes, dtype=np.float64)
    for _, chunk in kept_chunks(rows, keep, chunk_cells, "prepare: gene statistics"):
        detected += np.bincount(chunk.indices, minlength=rows.n_genes)
        sums += np.bincount(chunk.indices, weights=chunk.data, minlength=rows.n_genes)
        squares += np.bincount(chunk.indices, weights=chunk.data * chunk.data, minlength=rows.n_genes)
    return detected, sums, squares


def mean_and_variance(sums: np.ndarray, squares: np.ndarray, n_obs: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and unbiased variance from sums over `n_obs` cells, by scanpy's formula (`_get_mean_var`)."""
    means = sums / n_obs
    variances = squares / n_obs - (sums / n_obs) ** 2
    if n_obs != 1:
        variances *= n_obs / (n_obs - 1)
    return means, variances


def seurat_v3(
    rows: H5adRows,
    keep: np.ndarray,
    genes: np.ndarray,
    means: np.ndarray,
    variances: np.ndarray,
    n_top_genes: int,
    chunk_cells: int,
) -> pd.DataFrame:
    """scanpy's `highly_variable_genes(flavor='seurat_v3')` without batches on the kept cells x `genes`: a loess
    of log10 variance on log10 mean gives each gene's expected spread, counts are clipped at mean + sqrt(cells)
    expected sd, and the variance of the clipped standardised counts ranks the genes (pass 3 sums them). Returns
    the var columns scanpy sets, in its order: highly_variable, highly_variable_rank, means, variances,
    variances_norm."""
    from skmisc.loess import loess

    n_obs = int(keep.sum())
    not_const = variances > 0
    estimat_var = np.zeros(means.size, dtype=np.float64)
    model = loess(np.log10(means[not_const]), np.log10(variances[not_const]), span=LOESS_SPAN, degree=2)
    model.fit()
    estimat_var[not_const] = model.outputs.fitted_values
    reg_std = np.sqrt(10**estimat_var)
    clip_val = reg_std * np.sqrt(n_obs) + means
    clip = np.full(rows.n_genes, np.inf)
    clip[genes] = clip_val
    clipped_sum = np.zeros(rows.n_genes, dtype=np.float64)
    clipped_squares = np.zeros(rows.n_genes, dtype=np.float64)
    for _, chunk in kept_chunks(rows, keep, chunk_cells, "prepare: variable genes"):
        for low in range(0, chunk.nnz, BLOCK_VALUES):  # np.add.at adds in order: the same sums as scanpy's loop
            indices = chunk.indices[low : low + BLOCK_VALUES]
            values = np.minimum(chunk.data[low : low + BLOCK_VALUES].astype(np.float64), clip[indices])
            np.add.at(clipped_sum, indices, values)
            np.add.at(clipped_squares, indices, values**2)
    norm_gene_vars = (1 / ((n_obs - 1) * np.square(reg_std))) * (
        (n_obs * np.square(means)) + clipped_squares[genes] - 2 * clipped_sum[genes] * means
    ).reshape(1, -1)
    ranked = np.argsort(np.argsort(-norm_gene_vars, axis=1), axis=1).astype(np.float32)  # scanpy's ranks and ties
    ranked[ranked >= n_top_genes] = np.nan
    table = pd.DataFrame({
        "highly_variable_rank": np.ma.median(np.ma.masked_invalid(ranked), axis=0).filled(np.nan),
        "highly_variable_nbatches": np.sum((ranked < n_top_genes).astype(int), axis=0),
    })
    order = table.sort_values(["highly_variable_rank", "highly_variable_nbatches"], ascending=[True, False],
                              na_position="last").index
    selected = np.zeros(means.size, dtype=bool)
    selected[order[: int(n_top_genes)]] = True
    return pd.DataFrame({
        "highly_variable": selected,
        "highly_variable_rank": table["highly_variable_rank"].to_numpy(),
        "means": means,
        "variances": variances,
        "variances_norm": np.mean(norm_gene_vars, axis=0).astype("float64", copy=False),
    })


def write_prepared(
    rows: H5adRows,
    out: Path,
    keep: np.ndarray,
    columns: np.ndarray,
    annotations: tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]],
    chunk_cells: int,
) -> None:
    """Pass 4: the kept cells x `columns` (input gene positions) of `rows` written to `out` as X and
    layers['counts'], with `annotations` (obs, var, uns) and the input's obsm rows of the kept cells."""
    obs, var, uns = annotations
    obsm = {key: value[keep] for key, value in ad.io.read_elem(rows.file["obsm"]).items()} if "obsm" in rows.file \
        else {}
    with H5adWriter(out, columns.size, layers=("counts",)) as writer:
        for _, chunk in kept_chunks(rows, keep, chunk_cells, "prepare: write"):
            writer.append(chunk[:, columns])
        writer.finish(obs, var, obsm, uns)
