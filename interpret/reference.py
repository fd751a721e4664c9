"""Slow reference fits of the selection's null log-linear models, one table at a time, to check the closed form.

Two independent fitters: a Poisson GLM (statsmodels) on the cells of the table with the model's interaction
terms, and iterative proportional fitting (IPF). Both give the deviance G² against the saturated model.
A table has axes (h_j, x_S..., x_i). With empty_cell = 0, cells whose fitted value a zero observed margin forces
to 0 are left out of the GLM (its estimate would run off to -inf there; they add nothing to G²), and so are the
design columns this leaves unidentifiable. Fits run with single-threaded BLAS.
"""
from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from itertools import product
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.linalg
import scipy.sparse as sp
import statsmodels.api as sm
import statsmodels.formula.api as smf
from statsmodels.tools.sm_exceptions import PerfectSeparationWarning
from threadpoolctl import threadpool_limits

from scdgm.errors import ScdgmError
from scdgm.interpret.loglinear import Model

Method = Literal["glm", "ipf"]


def contingency_table(x: Any, h: Any, selected: Sequence[int], gene: int, latent: int) -> np.ndarray:
    """Counts of (h_latent, x_selected..., x_gene) as an array of shape (2,) * (|S| + 2)."""
    columns = [np.asarray(h)[:, latent]] + [_column(x, i) for i in selected] + [_column(x, gene)]
    index = np.ravel_multi_index(tuple(np.asarray(c, dtype=np.int64) for c in columns), (2,) * len(columns))
    return np.bincount(index, minlength=2 ** len(columns)).reshape((2,) * len(columns)).astype(np.float64)


def generating_classes(n_selected: int, model: Model) -> list[tuple[int, ...]]:
    """Axes of the null model's margins: [h S][S x] (conditional) or [h S][x] (joint)."""
    strata = tuple(range(1, n_selected + 1))
    x_axis = n_selected + 1
    if model == "conditional":
        return [(0, *strata), (*strata, x_axis)]
    if model == "joint":
        return [(0, *strata), (x_axis,)]
    raise ScdgmError(f"model must be 'conditional' or 'joint', got {model!r}")


def glm_deviance(table: np.ndarray, model: Model, empty_cell: float = 0.0) -> float:
    """Deviance of the null model fitted as a Poisson GLM on the table's cells (empty cells set to empty_cell)."""
    table = _corrected(table, empty_cell)
    n_selected = table.ndim - 2
    design = _design(n_selected, model)
    keep = np.ones(table.shape, dtype=bool)
    for axes in generating_classes(n_selected, model):
        keep &= _margin(table, axes) > 0
    counts = table.ravel()[keep.ravel()]
    # A null model that fits the kept cells exactly (no residual df) is flagged as "perfect prediction", and
    # statsmodels' unused WLS scale then divides by 0: both are expected here.
    with (threadpool_limits(limits=1, user_api="blas"), np.errstate(divide="ignore", invalid="ignore"),
          warnings.catch_warnings()):
        warnings.simplefilter("ignore", PerfectSeparationWarning)
        glm = sm.GLM(counts, _full_rank(design[keep.ravel()]), family=sm.families.Poisson())
        return float(glm.fit(tol=1e-12, maxiter=100).deviance)


def ipf_fit(table: np.ndarray, classes: Sequence[tuple[int, ...]], tol: float = 1e-10,
            max_iter: int = 100) -> np.ndarray:
    """Fitted counts of the hierarchical log-linear model with these margins, by iterative proportional fitting."""
    fitted = np.ones_like(table, dtype=np.float64)
    for _ in range(max_iter):
        previous = fitted
        for axes in classes:
            observed, current = _margin(table, axes), _margin(fitted, axes)
            fitted = fitted * np.divide(observed, current, out=np.zeros_like(current), where=current > 0)
        if np.abs(fitted - previous).max() < tol:
            break
    return fitted


def ipf_deviance(table: np.ndarray, model: Model, empty_cell: float = 0.0) -> float:
    """Deviance of the null model fitted by IPF (empty cells set to empty_cell first)."""
    table = _corrected(table, empty_cell)
    fitted = ipf_fit(table, generating_classes(table.ndim - 2, model))
    positive = table > 0
    return float(2 * (table[positive] * np.log(table[positive] / fitted[positive])).sum())


def reference_g2_matrix(
    x: Any,
    h: Any,
    selected: Sequence[int] = (),
    model: Model = "conditional",
    empty_cell: float = 0.0,
    method: Method = "glm",
    genes: Sequence[int] | None = None,
) -> np.ndarray:
    """G² for each candidate gene (all, or `genes`) × latent by fitting every table on its own (NaN for S)."""
    deviance = {"glm": glm_deviance, "ipf": ipf_deviance}.get(method)
    if deviance is None:
        raise ScdgmError(f"method must be 'glm' or 'ipf', got {method!r}")
    n_genes, n_latents = x.shape[1], np.asarray(h).shape[1]
    result = np.full((n_genes, n_latents), np.nan)
    for gene in range(n_genes) if genes is None else genes:
        if gene in selected:
            continue
        for latent in range(n_latents):
            result[gene, latent] = deviance(contingency_table(x, h, selected, gene, latent), model, empty_cell)
    return result


@functools.lru_cache(maxsize=32)
def _design(n_selected: int, model: Model) -> np.ndarray:
    """Design matrix of the null model over all cells in C order, from its formula with interaction terms."""
    strata = [f"C(s{k})" for k in range(n_selected)]
    if model == "conditional":
        formula = "count ~ " + "*".join(["C(h)", *strata]) + " + " + "*".join([*strata, "C(x)"])
    else:
        formula = "count ~ " + "*".join(["C(h)", *strata]) + " + C(x)"
    names = ["h", *[f"s{k}" for k in range(n_selected)], "x"]
    cells = pd.DataFrame(list(product((0, 1), repeat=n_selected + 2)), columns=names)
    cells["count"] = 1.0
    return np.asarray(smf.glm(formula, cells, family=sm.families.Poisson()).exog)


def _full_rank(design: np.ndarray) -> np.ndarray:
    """Linearly independent columns of the design: cells left out make some terms unidentifiable, and IRLS on a
    rank-deficient design oscillates instead of converging."""
    _, r, pivots = scipy.linalg.qr(design, mode="economic", pivoting=True)
    diagonal = np.abs(np.diag(r))
    rank = int((diagonal > 1e-10 * diagonal[0]).sum())
    return design[:, np.sort(pivots[:rank])]


def _margin(table: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Sum over all axes but `axes`, kept broadcastable to the table."""
    return table.sum(axis=tuple(a for a in range(table.ndim) if a not in axes), keepdims=True)


def _corrected(table: np.ndarray, empty_cell: float) -> np.ndarray:
    return np.where(table == 0, empty_cell, table) if empty_cell > 0 else np.asarray(table, dtype=np.float64)


def _column(x: Any, i: int) -> np.ndarray:
    column = x[:, i]
    return column.toarray().ravel() if sp.issparse(column) else np.asarray(column).ravel()
