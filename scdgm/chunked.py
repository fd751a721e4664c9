""".h5ad files read and written a chunk of cells at a time, so memory is bounded by the chunk, not the data.

`H5adRows` reads obs, var and rows of the count matrix (.X or a layer, CSR or dense) of an .h5ad without loading
the matrix; `H5adWriter` appends CSR chunks to a new .h5ad beside its target and renames it into place when it
is finished (the one atomic writer, scdgm.files), so a failed or interrupted write leaves no half file. Both
are plain AnnData on disk: `anndata.read_h5ad(path, backed='r')` and scanpy read them.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scdgm.defaults import default_section
from scdgm.errors import InputError, ScdgmError
from scdgm.files import atomic_path

CHUNK_CELLS: int = default_section("scale")["chunk_cells"]
"""Cells read or written at once unless a caller asks otherwise (params.yaml scale.chunk_cells)."""
STREAM_ABOVE_MB: float = default_section("scale")["stream_above_mb"]
"""An .h5ad whose stored counts take more MB than this is streamed (params.yaml scale.stream_above_mb)."""


def _encoding(node: h5py.Group | h5py.Dataset) -> str:
    value = node.attrs.get("encoding-type", "array" if isinstance(node, h5py.Dataset) else "")
    return value.decode() if isinstance(value, bytes) else str(value)


class H5adRows:
    """Rows of one count matrix of an .h5ad file, read on demand; obs and var are read whole (they are small).

    `layer` None reads .X. CSR matrices are read by row ranges (one contiguous slice of each array); a CSC
    matrix cannot be read by rows without reading it all and is refused with the fix.
    """

    def __init__(self, path: str | Path, layer: str | None = None) -> None:
        self.path = Path(path)
        self.layer = layer
        try:
            self.file = h5py.File(self.path, "r")
        except (OSError, ValueError) as exc:
            raise InputError(f"{self.path}: not a readable .h5ad file ({str(exc).splitlines()[0]})") from None
        try:
            self._open(layer)
        except BaseException:
            self.file.close()
            raise

    def _open(self, layer: str | None) -> None:
        where = "X" if layer is None else f"layers/{layer}"
        if where not in self.file:
            raise InputError(f"{self.path}: no count matrix at {where}")
        node = self.file[where]
        self.encoding = _encoding(node)
        if self.encoding == "csr_matrix":
            self.shape = tuple(int(n) for n in node.attrs["shape"])
            self.indptr = node["indptr"][:].astype(np.int64)
            self.data, self.indices = node["data"], node["indices"]
        elif self.encoding == "array":
            self.shape = tuple(int(n) for n in node.shape)
            self.dense = node
        elif self.encoding == "csc_matrix":
            raise InputError(
                f"{self.path}: {where} is stored column-major (CSC), which cannot be read a chunk of cells at a "
                "time; rewrite it as CSR (adata.X = scipy.sparse.csr_matrix(adata.X))"
            )
        else:
            raise InputError(f"{self.path}: {where} has encoding {self.encoding!r}, not a count matrix")
        self.obs = ad.io.read_elem(self.file["obs"])
        self.var = ad.io.read_elem(self.file["var"])
        if self.obs.shape[0] != self.shape[0] or self.var.shape[0] != self.shape[1]:
            raise InputError(f"{self.path}: obs/var do not match the {self.shape} matrix at {where}")

    @property
    def n_cells(self) -> int:
        return self.shape[0]

    @property
    def n_genes(self) -> int:
        return self.shape[1]

    @property
    def nnz(self) -> int:
        """Stored values of a CSR matrix (all entries of a dense one)."""
        return int(self.indptr[-1]) if self.encoding == "csr_matrix" else self.n_cells * self.n_genes

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Cells start..stop-1 as float32 CSR."""
        if self.encoding == "array":
            return sp.csr_matrix(self.dense[start:stop].astype(np.float32, copy=False))
        low, high = int(self.indptr[start]), int(self.indptr[stop])
        indptr = self.indptr[start : stop + 1] - low
        data = self.data[low:high].astype(np.float32, copy=False)
        return sp.csr_matrix((data, self.indices[low:high], indptr), shape=(stop - start, self.n_genes))

    def chunks(self, chunk_cells: int = CHUNK_CELLS) -> Iterator[tuple[int, sp.csr_matrix]]:
        """(first cell, counts) of consecutive chunks of at most `chunk_cells` cells."""
        for start in range(0, self.n_cells, chunk_cells):
            yield start, self.read(start, min(start + chunk_cells, self.n_cells))

    @property
    def stored_mb(self) -> float:
        """MB the counts take in memory as float32 CSR (dense: float32 array)."""
        if self.encoding == "array":
            return self.n_cells * self.n_genes * 4 / 2**20
        return (self.nnz * 8 + (self.n_cells + 1) * 8) / 2**20

    def uns(self) -> dict[str, Any]:
        """The file's uns (read on demand)."""
        return ad.io.read_elem(self.file["uns"]) if "uns" in self.file else {}

    def close(self) -> None:
        self.file.close()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled as its path and layer (e.g. to a Ray worker): the copy opens the file where it lands, which
        must see it at the same path."""
        return {"path": str(self.path), "layer": self.layer}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["layer"])

    def __enter__(self) -> H5adRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class H5adWriter:
    """A new .h5ad built chunk by chunk: `append` adds cells' counts (to .X and any named layers), `finish`
    writes obs, var, obsm and uns; used as a context manager it renames the file into place only when the
    block ends without error (nothing is left behind otherwise)."""

    def __init__(self, path: str | Path, n_genes: int, layers: tuple[str, ...] = ()) -> None:
        self.path = Path(path)
        self.n_genes = n_genes
        self.layers = layers
        self.n_cells = 0
        self.finished = False
        self._stack = ExitStack()

    def __enter__(self) -> H5adWriter:
        staging = self._stack.enter_context(atomic_path(self.path))
        try:
            self.file = self._stack.enter_context(h5py.File(staging, "w"))
        except OSError as exc:
            self._stack.close()
            raise ScdgmError(f"cannot write {self.path}: {str(exc).splitlines()[0]}") from exc
        self.targets = {"X": None, **{f"layers/{name}": None for name in self.layers}}
        ad.io.write_elem(self.file, "layers", {})  # an encoded (empty) group the layers' matrices go into
        return self

    def append(self, counts: sp.csr_matrix) -> None:
        """Add the cells of `counts` (CSR, float32, `n_genes` columns) after those already written."""
        if counts.shape[1] != self.n_genes:
            raise ScdgmError(f"chunk has {counts.shape[1]} genes, the file {self.n_genes}")
        counts = sp.csr_matrix(counts, dtype=np.float32)
        for where, dataset in self.targets.items():
            if dataset is None:
                ad.io.write_elem(self.file, where, counts)  # resizable: anndata writes sparse data with maxshape None
                self.targets[where] = ad.io.sparse_dataset(self.file[where])
            else:
                dataset.append(counts)
        self.n_cells += counts.shape[0]

    def finish(
        self,
        obs: pd.DataFrame,
        var: pd.DataFrame,
        obsm: Mapping[str, np.ndarray] | None = None,
        uns: Mapping[str, Any] | None = None,
    ) -> None:
        """Write the annotations of the cells appended (obs: one row each) and mark the file complete."""
        if self.n_cells == 0:
            raise ScdgmError(f"{self.path}: no cells were written")
        if len(obs) != self.n_cells or len(var) != self.n_genes:
            raise ScdgmError(f"{self.path}: obs/var ({len(obs)}, {len(var)}) do not match {self.n_cells} cells x "
                             f"{self.n_genes} genes")
        write = ad.io.write_elem
        write(self.file, "obs", obs)
        write(self.file, "var", var)
        write(self.file, "obsm", dict(obsm or {}))
        write(self.file, "varm", {})
        write(self.file, "obsp", {})
        write(self.file, "varp", {})
        write(self.file, "uns", dict(uns or {}))
        self.file.attrs["encoding-type"] = "anndata"
        self.file.attrs["encoding-version"] = "0.1.0"
        self.finished = True

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if kind is None and not self.finished:
            error = ScdgmError(f"{self.path}: the file was left unfinished (no obs/var written)")
            self._stack.__exit__(ScdgmError, error, None)
            raise error
        self._stack.__exit__(kind, exc, traceback)
