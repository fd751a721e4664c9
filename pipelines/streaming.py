"""Data larger than memory in the command line: which .h5ad inputs are streamed (their stored counts exceed
`scale.stream_above_mb`), and how train, embed, sample and explain read and write them `scale.chunk_cells` cells
at a time, so peak memory follows that setting rather than the number of cells.

Training reads shuffled blocks of cells from the file (models.data.StreamBatches) and is evaluated on a seeded
subset of the test and training cells read alone; embeddings are written into a copy of the input (obsm,
uns), draws chunk by chunk into a new file; an explanation reads only the cells it explains (explain.max_cells).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scdgm.chunked import H5adRows, H5adWriter
from scdgm.defaults import default_section
from scdgm.errors import InputError, ScdgmError
from scdgm.files import atomic_path
from scdgm.models import GenerativeModel
from scdgm.models.base import Embedding
from scdgm.models.data import StreamedCounts, split_mask
from scdgm.models.evaluation import MAX_CELLS
from scdgm.pipelines.io import detect_format

SCALE_SECTION = "scale"
SCALE_DEFAULTS: dict[str, Any] = default_section(SCALE_SECTION)
"""The packaged params.yaml's `scale:` section."""


def scale_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The `scale:` settings of a params mapping over the packaged defaults, checked."""
    settings = {**SCALE_DEFAULTS, **(config.get(SCALE_SECTION) or {})}
    unknown = sorted(set(settings) - set(SCALE_DEFAULTS))
    if unknown:
        raise ScdgmError(f"unknown scale parameter(s): {', '.join(unknown)}; known: {', '.join(SCALE_DEFAULTS)}")
    chunk, limit = settings["chunk_cells"], settings["stream_above_mb"]
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise InputError(f"scale.chunk_cells must be a whole number of cells, at least 1; got {chunk!r}")
    if isinstance(limit, bool) or not isinstance(limit, int | float) or limit < 0:
        raise InputError(f"scale.stream_above_mb must be a number of MB, at least 0; got {limit!r}")
    return settings


def streamed_input(path: Path, config: dict[str, Any]) -> H5adRows | None:
    """`path` opened for chunked reading when it is an .h5ad whose counts take more than scale.stream_above_mb
    in memory; None when it is read into memory as usual (smaller, or another format)."""
    settings = scale_settings(config)
    if not path.is_file() or detect_format(path) != "h5ad":
        return None
    rows = H5adRows(path)
    if rows.stored_mb <= settings["stream_above_mb"]:
        rows.close()
        return None
    if not rows.var.index.is_unique:
        rows.close()
        raise InputError(f"{path}: gene names (var_names) are not unique; make them unique to stream this file")
    return rows


def streamed_counts(
    rows: H5adRows, config: dict[str, Any], genes: list[str] | None = None, cells: np.ndarray | None = None
) -> StreamedCounts:
    """The counts of `rows` (the cells of `cells`, sorted positions; all when None), columns in `genes` order."""
    source_genes = [str(g) for g in rows.var.index]
    return StreamedCounts(rows, source_genes, genes, cells, scale_settings(config)["chunk_cells"])


def read_cells(rows: H5adRows, config: dict[str, Any], cells: np.ndarray) -> ad.AnnData:
    """The cells at sorted positions `cells` as an in-memory AnnData (obs, var, float32 CSR counts), read in
    ranges of chunk_cells without loading the rest."""
    counts = streamed_counts(rows, config, cells=cells)
    return ad.AnnData(X=counts.take(0, cells.size), obs=rows.obs.iloc[cells].copy(), var=rows.var.copy())


def evaluation_cells(rows: H5adRows, config: dict[str, Any], seed: int) -> ad.AnnData:
    """The cells a streamed model is evaluated on, read alone: up to MAX_CELLS test cells (all cells without a
    test split) and up to MAX_CELLS training cells (the reference of the latent metrics), seeded."""
    rng = np.random.default_rng(seed)
    chosen = []
    for split in ("test", "train"):
        members = np.flatnonzero(split_mask(ad.AnnData(obs=rows.obs), split))
        if members.size > MAX_CELLS:
            members = rng.choice(members, MAX_CELLS, replace=False)
        chosen.append(members)
    return read_cells(rows, config, np.unique(np.concatenate(chosen)))


def write_embedded(source: Path, out: Path, embedding: Embedding, uns: dict[str, Any]) -> Path:
    """A copy of the .h5ad `source` with obsm['X_scdgm'] / ['X_scdgm_var'] and uns['scdgm_embed'] added, written
    atomically without reading its counts into memory."""
    with atomic_path(out) as staging:
        shutil.copyfile(source, staging)
        with h5py.File(staging, "r+") as file:
            if "obsm" not in file:
                ad.io.write_elem(file, "obsm", {})
            if "uns" not in file:
                ad.io.write_elem(file, "uns", {})
            for key, value in {"X_scdgm": embedding.mean, "X_scdgm_var": embedding.var, "scdgm_embed": uns}.items():
                group = file["uns" if key == "scdgm_embed" else "obsm"]
                if key in group:
                    del group[key]
                ad.io.write_elem(group, key, value)
    return out


def write_posterior_samples(
    out: Path,
    model: GenerativeModel,
    counts: StreamedCounts,
    obs: pd.DataFrame,
    draws: int,
    seed: int | None,
    uns: dict[str, Any],
) -> int:
    """Posterior draws of the cells of `counts` (one row of `obs` each) written chunk by chunk into a new .h5ad laid
    out as `Samples.to_anndata` lays it out (counts in X, latents in obsm['X_scdgm'], obs['source_cell'] and the
    cells' obs columns); returns the number of synthetic cells."""
    latents, sources = [], []
    with H5adWriter(out, len(model.genes)) as writer:
        for samples in model.sample_chunks(counts, model.batch_labels(obs), draws, seed):
            writer.append(sp.csr_matrix(samples.x.astype(np.float32, copy=False)))
            latents.append(samples.z.astype(np.float32))
            sources.append(samples.cell_index.astype(np.int64))
        cell_index = np.concatenate(sources)
        synthetic = pd.DataFrame({"source_cell": cell_index}, index=[f"synthetic_{i}" for i in range(cell_index.size)])
        for column in obs.columns:
            synthetic[column] = obs[column].to_numpy()[cell_index]
        packed = ad.AnnData(obs=synthetic)
        packed.strings_to_categoricals()  # as writing an in-memory AnnData does
        writer.finish(packed.obs, pd.DataFrame(index=pd.Index(model.genes)), {"X_scdgm": np.concatenate(latents)},
                      {"scdgm_sample": uns})
    return int(cell_index.size)

