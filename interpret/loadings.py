"""Reading linear models (LDVAE, PCA) through their gene loadings: top genes per factor and sign, variance
explained per factor, and gene-set scores (is a set's genes' loading larger than the other genes'?).

Genes are ranked by loading (or attribution) times a gene weight (`gene_statistics`): mean count μ / (1 + μ) on
the reference cells, 0 for genes detected in fewer than `min_detection` of them. A factor can load heavily on a
gene seen in a handful of cells (little likelihood is at stake), so raw loadings put such genes first; the weight
is the share of a change in the gene's log rate that reaches log1p of its count at its mean count (d log1p μ /
d log μ), so genes seen about once per cell or less are scaled down in proportion, and highly expressed genes
gain nothing beyond their loading (the weight saturates at 1)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

from scdgm.errors import InputError
from scdgm.models.base import GenerativeModel, LinearDecoder


def model_loadings(model: GenerativeModel) -> pd.DataFrame:
    """The model's genes x factors loadings with string factor names; a clear error for non-linear models."""
    if not isinstance(model, LinearDecoder):
        raise InputError(f"{model.kind} is not a linear model: it has no loadings")
    loadings = model.loadings().copy()
    loadings.columns = [str(c) for c in loadings.columns]
    return loadings


def variance_explained(model: GenerativeModel, adata: ad.AnnData | None = None) -> pd.DataFrame:
    """Fraction of variance explained per factor (columns factor, variance_explained), in factor order.

    Models whose figure depends on cells (LDVAE: variance of the decoder's predictor) need `adata`.
    """
    loadings = model_loadings(model)
    shares = model.variance_explained(adata)
    values = np.asarray(shares, dtype=float).ravel()
    if values.size != loadings.shape[1]:
        raise InputError(f"{values.size} variance figures for {loadings.shape[1]} factors")
    return pd.DataFrame({"factor": loadings.columns, "variance_explained": values})


RANKING = ("value × gene weight: mean count μ / (1 + μ) per training cell; genes detected in fewer than "
           "min_detection of the training cells are not ranked")
"""How genes are ranked, as the explanation reports it."""


def gene_statistics(counts: sp.csr_matrix, genes: Sequence[str], min_detection: float) -> pd.DataFrame:
    """Per gene (rows, `genes` order) of the reference cells' counts: detection (share of cells with a count),
    mean_count and the ranking weight μ / (1 + μ), 0 where detection < `min_detection`."""
    counts = sp.csr_matrix(counts, dtype=np.float64)
    if counts.shape[0] == 0:
        raise InputError("gene statistics need at least one cell")
    detection = np.asarray((counts > 0).mean(axis=0), dtype=np.float64).ravel()
    mean = np.asarray(counts.mean(axis=0), dtype=np.float64).ravel()
    weight = np.where(detection >= min_detection, mean / (1.0 + mean), 0.0)
    return pd.DataFrame({"detection": detection, "mean_count": mean, "weight": weight}, index=list(genes))


def top_genes(
    table: pd.DataFrame, n: int = 10, value: str = "loading", weights: pd.Series | None = None
) -> pd.DataFrame:
    """Per factor (column of a genes x factors table) and sign, the `n` genes with the largest |value| × weight
    (`weights` by gene, e.g. `gene_statistics(...)["weight"]`; None ranks by |value| alone): columns factor,
    sign, rank, gene, `value` and score (value × weight). Genes of weight 0 are never listed."""
    scale = pd.Series(1.0, index=table.index) if weights is None else weights.reindex(table.index)
    if scale.isna().any():
        raise InputError(f"no gene weight for {', '.join(map(str, scale.index[scale.isna()][:5]))}")
    rows = []
    for factor in table.columns:
        scores = table[factor] * scale
        for sign, ordered in (("+", scores.sort_values(ascending=False)), ("-", scores.sort_values())):
            kept = ordered[(ordered > 0) if sign == "+" else (ordered < 0)].head(n)
            rows.extend(
                {"factor": str(factor), "sign": sign, "rank": rank, "gene": str(gene),
                 value: float(table.at[gene, factor]), "score": float(score)}
                for rank, (gene, score) in enumerate(kept.items(), start=1)
            )
    return pd.DataFrame(rows, columns=["factor", "sign", "rank", "gene", value, "score"])


def gene_importance(loadings: pd.DataFrame) -> pd.Series:
    """Per gene, its largest |loading| over all factors: how strongly any factor uses the gene."""
    return loadings.abs().max(axis=1).rename("max_abs_loading")


def gene_set_scores(
    loadings: pd.DataFrame, gene_sets: Mapping[str, Sequence[str]], min_size: int = 3
) -> pd.DataFrame:
    """Score each gene set by its genes' max |loading| (mean, median) and a one-sided Mann-Whitney U test
    of set genes against all other genes (H1: larger); BH-adjusted q-values; best sets first.

    Sets with fewer than `min_size` genes in the model are reported with NaN statistics.
    """
    importance = gene_importance(loadings)
    in_model = set(importance.index)
    rows = []
    for name, genes in gene_sets.items():
        members = [g for g in dict.fromkeys(genes) if g in in_model]
        row: dict[str, Any] = {"gene_set": name, "n_genes": len(members), "n_missing": len(set(genes)) - len(members)}
        values = importance.loc[members].to_numpy()
        others = importance.drop(index=members).to_numpy()
        if len(members) >= min_size and others.size:
            test = stats.mannwhitneyu(values, others, alternative="greater")
            row.update(mean=float(values.mean()), median=float(np.median(values)),
                       u_statistic=float(test.statistic), p_value=float(test.pvalue))
        else:
            row.update(mean=np.nan, median=np.nan, u_statistic=np.nan, p_value=np.nan)
        rows.append(row)
    table = pd.DataFrame(rows, columns=["gene_set", "n_genes", "n_missing", "mean", "median", "u_statistic", "p_value"])
    tested = table["p_value"].notna()
    table["q_value"] = np.nan
    if tested.any():
        table.loc[tested, "q_value"] = stats.false_discovery_control(table.loc[tested, "p_value"].to_numpy())
    return table.sort_values(["p_value", "gene_set"], na_position="last").reset_index(drop=True)


@dataclass
class LoadingsSummary:
    """Everything the explanation reports for a linear model."""

    loadings: pd.DataFrame
    top_genes: pd.DataFrame
    """Per factor and sign the top genes by loading × gene weight (`top_genes`)."""
    variance: pd.DataFrame
    gene_sets: pd.DataFrame | None

    def to_dict(self, n_sets: int = 10) -> dict[str, Any]:
        """JSON-ready summary: top genes per factor and sign, variance explained, best gene sets."""
        top = {
            f"{factor}{sign}": group["gene"].tolist()
            for (factor, sign), group in self.top_genes.groupby(["factor", "sign"], sort=False)
        }
        summary: dict[str, Any] = {
            "top_genes": top,
            "variance_explained": dict(zip(self.variance["factor"], self.variance["variance_explained"].astype(float), strict=True)),
        }
        if self.gene_sets is not None:
            best = self.gene_sets.dropna(subset=["p_value"]).head(n_sets)
            summary["gene_sets"] = best.to_dict(orient="records")
        return summary


def summarize_loadings(
    model: GenerativeModel,
    adata: ad.AnnData | None = None,
    gene_sets: Mapping[str, Sequence[str]] | None = None,
    n_top: int = 10,
    min_size: int = 3,
    weights: pd.Series | None = None,
) -> LoadingsSummary:
    """Loadings, top genes per factor and sign (ranked by loading × `weights`, see `top_genes`), variance
    explained and (given sets) gene-set scores."""
    loadings = model_loadings(model)
    scores = gene_set_scores(loadings, gene_sets, min_size) if gene_sets else None
    return LoadingsSummary(loadings, top_genes(loadings, n_top, weights=weights), variance_explained(model, adata), scores)
