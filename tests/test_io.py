"""Count readers, validation and atomic writes on small files the tests create, good and broken."""
from __future__ import annotations

import gzip
import logging
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from scdgm.errors import InputError, ScdgmError
from scdgm.pipelines.io import FORMATS, detect_format, read_counts, validate_counts, write_h5ad_atomic

CELLS = [f"cell{i}" for i in range(6)]
GENES = ["CD3D", "MS4A1", "LYZ", "NKG7"]
IDS = [f"ENSG{i:011d}" for i in range(len(GENES))]


@pytest.fixture(scope="module")
def counts() -> np.ndarray:
    """A small cells x genes integer count matrix with zeros and a few large values."""
    rng = np.random.default_rng(0)
    matrix = rng.poisson(2.0, (len(CELLS), len(GENES))) * (rng.random((len(CELLS), len(GENES))) < 0.6)
    matrix[0, 0] = 300
    return matrix.astype(np.int64)


def _gz(path: Path, text: str) -> Path:
    """Write `text` to `path`, gzipped when the name ends in .gz."""
    path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())
    return path


def _mtx_folder(folder: Path, counts: np.ndarray, legacy: bool, extra_feature: bool = False) -> Path:
    """A 10x folder: v3 (gzipped, features.tsv with types) or legacy Cell Ranger 2 (plain genes.tsv)."""
    folder.mkdir(parents=True)
    gz = "" if legacy else ".gz"
    matrix = counts.T  # genes x cells on disk
    features = [f"{i}\t{g}" + ("" if legacy else "\tGene Expression") for i, g in zip(IDS, GENES, strict=True)]
    if extra_feature:
        matrix = np.vstack([matrix, np.arange(1, len(CELLS) + 1)])
        features.append("CD3_TotalSeqB\tCD3\tAntibody Capture")
    scipy.io.mmwrite(folder / "matrix.mtx", sp.coo_matrix(matrix), field="integer")
    if not legacy:
        _gz(folder / "matrix.mtx.gz", (folder / "matrix.mtx").read_text())
        (folder / "matrix.mtx").unlink()
    _gz(folder / f"{'genes' if legacy else 'features'}.tsv{gz}", "\n".join(features) + "\n")
    _gz(folder / f"barcodes.tsv{gz}", "\n".join(CELLS) + "\n")
    return folder


def _h5_10x(path: Path, counts: np.ndarray, barcodes: list[str] = CELLS) -> Path:
    """A Cell Ranger v3 filtered_feature_bc_matrix.h5: genes x cells CSC under /matrix, names under features/."""
    matrix = sp.csc_matrix(counts.T)
    with h5py.File(path, "w") as f:
        group = f.create_group("matrix")
        group.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        group.create_dataset("data", data=matrix.data.astype(np.int32))
        group.create_dataset("indices", data=matrix.indices.astype(np.int64))
        group.create_dataset("indptr", data=matrix.indptr.astype(np.int64))
        group.create_dataset("shape", data=np.array(matrix.shape, dtype=np.int32))
        features = group.create_group("features")
        features.create_dataset("_all_tag_keys", data=np.array(["genome"], dtype="S"))
        features.create_dataset("feature_type", data=np.array(["Gene Expression"] * len(GENES), dtype="S"))
        features.create_dataset("genome", data=np.array(["GRCh38"] * len(GENES), dtype="S"))
        features.create_dataset("id", data=np.array(IDS, dtype="S"))
        features.create_dataset("name", data=np.array(GENES, dtype="S"))
    return path


def _table(path: Path, counts: np.ndarray, sep: str, transpose: bool = False) -> Path:
    """A dense table with a header row and a first column of names (cells x genes, or genes x cells)."""
    frame = pd.DataFrame(counts, index=pd.Index(CELLS, name="cell"), columns=GENES)
    (frame.T.rename_axis("gene") if transpose else frame).to_csv(path, sep=sep)
    return path


def _check(adata: ad.AnnData, counts: np.ndarray) -> None:
    """The reader's contract: cells x genes float32 CSR holding exactly the counts, names kept."""
    assert isinstance(adata.X, sp.csr_matrix) and adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), counts)
    assert list(adata.obs_names) == CELLS and list(adata.var_names) == GENES


def _message(excinfo: pytest.ExceptionInfo) -> str:
    """The error message, which must fit on one line."""
    text = str(excinfo.value)
    assert "\n" not in text
    return text


# --- readers ----------------------------------------------------------------------------------------------


def test_h5ad_with_dense_integer_x(tmp_path: Path, counts: np.ndarray) -> None:
    path = tmp_path / "d.h5ad"
    ad.AnnData(counts, obs=pd.DataFrame(index=CELLS), var=pd.DataFrame({"gene_ids": IDS}, index=GENES)).write_h5ad(path)
    adata = read_counts(path)
    _check(adata, counts)
    assert list(adata.var["gene_ids"]) == IDS


def test_h5ad_takes_counts_layer_over_normalised_x(tmp_path: Path, counts: np.ndarray) -> None:
    path = tmp_path / "d.h5ad"
    normalised = np.log1p(counts / counts.sum(1, keepdims=True).clip(1) * 1e4).astype(np.float32)
    adata = ad.AnnData(normalised, obs=pd.DataFrame(index=CELLS), var=pd.DataFrame(index=GENES))
    adata.layers["counts"] = sp.csr_matrix(counts)
    adata.write_h5ad(path)
    _check(read_counts(path), counts)


@pytest.mark.parametrize("legacy", [False, True], ids=["v3-features-gz", "legacy-genes-tsv"])
def test_10x_mtx_folder(tmp_path: Path, counts: np.ndarray, legacy: bool) -> None:
    folder = _mtx_folder(tmp_path / "filtered", counts, legacy)
    assert detect_format(folder) == "10x-mtx"
    adata = read_counts(folder)
    _check(adata, counts)
    assert list(adata.var["gene_ids"]) == IDS


def test_10x_mtx_keeps_gene_expression_only(tmp_path: Path, counts: np.ndarray) -> None:
    adata = read_counts(_mtx_folder(tmp_path / "f", counts, legacy=False, extra_feature=True))
    _check(adata, counts)


def test_10x_h5(tmp_path: Path, counts: np.ndarray) -> None:
    adata = read_counts(_h5_10x(tmp_path / "filtered_feature_bc_matrix.h5", counts))
    _check(adata, counts)
    assert list(adata.var["gene_ids"]) == IDS


@pytest.mark.parametrize("name,sep", [("c.csv", ","), ("c.csv.gz", ","), ("c.tsv", "\t"), ("c.txt.gz", "\t")])
def test_dense_tables(tmp_path: Path, counts: np.ndarray, name: str, sep: str) -> None:
    _check(read_counts(_table(tmp_path / name, counts, sep)), counts)


def test_table_genes_by_cells_with_transpose(tmp_path: Path, counts: np.ndarray) -> None:
    path = _table(tmp_path / "t.csv", counts, ",", transpose=True)
    _check(read_counts(path, transpose=True), counts)


def test_table_header_without_row_name_title(tmp_path: Path) -> None:
    path = _gz(tmp_path / "r.csv", "g1,g2\nc1,1,0\nc2,0,2\n")  # R's write.csv style
    adata = read_counts(path)
    assert list(adata.var_names) == ["g1", "g2"] and list(adata.obs_names) == ["c1", "c2"]


def test_explicit_format_overrides_the_name(tmp_path: Path, counts: np.ndarray) -> None:
    path = _table(tmp_path / "counts.data", counts, "\t")
    _check(read_counts(path, format="tsv"), counts)


def test_duplicate_gene_names_made_unique_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _gz(tmp_path / "d.csv", "cell,A,B,A,A\nc1,1,2,3,4\n")
    with caplog.at_level(logging.WARNING, logger="scdgm.pipelines.io"):
        adata = read_counts(path)
    assert list(adata.var_names) == ["A", "B", "A-1", "A-2"]
    assert "2 duplicated gene names" in caplog.text


def test_detect_format_from_names(tmp_path: Path) -> None:
    names = {"a.h5ad": "h5ad", "a.h5": "10x-h5", "a.csv": "csv", "a.CSV.GZ": "csv", "a.tsv": "tsv", "a.txt.gz": "tsv"}
    for name, fmt in names.items():
        assert detect_format(tmp_path / name) == fmt
    assert set(names.values()) | {"10x-mtx"} == set(FORMATS)


# --- unusable inputs: one precise line each ---------------------------------------------------------------


def test_unknown_extension_names_path_and_formats(tmp_path: Path) -> None:
    with pytest.raises(ScdgmError) as excinfo:
        detect_format(tmp_path / "counts.xlsx")
    assert "counts.xlsx" in _message(excinfo) and all(fmt in _message(excinfo) for fmt in FORMATS)


def test_folder_without_10x_files(tmp_path: Path) -> None:
    _gz(tmp_path / "matrix.mtx", "")
    with pytest.raises(ScdgmError, match="not a 10x folder: no features.tsv.gz"):
        read_counts(tmp_path)


def test_unknown_format_and_transposed_10x(tmp_path: Path, counts: np.ndarray) -> None:
    path = _table(tmp_path / "c.csv", counts, ",")
    with pytest.raises(ScdgmError, match="unknown format 'loom'"):
        read_counts(path, format="loom")
    with pytest.raises(ScdgmError, match="--transpose does not apply to 10x-h5"):
        read_counts(_h5_10x(tmp_path / "m.h5", counts), transpose=True)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError) as excinfo:
        read_counts(tmp_path / "nope.h5ad")
    assert _message(excinfo) == f"{tmp_path / 'nope.h5ad'} does not exist"


def test_truncated_h5ad(tmp_path: Path, counts: np.ndarray) -> None:
    path = tmp_path / "t.h5ad"
    ad.AnnData(counts.astype(np.float32)).write_h5ad(path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(InputError) as excinfo:
        read_counts(path)
    assert _message(excinfo).startswith(f"{path}: cannot read it as h5ad: ")


def test_garbage_h5(tmp_path: Path) -> None:
    path = tmp_path / "g.h5"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(InputError) as excinfo:
        read_counts(path)
    assert _message(excinfo).startswith(f"{path}: cannot read it as 10x-h5: ")


def test_10x_h5_with_wrong_barcode_count(tmp_path: Path, counts: np.ndarray) -> None:
    with pytest.raises(InputError, match="cannot read it as 10x-h5") as excinfo:
        read_counts(_h5_10x(tmp_path / "m.h5", counts, barcodes=CELLS[:-1]))
    _message(excinfo)


def test_malformed_mtx(tmp_path: Path, counts: np.ndarray) -> None:
    folder = _mtx_folder(tmp_path / "f", counts, legacy=True)
    text = (folder / "matrix.mtx").read_text().splitlines()
    (folder / "matrix.mtx").write_text("\n".join(text[:-2]) + "\n")  # fewer entries than the header says
    with pytest.raises(InputError) as excinfo:
        read_counts(folder)
    assert _message(excinfo).startswith(f"{folder / 'matrix.mtx'}: cannot read it as a Matrix Market file: ValueError")


@pytest.mark.parametrize("role,expected", [("barcodes", "columns (cells)"), ("features", "rows (genes)")])
def test_mtx_names_do_not_match_matrix(tmp_path: Path, counts: np.ndarray, role: str, expected: str) -> None:
    folder = _mtx_folder(tmp_path / "f", counts, legacy=False)
    path = folder / f"{role}.tsv.gz"
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    _gz(path, "\n".join(lines[:-1]) + "\n")
    n = len(lines)
    with pytest.raises(InputError) as excinfo:
        read_counts(folder)
    assert _message(excinfo) == f"{path} has {n - 1} lines but matrix.mtx.gz has {n} {expected}"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("cell,a,b,c\nc1,1,0,3\nc2,0,2\n", "line 3 has 3 fields, expected 4 (rows of different length)"),
        ("cell,a,b,c\nc1,1,0,3\nc2,0,2,1,5\n", "rows of different length"),
        ("cell,a,b,c\nc1,1,0,3,4,5\n", "the header has 4 fields but line 2 has 6 (rows of different length)"),
        ("cell,a,b\nc1,1,x\n", "cannot read it as csv: ValueError: could not convert string to float: 'x'"),
        ("", "is empty"),
        ("cell\nc1\n", "no columns of counts besides the row names"),
        ("cell,a,b\n", "the count matrix is empty: 0 cells x 2 genes"),
    ],
    ids=["short-row", "long-row", "long-first-row", "non-numeric", "empty-file", "no-genes", "no-cells"],
)
def test_bad_tables(tmp_path: Path, text: str, expected: str) -> None:
    path = _gz(tmp_path / "bad.csv", text)
    with pytest.raises(InputError) as excinfo:
        read_counts(path)
    assert _message(excinfo).startswith(str(path)) and expected in _message(excinfo)


# --- validation -------------------------------------------------------------------------------------------


def _adata(matrix: np.ndarray | sp.spmatrix) -> ad.AnnData:
    """Cells c0.. x genes g0.. around `matrix`."""
    n_cells, n_genes = matrix.shape
    return ad.AnnData(matrix, obs=pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]),
                      var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))


@pytest.mark.parametrize("shape", [(0, 3), (3, 0)])
def test_empty_matrix(shape: tuple[int, int]) -> None:
    with pytest.raises(InputError, match=f"empty: {shape[0]} cells x {shape[1]} genes"):
        validate_counts(_adata(sp.csr_matrix(shape, dtype=np.float32)))


@pytest.mark.parametrize("sparse", [True, False], ids=["csr", "dense"])
@pytest.mark.parametrize(
    "bad,expected",
    [
        ([-1.0, -2.0], "2 negative values in the counts, e.g. -1.0 at cell 'c1', gene 'g2'"),
        ([np.nan, np.inf], "2 non-finite values (NaN or infinity) in the counts, e.g. nan at cell 'c1', gene 'g2'"),
        ([0.5, 1.25], "2 non-integer values in the counts, e.g. 0.5 at cell 'c1', gene 'g2'"),
        ([1e12, 2.0**25], "2 counts above 2**24 = 16777216, the largest integer float32 holds exactly, e.g. "
                          "999999995904.0 at cell 'c1', gene 'g2'"),
    ],
    ids=["negative", "non-finite", "non-integer", "beyond-float32"],
)
def test_bad_values_are_counted_and_located(sparse: bool, bad: list[float], expected: str) -> None:
    matrix = np.arange(12, dtype=np.float32).reshape(3, 4)
    matrix[1, 2], matrix[2, 3] = bad
    with pytest.raises(InputError) as excinfo:
        validate_counts(_adata(sp.csr_matrix(matrix) if sparse else matrix))
    assert _message(excinfo).startswith(expected)


def test_non_integer_mentions_the_option_and_the_option_allows_it(tmp_path: Path) -> None:
    path = _gz(tmp_path / "f.tsv", "cell\tg1\tg2\nc1\t0.5\t1\n")
    with pytest.raises(InputError, match="--allow-non-integer"):
        read_counts(path)
    assert read_counts(path, allow_non_integer=True).X[0, 0] == pytest.approx(0.5)
    with pytest.raises(InputError, match="negative"):  # the option allows fractions, never negative counts
        validate_counts(_adata(np.array([[-0.5, 1.0]], dtype=np.float32)), allow_non_integer=True)


def test_integer_and_csc_matrices_validate() -> None:
    validate_counts(_adata(np.array([[0, 3], [1, 0]], dtype=np.int32)))
    with pytest.raises(InputError, match="1 negative values.*cell 'c1', gene 'g0'"):
        validate_counts(_adata(sp.csc_matrix(np.array([[0, 3], [-1, 0]], dtype=np.int64))))
    with pytest.raises(InputError, match=r"1 counts above 2\*\*24.*cell 'c0', gene 'g1'"):
        validate_counts(_adata(sp.csc_matrix(np.array([[0, 2**40], [1, 0]], dtype=np.uint64))))
    validate_counts(_adata(np.array([[0, 2**24], [1, 0]], dtype=np.int64)))  # 2**24 itself is exact in float32


def test_a_csv_with_a_count_beyond_float32_is_one_line(tmp_path: Path) -> None:
    path = _gz(tmp_path / "f.csv", "cell,g1,g2\nc1,1000000000000,1\nc2,0,3\n")
    with pytest.raises(InputError, match=r"f.csv: 1 counts above 2\*\*24.*cell 'c1', gene 'g1'"):
        read_counts(path)


def test_validation_is_fast_on_a_million_cells() -> None:
    n_cells, n_genes, per_cell = 1_000_000, 2000, 10
    rng = np.random.default_rng(0)
    matrix = sp.csr_matrix(
        (rng.integers(1, 50, n_cells * per_cell).astype(np.float32), rng.integers(0, n_genes, n_cells * per_cell),
         np.arange(0, n_cells * per_cell + 1, per_cell)),
        shape=(n_cells, n_genes),
    )
    adata = ad.AnnData(matrix)
    start = time.perf_counter()
    validate_counts(adata)
    assert time.perf_counter() - start < 2.0
    matrix.data[-1] = 0.5
    with pytest.raises(InputError, match=f"1 non-integer values in the counts, e.g. 0.5 at cell '{n_cells - 1}'"):
        validate_counts(adata)


# --- atomic writes ----------------------------------------------------------------------------------------


def test_write_h5ad_atomic_creates_folders_and_round_trips(tmp_path: Path, counts: np.ndarray) -> None:
    frames = {"obs": pd.DataFrame(index=CELLS), "var": pd.DataFrame(index=GENES)}
    adata = ad.AnnData(sp.csr_matrix(counts, dtype=np.float32), **frames)
    path = write_h5ad_atomic(adata, tmp_path / "a" / "b" / "out.h5ad")
    assert path == tmp_path / "a" / "b" / "out.h5ad"
    _check(read_counts(path), counts)
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.h5ad"]


def test_write_h5ad_atomic_failure_leaves_nothing(tmp_path: Path, counts: np.ndarray) -> None:
    adata = ad.AnnData(counts.astype(np.float32))
    adata.uns["unwritable"] = object()
    with pytest.raises(Exception, match="No method registered"):
        write_h5ad_atomic(adata, tmp_path / "out.h5ad")
    assert list(tmp_path.iterdir()) == []
    previous = write_h5ad_atomic(ad.AnnData(counts.astype(np.float32)), tmp_path / "out.h5ad").read_bytes()
    with pytest.raises(Exception, match="No method registered"):
        write_h5ad_atomic(adata, tmp_path / "out.h5ad")
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5ad"] and (tmp_path / "out.h5ad").read_bytes() == previous


def test_write_h5ad_atomic_into_a_file_is_a_user_error(tmp_path: Path, counts: np.ndarray) -> None:
    (tmp_path / "blocker").write_text("a file, not a folder")
    with pytest.raises(ScdgmError, match="cannot write") as excinfo:
        write_h5ad_atomic(ad.AnnData(counts.astype(np.float32)), tmp_path / "blocker" / "out.h5ad")
    _message(excinfo)
