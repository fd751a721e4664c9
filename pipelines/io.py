"""Count matrices in and out: read the usual single-cell formats into validated AnnData, write .h5ad atomically.

`read_counts` turns .h5ad, 10x folders (matrix.mtx + features/genes.tsv + barcodes.tsv), 10x .h5 and dense
CSV/TSV into AnnData with float32 CSR counts in .X and unique names; every failure is a one-line InputError.
"""
from __future__ import annotations

import contextlib
import csv
import gzip
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from scdgm.errors import InputError, ScdgmError
from scdgm.files import write_with
from scdgm.models.data import validate_counts

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

logger = logging.getLogger(__name__)

FORMATS = ("h5ad", "10x-mtx", "10x-h5", "csv", "tsv")
TEXT_SEPARATORS = {"csv": ",", "tsv": "\t"}
TEXT_CHUNK_ENTRIES = 4_000_000  # dense cells x genes values parsed at once from CSV/TSV (~16 MB of float32)
MTX_FILES = {
    "matrix": ("matrix.mtx.gz", "matrix.mtx"),
    "features": ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"),
    "barcodes": ("barcodes.tsv.gz", "barcodes.tsv"),
}
MTX_HINT = "a 10x folder holds matrix.mtx[.gz], features.tsv[.gz] (or genes.tsv[.gz]) and barcodes.tsv[.gz]"


def _one_line(exc: BaseException) -> str:
    """An exception as 'Type: message' on one line, cut to a readable length."""
    text = " ".join(str(exc).split())
    return f"{exc.__class__.__name__}: {text[:300]}" if text else exc.__class__.__name__


def _mtx_files(folder: Path) -> dict[str, Path]:
    """The matrix, features and barcodes files of a 10x folder; a missing one is a user error naming it."""
    found: dict[str, Path] = {}
    for role, names in MTX_FILES.items():
        candidates = [folder / name for name in names if (folder / name).is_file()]
        if not candidates:
            raise ScdgmError(
                f"{folder} is a folder but not a 10x folder: no {' / '.join(names)} in it ({MTX_HINT}); "
                f"readable formats: {', '.join(FORMATS)}"
            )
        found[role] = candidates[0]
    return found


def detect_format(path: str | Path) -> str:
    """Tell the format of `path` from its name (or, for a folder, from the 10x files in it)."""
    path = Path(path)
    if path.is_dir():
        _mtx_files(path)
        return "10x-mtx"
    name = path.name.lower().removesuffix(".gz")
    for suffixes, fmt in (((".h5ad",), "h5ad"), ((".h5",), "10x-h5"), ((".csv",), "csv"), ((".tsv", ".txt"), "tsv")):
        if name.endswith(suffixes):
            return fmt
    raise ScdgmError(
        f"cannot tell the format of {path} from its name; readable formats: {', '.join(FORMATS)} "
        "(.h5ad, a 10x folder, .h5, .csv[.gz], .tsv/.txt[.gz]); name one with --format"
    )


@contextlib.contextmanager
def _reading(path: Path, fmt: str) -> Iterator[None]:
    """Turn any reader failure (corrupt, truncated, malformed file) into a one-line InputError."""
    try:
        yield
    except (ScdgmError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - third-party readers raise anything; the user gets one line
        raise InputError(f"{path}: cannot read it as {fmt}: {_one_line(exc)}") from exc


def _read_h5ad(path: Path) -> ad.AnnData:
    """An .h5ad file; raw counts in layers['counts'] (the scverse convention) take the place of .X."""
    import anndata as ad

    adata = ad.read_h5ad(path)
    if "counts" in adata.layers:
        logger.info("%s: using layers['counts'] as the counts", path)
        adata.X = adata.layers.pop("counts")
    if adata.X is None:
        raise InputError(f"{path}: the AnnData has no count matrix (.X and layers['counts'] are empty)")
    return adata


def _read_name_table(path: Path) -> pd.DataFrame:
    """A header-less tab-separated table of names (10x features/barcodes), every field a string."""
    import pandas as pd

    return pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False)


def _read_10x_mtx(folder: Path) -> ad.AnnData:
    """A 10x folder (Cell Ranger v2 genes.tsv or v3 features.tsv, gzipped or not); keeps Gene Expression rows."""
    import anndata as ad
    import pandas as pd
    import scipy.io

    files = _mtx_files(folder)
    with _reading(files["matrix"], "a Matrix Market file"):
        matrix = scipy.io.mmread(files["matrix"])  # genes x cells
    features = _read_name_table(files["features"])
    barcodes = _read_name_table(files["barcodes"])
    n_genes, n_cells = matrix.shape
    sizes = (("features", features, n_genes, "rows (genes)"), ("barcodes", barcodes, n_cells, "columns (cells)"))
    for role, table, expected, axis in sizes:
        if len(table) != expected:
            raise InputError(
                f"{files[role]} has {len(table)} lines but {files['matrix'].name} has {expected} {axis}"
            )
    symbols = features[1] if features.shape[1] > 1 else features[0]
    var = pd.DataFrame({"gene_ids": features[0].to_numpy()}, index=symbols.to_numpy())
    if features.shape[1] > 2:
        var["feature_types"] = features[2].to_numpy()
    adata = ad.AnnData(X=matrix.T.tocsr(), obs=pd.DataFrame(index=barcodes[0].to_numpy()), var=var)
    keep = (var["feature_types"] == "Gene Expression").to_numpy() if "feature_types" in var else None
    if keep is not None and not keep.all():
        logger.warning("%s: kept the %d Gene Expression features, dropped %d others", folder, keep.sum(), (~keep).sum())
        adata = adata[:, keep].copy()
    return adata


def _read_10x_h5(path: Path) -> ad.AnnData:
    """A Cell Ranger .h5 (v3 or legacy) through scanpy, keeping Gene Expression features."""
    import scanpy as sc

    return sc.read_10x_h5(path)


def _open_text(path: Path) -> TextIO:
    """Open a text table, gzipped or not."""
    return gzip.open(path, "rt", newline="") if path.name.lower().endswith(".gz") else open(path, newline="")


def _check_row_lengths(path: Path, sep: str, expected: int) -> None:
    """Raise on the first row whose field count differs from `expected` (pandas pads short rows with NaN)."""
    with _open_text(path) as handle:
        for line, row in enumerate(csv.reader(handle, delimiter=sep), start=1):
            if line > 1 and row and len(row) != expected:
                raise InputError(
                    f"{path}: line {line} has {len(row)} fields, expected {expected} (rows of different length)"
                )


def _read_text(path: Path, fmt: str) -> ad.AnnData:
    """A dense table: a header row of column names, a first column of row names, numbers elsewhere.

    The header may omit the row-name column's title (R's write.csv style). Parsed in chunks of rows into
    float32 CSR so a wide table never exists as one dense float64 array.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    sep = TEXT_SEPARATORS[fmt]
    with _open_text(path) as handle:
        rows = csv.reader(handle, delimiter=sep)
        header, first = next(rows, None), next(rows, None)
    if not header:
        raise InputError(f"{path} is empty")
    n_fields = len(first) if first else len(header)
    if n_fields not in (len(header), len(header) + 1):
        raise InputError(
            f"{path}: the header has {len(header)} fields but line 2 has {n_fields} (rows of different length)"
        )
    columns = header[len(header) + 1 - n_fields :]
    if not columns:
        raise InputError(f"{path}: no columns of counts besides the row names")
    if first is None:
        return ad.AnnData(X=sp.csr_matrix((0, len(columns)), dtype=np.float32), var=pd.DataFrame(index=columns))
    chunk_rows = max(1, TEXT_CHUNK_ENTRIES // len(columns))
    dtypes: dict[int, Any] = {0: str, **{i: np.float32 for i in range(1, n_fields)}}
    names: list[str] = []
    blocks: list[sp.csr_matrix] = []
    try:
        with pd.read_csv(
            path, sep=sep, header=None, skiprows=1, index_col=0, dtype=dtypes, chunksize=chunk_rows,
            keep_default_na=False, na_values=["", "NA", "NaN", "nan"],  # other text fails as non-numeric
        ) as reader:
            for chunk in reader:
                names.extend(chunk.index)
                blocks.append(sp.csr_matrix(chunk.to_numpy(dtype=np.float32)))
    except pd.errors.ParserError as exc:
        raise InputError(f"{path}: rows of different length ({' '.join(str(exc).split())})") from exc
    matrix = sp.vstack(blocks, format="csr") if len(blocks) > 1 else blocks[0]
    if np.isnan(matrix.data).any():
        _check_row_lengths(path, sep, n_fields)
    return ad.AnnData(X=matrix, obs=pd.DataFrame(index=names), var=pd.DataFrame(index=columns))


def _as_float32_csr(matrix: Any) -> sp.csr_matrix:
    """Any dense or sparse matrix as float32 CSR, copying only when the type or layout differs."""
    import scipy.sparse as sp

    if not sp.issparse(matrix):
        return sp.csr_matrix(np.asarray(matrix, dtype=np.float32))
    matrix = sp.csr_matrix(matrix)
    return matrix if matrix.dtype == np.float32 else matrix.astype(np.float32)


def _make_unique(adata: ad.AnnData, path: Path) -> None:
    """Make duplicated gene (and cell) names unique by appending -1, -2...; warn how many were duplicated."""
    for axis, names, fix in (
        ("gene", adata.var_names, adata.var_names_make_unique),
        ("cell", adata.obs_names, adata.obs_names_make_unique),
    ):
        duplicated = names.duplicated()
        if duplicated.any():
            logger.warning(
                "%s: %d duplicated %s names made unique by appending -1, -2, ... (e.g. %r)",
                path, duplicated.sum(), axis, names[duplicated][0],
            )
            fix()


READERS = {"h5ad": _read_h5ad, "10x-mtx": _read_10x_mtx, "10x-h5": _read_10x_h5}


def read_counts(
    path: str | Path, format: str | None = None, transpose: bool = False, allow_non_integer: bool = False  # noqa: A002 - the --format option's name
) -> ad.AnnData:
    """Read a count matrix (any of FORMATS; detected from the path unless given) as validated AnnData.

    Returns cells x genes with float32 CSR counts in .X and unique names. `transpose` reads a table or
    .h5ad stored genes x cells. Raises InputError/ScdgmError with one line for any unusable input.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise ScdgmError(f"unknown format {fmt!r}; readable formats: {', '.join(FORMATS)}")
    if transpose and fmt.startswith("10x"):
        raise ScdgmError(f"--transpose does not apply to {fmt}: 10x files always read as cells x genes")
    with _reading(path, fmt), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*names are not unique")
        adata = READERS[fmt](path) if fmt in READERS else _read_text(path, fmt)
        if transpose:
            adata = adata.T
        adata.X = _as_float32_csr(adata.X)
    _make_unique(adata, path)
    try:
        validate_counts(adata, allow_non_integer=allow_non_integer)
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from exc
    return adata


def write_h5ad_atomic(adata: ad.AnnData, path: str | Path) -> Path:
    """Write `adata` to `path` atomically (scdgm.files): readers never see half a file, and on any failure
    `path` is untouched. Creates missing parent folders."""
    try:
        return write_with(path, adata.write_h5ad)
    except OSError as exc:  # raised by h5py while writing the temporary file
        raise ScdgmError(f"cannot write {path}: {_one_line(exc)}") from exc
