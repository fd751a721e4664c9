"""Count matrices in and out: read the usual single-cell formats into validated AnnData, write .h5ad atomically.

`read_counts` turns .h5ad, 10x folders (matrix.mtx + features/genes.tsv + barcodes.tsv), 10x .h5 and dense
CSV/TSV into AnnData with float32 CSR counts in .X and unique names; every failure is a one-line InputError.
"""
from __future__ import annotations

import contextlib
import csv
import gzip
import logging
import os
import secrets
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from scdgm.errors import InputError, ScdgmError

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

logger = logging.getLogger(__name__)

FORMATS = ("h5ad", "10x-mtx", "10x-h5", "csv", "tsv")
TEXT_SEPARATORS = {"csv": ",", "tsv": "\t"}
TEXT_CHUNK_ENTRIES = 4_000_000  # dense cells x genes values parsed at once from CSV/TSV (~16 MB of float32)
VALIDATION_CHUNK = 1 << 24  # stored values checked at once by validate_counts (bounded temporary memory)
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
    path: str | Path, format: str | None = None, transpose: bool = False, allow_non_integer: bool = False
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


BAD_VALUE_MESSAGES = {
    "non-finite": "{count} non-finite values (NaN or infinity) in the counts, e.g. {example}",
    "negative": "{count} negative values in the counts, e.g. {example}",
    "non-integer": "{count} non-integer values in the counts, e.g. {example}: expected raw counts, not normalised or "
    "log data (pass --allow-non-integer if the data really are non-integer)",
}


def _example(adata: ad.AnnData, position: int, values: np.ndarray) -> str:
    """'VALUE at cell C, gene G' for the `position`-th stored value of .X (CSR/CSC data or dense C order)."""
    import scipy.sparse as sp

    matrix = adata.X
    if sp.issparse(matrix):  # AnnData holds sparse .X only as CSR or CSC
        major = int(np.searchsorted(matrix.indptr, position, side="right") - 1)
        minor = int(matrix.indices[position])
        row, col = (major, minor) if matrix.format == "csr" else (minor, major)
    else:
        row, col = divmod(position, adata.n_vars)
    return f"{values[position]} at cell {adata.obs_names[row]!r}, gene {adata.var_names[col]!r}"


def _bad_value_masks(chunk: np.ndarray, allow_non_integer: bool) -> dict[str, np.ndarray]:
    """Boolean masks of the values in `chunk` that cannot be counts, by problem (see BAD_VALUE_MESSAGES)."""
    if chunk.dtype.kind != "f":
        return {"negative": chunk < 0} if chunk.dtype.kind == "i" else {}
    finite = np.isfinite(chunk)
    masks = {"non-finite": ~finite, "negative": (chunk < 0) & finite}
    if not allow_non_integer:
        masks["non-integer"] = (np.floor(chunk) != chunk) & finite
    return masks


def validate_counts(adata: ad.AnnData, allow_non_integer: bool = False) -> None:
    """Raise InputError unless .X holds a non-empty matrix of finite, non-negative (integer) counts.

    Checks only the stored values of a sparse matrix, vectorised in chunks, so 1M cells x 2000 genes takes
    about a second; the message says how many values are bad and names one cell and gene.
    """
    import scipy.sparse as sp

    matrix = adata.X
    if matrix is None:
        raise InputError("the AnnData has no count matrix in .X")
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(f"the count matrix is empty: {adata.n_obs} cells x {adata.n_vars} genes")
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
            example = _example(adata, position, values)
            raise InputError(BAD_VALUE_MESSAGES[problem].format(count=count, example=example))


def write_h5ad_atomic(adata: ad.AnnData, path: str | Path) -> Path:
    """Write `adata` to `path` through a temporary file in the same folder, so readers never see half a file.

    Creates missing parent folders; on any failure the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.partial.h5ad")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            adata.write_h5ad(temporary)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    except OSError as exc:
        raise ScdgmError(f"cannot write {path}: {_one_line(exc)}") from exc
    return path
