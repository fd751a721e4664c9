"""Which latent carries which label or covariate: mutual information and ANOVA F of every latent with every
obs column, and per cell type the latent whose mean differs most (standardised mean difference)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.feature_selection import f_classif, f_regression, mutual_info_classif, mutual_info_regression

from scdgm.errors import InputError


def _latent_names(n: int) -> list[str]:
    return [f"latent_{j}" for j in range(n)]


def latent_association(
    z: np.ndarray, obs: pd.DataFrame, columns: Sequence[str] | None = None, seed: int = 0
) -> pd.DataFrame:
    """Long table (column, kind, latent, mutual_information, f_statistic, p_value) of each latent with each
    obs column: categorical columns use mutual_info_classif / f_classif (one-way ANOVA), numeric ones
    mutual_info_regression / f_regression. Columns with a single value are skipped."""
    z = np.asarray(z, dtype=np.float64)
    columns = list(obs.columns) if columns is None else list(columns)
    missing = [c for c in columns if c not in obs.columns]
    if missing:
        raise InputError(f"obs has no column(s) {', '.join(missing)}")
    frames = []
    for column in columns:
        values = obs[column]
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        keep = values.notna().to_numpy()
        target = values[keep].to_numpy(dtype=np.float64) if numeric else values[keep].astype(str).to_numpy()
        if len(np.unique(target)) < 2:
            continue
        if numeric:
            mi = mutual_info_regression(z[keep], target, random_state=seed)
            f, p = f_regression(z[keep], target)
        else:
            mi = mutual_info_classif(z[keep], target, random_state=seed)
            f, p = f_classif(z[keep], target)
        frames.append(pd.DataFrame({
            "column": column, "kind": "numeric" if numeric else "categorical", "latent": _latent_names(z.shape[1]),
            "mutual_information": mi, "f_statistic": f, "p_value": p,
        }))
    if not frames:
        return pd.DataFrame(columns=["column", "kind", "latent", "mutual_information", "f_statistic", "p_value"])
    return pd.concat(frames, ignore_index=True)


def standardized_mean_differences(z: np.ndarray, labels: Sequence) -> pd.DataFrame:
    """Labels x latents: (mean in the label - mean in the other cells) / pooled standard deviation."""
    z = np.asarray(z, dtype=np.float64)
    labels = np.asarray(labels).astype(str)
    rows = {}
    for label in np.unique(labels):
        inside, outside = z[labels == label], z[labels != label]
        if len(inside) < 2 or len(outside) < 2:
            continue
        pooled = np.sqrt(
            ((len(inside) - 1) * inside.var(axis=0, ddof=1) + (len(outside) - 1) * outside.var(axis=0, ddof=1))
            / (len(inside) + len(outside) - 2)
        )
        rows[label] = (inside.mean(axis=0) - outside.mean(axis=0)) / np.maximum(pooled, 1e-12)
    return pd.DataFrame.from_dict(rows, orient="index", columns=_latent_names(z.shape[1]))


def label_latents(z: np.ndarray, labels: Sequence) -> pd.DataFrame:
    """Per label, the latent with the largest |standardised mean difference|: columns label, n_cells,
    latent, smd (signed: the direction the label moves that latent)."""
    smd = standardized_mean_differences(z, labels)
    counts = pd.Series(np.asarray(labels).astype(str)).value_counts()
    best = smd.abs().idxmax(axis=1)
    return pd.DataFrame({
        "label": smd.index,
        "n_cells": counts.reindex(smd.index).to_numpy(),
        "latent": best.to_numpy(),
        "smd": [smd.at[label, latent] for label, latent in best.items()],
    })
