"""Cell-type labels for unlabelled PBMC data from marker genes alone (no reference data set needed).

Cells are clustered (log-normalised copy, PCA on highly variable genes, kNN graph, seeded Leiden) and each
cluster takes the type whose markers (pipelines/resources/pbmc_markers.tsv) it expresses most, measured as
the mean over the type's markers of the cluster's z-scored mean expression relative to the other clusters.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from scdgm.errors import InputError

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd

MARKERS_PATH = Path(__file__).resolve().parent / "resources" / "pbmc_markers.tsv"


def load_markers(path: str | Path = MARKERS_PATH) -> dict[str, list[str]]:
    """Marker genes per cell type from a two-column TSV (cell_type, gene), in file order."""
    import pandas as pd

    table = pd.read_csv(path, sep="\t", dtype=str)
    if list(table.columns) != ["cell_type", "gene"]:
        raise InputError(f"{path}: expected columns cell_type, gene; got {', '.join(table.columns)}")
    return {cell_type: list(rows["gene"]) for cell_type, rows in table.groupby("cell_type", sort=False)}


def _dense(matrix: Any) -> np.ndarray:
    """A sparse or dense matrix as a dense array."""
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


def cluster_cells(
    adata: ad.AnnData, n_pcs: int = 40, n_neighbors: int = 15, resolution: float = 1.2, seed: int = 0
) -> tuple[pd.Categorical, ad.AnnData]:
    """Leiden clusters of raw counts and the log-normalised copy (all genes) they were computed on.

    PCA uses var['highly_variable'] when present (scaled, clipped at 10 as in the scanpy PBMC tutorial); the kNN
    graph has Gaussian-kernel weights.
    """
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    names = {"obs": pd.DataFrame(index=adata.obs_names), "var": pd.DataFrame(index=adata.var_names)}
    lognorm = ad.AnnData(X=adata.X.copy(), **names)
    sc.pp.normalize_total(lognorm, target_sum=1e4)
    sc.pp.log1p(lognorm)
    genes = adata.var["highly_variable"].to_numpy() if "highly_variable" in adata.var else slice(None)
    embedding = ad.AnnData(X=_dense(lognorm[:, genes].X), obs=lognorm.obs)  # scaling makes it dense anyway
    sc.pp.scale(embedding, max_value=10)
    n_comps = max(1, min(n_pcs, embedding.n_obs - 1, embedding.n_vars - 1))
    sc.pp.pca(embedding, n_comps=n_comps, random_state=seed)
    # Gaussian-kernel kNN weights: on PBMC 3k as good as UMAP's, without ~20 s of numba compilation per process.
    sc.pp.neighbors(embedding, n_neighbors=n_neighbors, n_pcs=n_comps, method="gauss", random_state=seed)
    sc.tl.leiden(embedding, resolution=resolution, flavor="igraph", n_iterations=2, directed=False, random_state=seed)
    return embedding.obs["leiden"].array, lognorm


def present_markers(genes: Sequence[str], markers: dict[str, list[str]]) -> dict[str, list[str]]:
    """The markers found among `genes`, per type (types with none left out); none at all is a user error."""
    present = set(map(str, genes))
    used = {cell_type: [g for g in wanted if g in present] for cell_type, wanted in markers.items()}
    used = {cell_type: found for cell_type, found in used.items() if found}
    if not used:
        wanted = sorted({g for gs in markers.values() for g in gs})
        raise InputError(
            f"none of the marker genes ({', '.join(wanted[:8])}...) are in the data: give a label column instead"
        )
    return used


def score_clusters(
    lognorm: ad.AnnData, clusters: pd.Categorical, markers: dict[str, list[str]]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-cluster mean log-expression of the marker genes, and per-cluster type scores.

    A type's score is the mean, over its markers, of the gene's cluster mean z-scored across clusters.
    """
    import pandas as pd

    used = present_markers(lognorm.var_names, markers)
    genes = sorted({g for gs in used.values() for g in gs})
    expression = pd.DataFrame(_dense(lognorm[:, genes].X), columns=genes)
    means = expression.groupby(clusters, observed=True).mean()
    spread = means.std(axis=0, ddof=0).replace(0.0, 1.0)
    z = (means - means.mean(axis=0)) / spread
    scores = pd.DataFrame({t: z[gs].mean(axis=1) for t, gs in used.items()}, index=means.index)
    return means, scores


def annotate_by_markers(
    adata: ad.AnnData,
    markers: dict[str, list[str]] | None = None,
    n_pcs: int = 40,
    n_neighbors: int = 15,
    resolution: float = 1.2,
    seed: int = 0,
) -> pd.DataFrame:
    """Label cells of a raw-count AnnData by clustering and marker scores; returns the per-cluster table.

    Writes obs['leiden'], obs['cell_type'] and uns['scdgm_annotation'] (parameters, marker means and type
    scores per cluster, and the chosen type and size of each cluster).
    """
    import pandas as pd

    markers = present_markers(adata.var_names, markers if markers is not None else load_markers())
    clusters, lognorm = cluster_cells(adata, n_pcs=n_pcs, n_neighbors=n_neighbors, resolution=resolution, seed=seed)
    means, scores = score_clusters(lognorm, clusters, markers)
    chosen = scores.idxmax(axis=1)
    table = pd.DataFrame(
        {"n_cells": pd.Series(clusters).value_counts().reindex(scores.index).to_numpy(), "cell_type": chosen}
    )
    table.index = table.index.astype(str)
    adata.obs["leiden"] = clusters
    adata.obs["cell_type"] = pd.Categorical(chosen.reindex(clusters).to_numpy())
    adata.uns["scdgm_annotation"] = {
        "method": "leiden clusters named by z-scored mean marker expression",
        "params": {"n_pcs": n_pcs, "n_neighbors": n_neighbors, "resolution": resolution, "seed": seed},
        "clusters": table,
        "scores": scores.set_axis(scores.index.astype(str)),
        "marker_means": means.set_axis(means.index.astype(str)),
    }
    return table
