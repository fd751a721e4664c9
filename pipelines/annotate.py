"""Cell-type labels for unlabelled PBMC data from marker genes alone (no reference data set needed), with `unknown`
where the markers do not decide.

Cells are clustered (log-normalised copy, PCA on highly variable genes, kNN graph, seeded Leiden) and each
cluster is scored against the types of pipelines/resources/pbmc_markers.tsv:

- A marker's level in a cluster is its cluster mean scaled to [0, 1] between the lowest and the highest cluster
  (1: the cluster expressing it most), dividing by at least MIN_MARKER_RANGE so noise in a gene no cluster
  really expresses cannot reach a full level.
- A type is scored only when at least `min_markers` of its markers are in the data (default 2): one marker
  cannot tell two types that share it apart (FCGR3A is as high in NK cells as in FCGR3A+ monocytes, CST3 in
  monocytes as in dendritic cells). An absolute count, not a share of the list, because the lists have 2-4
  markers and half of a 2-marker list is the single marker that misleads. Skipped types are reported.
- A type's score is the mean level of its markers, capped at its second-highest level, so a type needs positive
  evidence from two markers; a marker shared with another type (S100A4, CST3, FCGR3A) cannot lift it alone.
  Weighting markers by specificity (1 / the clusters where they reach half their range) as well changed no
  cluster's name on PBMC 3k or scanpy's PBMC 68k subset, so the cap is the only guard against shared markers.
- A cluster takes its best type only when that score reaches `min_score` (else `weak`) and leads the
  second-best type by `min_margin` (else `ambiguous`); otherwise it is named `unknown`.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from scdgm.errors import InputError, ScdgmError

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd

logger = logging.getLogger(__name__)

MARKERS_PATH = Path(__file__).resolve().parent / "resources" / "pbmc_markers.tsv"
UNKNOWN = "unknown"
"""The label of a cluster whose best type is weak or ambiguous."""
MIN_MARKER_RANGE = 0.5
"""Least spread (log1p counts per 10k) a marker's cluster means are scaled by. True PBMC markers span 0.7-6 between
clusters (LEF1 on PBMC 3k is the smallest); a gene no cluster expresses varies by < 0.2 and so stays below 0.4."""


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


def marker_coverage(genes: Sequence[str], markers: dict[str, list[str]], min_markers: int) -> pd.DataFrame:
    """Per type: its markers found in `genes` ('used') and not ('missing'), comma-joined, and whether enough are
    present to score it ('scored'). No type scorable is a user error."""
    import pandas as pd

    present = set(map(str, genes))
    used = {t: [g for g in wanted if g in present] for t, wanted in markers.items()}
    table = pd.DataFrame(
        {
            "used": [",".join(used[t]) for t in markers],
            "missing": [",".join(g for g in markers[t] if g not in present) for t in markers],
            "scored": [len(used[t]) >= min_markers for t in markers],
        },
        index=pd.Index(list(markers), name="cell_type"),
    )
    if not table["scored"].any():
        wanted = sorted({g for gs in markers.values() for g in gs})
        raise InputError(
            f"no cell type has {min_markers} of its marker genes ({', '.join(wanted[:8])}...) in the data: "
            "give a label column instead"
        )
    return table


def score_clusters(
    lognorm: ad.AnnData, clusters: pd.Categorical, markers: dict[str, list[str]]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Per-cluster mean log-expression of the markers, their levels in [0, 1] and the type scores (module doc).

    `markers` holds the present markers of the types to score.
    """
    import pandas as pd

    genes = sorted({g for gs in markers.values() for g in gs})
    expression = pd.DataFrame(_dense(lognorm[:, genes].X), columns=genes)
    means = expression.groupby(clusters, observed=True).mean()
    low = means.min(axis=0)
    levels = (means - low) / np.maximum(means.max(axis=0) - low, MIN_MARKER_RANGE)
    scores = pd.DataFrame({t: _type_score(levels[gs].to_numpy()) for t, gs in markers.items()}, index=means.index)
    return means, levels, scores


def _type_score(levels: np.ndarray) -> np.ndarray:
    """Mean marker level per cluster (rows), capped at the second-highest level when there are two or more."""
    mean = levels.mean(axis=1)
    if levels.shape[1] < 2:
        return mean
    return np.minimum(mean, np.sort(levels, axis=1)[:, -2])


def name_clusters(scores: pd.DataFrame, min_score: float, min_margin: float) -> pd.DataFrame:
    """Per cluster: best and second type with their scores, the margin, the reason and the name given.

    reason is 'weak' (best score below `min_score`), else 'ambiguous' (margin below `min_margin`), else 'assigned';
    only 'assigned' clusters keep their best type, the others are named UNKNOWN. With one type scored the
    second-best score is 0.
    """
    import pandas as pd

    values = scores.to_numpy()
    order = np.argsort(-values, axis=1, kind="stable")
    rows = np.arange(len(values))
    best = values[rows, order[:, 0]]
    second = values[rows, order[:, 1]] if values.shape[1] > 1 else np.zeros(len(values))
    types = np.asarray(scores.columns, dtype=object)
    reason = np.where(best < min_score, "weak", np.where(best - second < min_margin, "ambiguous", "assigned"))
    return pd.DataFrame(
        {
            "best": types[order[:, 0]],
            "best_score": best,
            "second": types[order[:, 1]] if values.shape[1] > 1 else "",
            "second_score": second,
            "margin": best - second,
            "reason": reason,
            "cell_type": np.where(reason == "assigned", types[order[:, 0]], UNKNOWN),
        },
        index=scores.index,
    )


def check_thresholds(min_markers: Any, min_score: Any, min_margin: Any) -> None:
    """Refuse annotation thresholds out of range (prepare.annotation_min_*), naming the setting."""
    if isinstance(min_markers, bool) or not isinstance(min_markers, int | np.integer) or min_markers < 1:
        raise ScdgmError(f"prepare.annotation_min_markers must be an integer >= 1, got {min_markers!r}")
    for key, value in (("annotation_min_score", min_score), ("annotation_min_margin", min_margin)):
        number = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
        if not (number and 0 <= value <= 1):
            raise ScdgmError(f"prepare.{key} must be a number in [0, 1], got {value!r}")


def _report(coverage: pd.DataFrame, table: pd.DataFrame, min_markers: int) -> None:
    """Warn (one line each) about skipped types and types scored without some markers, and about unknown cells."""
    skipped = coverage.loc[~coverage["scored"], "missing"]
    partial = coverage.loc[coverage["scored"] & (coverage["missing"] != ""), "missing"]
    parts = []
    if len(skipped):
        listed = ", ".join(f"{t} (missing {m})" for t, m in skipped.items())
        parts.append(f"skips {listed}: fewer than {min_markers} of their markers are in the data")
    if len(partial):
        parts.append("scores without some markers " + ", ".join(f"{t} ({m})" for t, m in partial.items()))
    if parts:
        logger.warning("marker annotation %s (uns['scdgm_annotation']['markers'])", "; ".join(parts))
    unknown = table[table["cell_type"] == UNKNOWN]
    if len(unknown):
        logger.warning(
            "marker annotation names %d cells in %d cluster(s) %r: %s (prepare.annotation_min_score / "
            "annotation_min_margin; evidence in uns['scdgm_annotation']['clusters'])",
            int(unknown["n_cells"].sum()), len(unknown), UNKNOWN,
            ", ".join(
                f"cluster {c} ({row.n_cells} cells) {row.reason}: {row.best} {row.best_score:.2f}"
                + (f" vs {row.second} {row.second_score:.2f}" if row.second else "")
                for c, row in unknown.iterrows()
            ),
        )


def annotate_by_markers(
    adata: ad.AnnData,
    markers: dict[str, list[str]] | None = None,
    n_pcs: int = 40,
    n_neighbors: int = 15,
    resolution: float = 1.2,
    seed: int = 0,
    min_markers: int = 2,
    min_score: float = 0.5,
    min_margin: float = 0.1,
) -> pd.DataFrame:
    """Label cells of a raw-count AnnData by clustering and marker scores; returns the per-cluster table.

    Writes obs['leiden'], obs['cell_type'] (a type or UNKNOWN) and uns['scdgm_annotation']: parameters, the
    per-cluster table (size, best and second type, scores, margin, reason, name), type scores, marker means and
    levels per cluster, and per type the markers used and missing and whether it was scored.
    """
    import pandas as pd

    check_thresholds(min_markers, min_score, min_margin)
    markers = markers if markers is not None else load_markers()
    coverage = marker_coverage(adata.var_names, markers, min_markers)
    scored = {t: used.split(",") for t, used in coverage.loc[coverage["scored"], "used"].items()}
    clusters, lognorm = cluster_cells(adata, n_pcs=n_pcs, n_neighbors=n_neighbors, resolution=resolution, seed=seed)
    means, levels, scores = score_clusters(lognorm, clusters, scored)
    named = name_clusters(scores, min_score, min_margin)
    sizes = pd.Series(clusters).value_counts().reindex(scores.index).to_numpy()
    table = pd.concat([pd.DataFrame({"n_cells": sizes}, index=scores.index), named], axis=1)
    table.index = table.index.astype(str)
    _report(coverage, table, min_markers)
    adata.obs["leiden"] = clusters
    adata.obs["cell_type"] = pd.Categorical(named["cell_type"].reindex(clusters).to_numpy())
    adata.uns["scdgm_annotation"] = {
        "method": "leiden clusters named by marker levels; a type needs two markers, unknown when weak or ambiguous",
        "params": {
            "n_pcs": n_pcs, "n_neighbors": n_neighbors, "resolution": resolution, "seed": seed,
            "min_markers": min_markers, "min_score": min_score, "min_margin": min_margin,
            "min_marker_range": MIN_MARKER_RANGE,
        },
        "clusters": table,
        "scores": scores.set_axis(scores.index.astype(str)),
        "marker_means": means.set_axis(means.index.astype(str)),
        "marker_levels": levels.set_axis(levels.index.astype(str)),
        "markers": coverage,
    }
    return table
