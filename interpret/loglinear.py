"""Step-wise log-linear selection of the genes whose states go with the latents (Hess et al. 2020), in closed form.

Given the genes S chosen so far, candidate gene i and latent j span the table (h_j, x_S, x_i). Its G² against a
null log-linear model scores the candidate:
- "conditional" [h_j S][S x_i]: m = n(h,S)·n(S,x)/n(S), G² = 2N·I(x_i; h_j | x_S);
- "joint" [h_j S][x_i]: m = n(h,S)·n(x)/N, G² = 2N·I(x_i; h_j, x_S).
Both models are decomposable, so their fit is closed form and every table of a step follows from one product of
a one-hot "stratum of x_S × latent" matrix with X: n(stratum, h_j = 1, x_i = 1) for all candidates and latents.

empty_cell = e > 0 is the original code's continuity correction: every empty cell of the full 2 × 2^|S| × 2
observed table, strata of x_S never seen included, is set to e before fitting. Margins and the total are then
those of the corrected table, so G² is no longer 2N·I: strata that were empty add nothing under the conditional
model, but under the joint model each adds 4e pseudo-observations and a term of its own. With e = 0 (default)
empty cells stay empty and 0·log 0 = 0.

Permutations (rows of (h, x_S) permuted against X) leave each stratum's size n(c) and latent counts
L_cj = n(c, h_j = 1) unchanged: only the x side of the tables moves. On the CPU the permuted counts come from one
dense one-hot product when there are at most DENSE_STRATA strata, else stratum by stratum: a small BLAS product of
the stratum's latent weights with the X rows that the permutation pairs with its (h, x_S) rows, so counting costs
the same at every step. Beyond permutation-invariant terms, a stratum-latent pair's G² depends on its two cell
counts a = n(c, h_j = 1, x_i = 1) and b = n(c, h_j = 0, x_i = 1) only: for a small stratum every value is tabulated
once per step, with weights chosen so that the product gives each cell's table position a·(n(c) − L_cj + 1) + b
directly (one look-up per cell); larger strata look up k·log k. With e = 0 a pair where h_j is constant adds
nothing under the conditional model, and a stratum of one sample nothing under either: both are skipped. The result
equals the one-hot formulation (kept for the torch backend) to float rounding, whatever the batch size.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import product
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from threadpoolctl import ThreadpoolController

from scdgm.errors import InputError, ScdgmError
from scdgm.interpret.permutation import Backend, PermutationResult, permutation_test

Model = Literal["conditional", "joint"]
MODELS = ("conditional", "joint")
MAX_SELECTED = 62
"""Strata of x_S are coded in int64 bits."""
WORK_ELEMENTS = 1 << 22
"""Largest array (stratum-latent-candidate cells or gathered rows, times permutations; a look-up table) built at
once."""
MAX_BATCH = 64
"""Permutations per batch at most: larger batches gain little and delay the early stop."""
BLOCK_COLUMNS = 1 << 13
"""Permutations × candidates scored together per stratum on the CPU: the block's work arrays stay in cache."""
TABLE_ELEMENTS = 1 << 18
"""Largest look-up table of one stratum's G² terms (float64, 2 MiB: its look-ups hit the cache); larger strata look
up k·log k."""
DENSE_LIMIT_BYTES = 1 << 29
"""A sparse X up to this size as dense uint8 is made dense: its rows are then gathered and multiplied by BLAS."""
DENSE_STRATA = 3
"""With this many observed strata or fewer the CPU counts come from one dense one-hot product (no gather)."""


@dataclass
class SelectionResult:
    """Genes chosen step by step, with each step's G², winning latent, p-value and full G² matrix (p × q)."""

    genes: list[int]
    g2: list[float]
    latents: list[int]
    pvalues: list[float] | None
    matrices: list[np.ndarray]
    model: Model
    empty_cell: float
    stopped_early: bool = False
    stop_pvalue: float | None = None
    """When selection stopped because a step's p-value exceeded alpha: that p-value (its gene is not kept)."""
    null_max: list[float] | None = None
    """Per step, the largest G² any permutation reached: G² / null_max > 1 ranks steps whose p-values all sit at
    the floor 1 / (permutations + 1) (p is then an upper bound: more permutations could only lower it)."""
    permutations: int = 0

    def to_frame(self, gene_names: Sequence[str] | None = None) -> pd.DataFrame:
        """One row per step: gene index (and name), winning latent, G², p-value and, with permutations, the
        p-value floor, whether p sits at it, the permutations' largest G² and G² relative to it."""
        tested = self.pvalues is not None
        floor = 1.0 / (self.permutations + 1) if tested else np.nan
        frame = pd.DataFrame({
            "step": np.arange(1, len(self.genes) + 1),
            "gene_index": self.genes,
            "latent": self.latents,
            "g2": self.g2,
            "pvalue": self.pvalues if tested else np.nan,
            "pvalue_floor": floor,
            "at_floor": [bool(p <= floor * (1 + 1e-9)) for p in self.pvalues] if tested else False,
            "null_max_g2": self.null_max if tested else np.nan,
            "g2_over_null_max": np.asarray(self.g2) / np.asarray(self.null_max) if tested else np.nan,
        })
        if gene_names is not None:
            frame.insert(2, "gene", [gene_names[i] for i in self.genes])
        return frame


@dataclass(frozen=True)
class _Strata:
    """Observed configurations of x_S: each sample's stratum index, their number, and how many were never seen."""

    selected: tuple[int, ...]
    codes: np.ndarray
    size: int
    unseen: float
    latent_counts: np.ndarray = field(repr=False)
    """(C, q, 1): n(stratum, h_j = 1)."""
    sizes: np.ndarray = field(repr=False)
    """(C, 1, 1): n(stratum)."""


class LogLinearProblem:
    """Binary genes X (n × p) and latents H (n × q), checked and stored once, scored for any selected set S."""

    def __init__(
        self,
        x: Any,
        h: Any,
        model: Model = "conditional",
        empty_cell: float = 0.0,
        device: str = "cpu",
    ) -> None:
        if model not in MODELS:
            raise ScdgmError(f"model must be one of {MODELS}, got {model!r}")
        if not (np.isfinite(empty_cell) and empty_cell >= 0):
            raise ScdgmError(f"empty_cell must be >= 0, got {empty_cell}")
        self.x = _binary_genes(x)
        self.h = _binary_latents(h, self.x.shape[0])
        self.model = model
        self.empty_cell = float(empty_cell)
        self.device = _resolve_device(device)
        self._backend = _backend_for(self.device, self.x)
        self._last_strata: _Strata | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(samples, genes, latents)."""
        return self.x.shape[0], self.x.shape[1], self.h.shape[1]

    def g2(self, selected: Sequence[int] = ()) -> np.ndarray:
        """G² of every candidate gene × latent given the selected genes (p × q; NaN rows for selected genes)."""
        return self._g2_batch(self._strata(selected), None)[0]

    def null_max(self, selected: Sequence[int], permutations: np.ndarray) -> np.ndarray:
        """Max G² over candidates and latents with the rows of (h, x_S) permuted by each row of `permutations`."""
        values = self._g2_batch(self._strata(selected), np.asarray(permutations))
        return np.nanmax(values.reshape(values.shape[0], -1), axis=1)

    def n_strata(self, selected: Sequence[int]) -> int:
        """Number of configurations of the selected genes seen among the samples."""
        return self._strata(selected).size

    def batch_size(self, selected: Sequence[int]) -> int:
        """Permutations per array operation: at most MAX_BATCH, with the work arrays within WORK_ELEMENTS."""
        return self._backend.batch_size(self._strata(selected), self.h.shape[1])

    def resample(self, rows: np.ndarray) -> LogLinearProblem:
        """The same problem on the given rows (a bootstrap resample), without checking the data again."""
        clone = object.__new__(LogLinearProblem)
        clone.__dict__.update(self.__dict__)
        clone.x = self.x[rows]
        clone.h = self.h[rows]
        clone._backend = _backend_for(self.device, clone.x)
        clone._last_strata = None
        return clone

    def _strata(self, selected: Sequence[int]) -> _Strata:
        """Code the samples by their configuration of x_S, keeping only observed configurations (the last S is
        kept: permutation batches of one step reuse it)."""
        selected = tuple(int(i) for i in selected)
        if self._last_strata is not None and self._last_strata.selected == selected:
            return self._last_strata
        n, p, q = self.shape
        if len(set(selected)) != len(selected) or any(not 0 <= i < p for i in selected):
            raise ScdgmError(f"selected genes must be distinct indices in [0, {p}), got {list(selected)}")
        if len(selected) > MAX_SELECTED:
            raise ScdgmError(f"at most {MAX_SELECTED} genes can be selected")
        columns = self.x[:, list(selected)]
        bits = (columns.toarray() if sp.issparse(columns) else columns).astype(np.int64)
        _, codes = np.unique(bits @ (np.int64(1) << np.arange(len(selected), dtype=np.int64)), return_inverse=True)
        size = int(codes.max()) + 1
        onehot = sp.csr_matrix((np.ones(n, dtype=np.intp), (codes, np.arange(n))), shape=(size, n))
        latent_counts = np.asarray(onehot @ self.h).astype(np.intp)[:, :, None]
        sizes = np.bincount(codes, minlength=size).astype(np.intp)[:, None, None]
        self._last_strata = _Strata(selected, codes, size, 2.0 ** len(selected) - size, latent_counts, sizes)
        return self._last_strata

    def _g2_batch(self, strata: _Strata, permutations: np.ndarray | None) -> np.ndarray:
        """G² (b × p × q) for each permutation of the rows of (h, x_S), or for the data as it is (b = 1)."""
        result = self._backend.g2(strata, self.h, permutations, self.model, self.empty_cell)
        result[:, :, list(strata.selected)] = np.nan
        return result.transpose(0, 2, 1)


def g2_matrix(
    x: Any,
    h: Any,
    selected: Sequence[int] = (),
    model: Model = "conditional",
    empty_cell: float = 0.0,
    device: str = "cpu",
) -> np.ndarray:
    """One step's G² for every candidate gene × latent (p × q) given the selected genes S (NaN rows for S)."""
    return LogLinearProblem(x, h, model, empty_cell, device).g2(selected)


def stepwise_select(
    x: Any,
    h: Any,
    n_genes: int,
    model: Model = "conditional",
    empty_cell: float = 0.0,
    permutations: int = 0,
    alpha: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    n_jobs: int = 1,
    backend: Backend = "threads",
) -> SelectionResult:
    """Select n_genes genes greedily by the largest G² over candidates × latents (Hess et al. 2020).

    With permutations > 0 each step gets a max-statistic permutation p-value (family-wise over candidates and
    latents); with alpha, selection stops at the first step whose p-value exceeds it. n_jobs and backend
    ("threads" or "ray") spread the permutations.
    """
    if alpha is not None and permutations <= 0:
        raise ScdgmError("alpha needs permutations > 0")
    problem = LogLinearProblem(x, h, model, empty_cell, device)
    return _select(problem, n_genes, permutations, alpha, seed, n_jobs, backend)


def step_test(
    problem: LogLinearProblem,
    selected: Sequence[int],
    permutations: int,
    alpha: float | None = None,
    seed: int | np.random.SeedSequence = 0,
    n_jobs: int = 1,
    backend: Backend = "threads",
) -> PermutationResult:
    """Max-statistic permutation test of one step: rows of (h, x_S) permuted against the candidate genes."""
    if backend == "ray" and problem.device != "cpu":
        raise ScdgmError("backend='ray' sends the problem to CPU workers: use device='cpu' with it")
    selected = tuple(selected)
    observed = float(np.nanmax(problem.g2(selected)))
    statistic = functools.partial(problem.null_max, selected)
    return permutation_test(statistic, observed, problem.shape[0], permutations,
                            batch_size=problem.batch_size(selected), alpha=alpha, seed=seed,
                            n_jobs=n_jobs, backend=backend)


def selection_stability(
    x: Any,
    h: Any,
    n_genes: int,
    n_boot: int = 50,
    seed: int = 0,
    model: Model = "conditional",
    empty_cell: float = 0.0,
    device: str = "cpu",
) -> np.ndarray:
    """Fraction of bootstrap resamples of the synthetic draws in which each gene is selected (length p)."""
    if n_boot < 1:
        raise ScdgmError(f"n_boot must be >= 1, got {n_boot}")
    problem = LogLinearProblem(x, h, model, empty_cell, device)
    n, p, _ = problem.shape
    rng = np.random.default_rng(seed)
    hits = np.zeros(p)
    for _ in range(n_boot):
        hits[_select(problem.resample(rng.integers(0, n, size=n)), n_genes).genes] += 1
    return hits / n_boot


def _select(
    problem: LogLinearProblem,
    n_genes: int,
    permutations: int = 0,
    alpha: float | None = None,
    seed: int = 0,
    n_jobs: int = 1,
    backend: Backend = "threads",
) -> SelectionResult:
    """The greedy loop of `stepwise_select` on a prepared problem."""
    if not 1 <= n_genes <= min(problem.shape[1], MAX_SELECTED):
        raise ScdgmError(f"n_genes must be in [1, {min(problem.shape[1], MAX_SELECTED)}], got {n_genes}")
    result = SelectionResult([], [], [], [] if permutations > 0 else None, [], problem.model, problem.empty_cell,
                             null_max=[] if permutations > 0 else None, permutations=permutations)
    for step in range(n_genes):
        matrix = problem.g2(result.genes)
        gene, latent = np.unravel_index(np.nanargmax(matrix), matrix.shape)
        if permutations > 0:
            test = step_test(problem, result.genes, permutations, alpha, np.random.SeedSequence([seed, step]),
                             n_jobs, backend)
            if alpha is not None and test.pvalue > alpha:
                result.stopped_early, result.stop_pvalue = True, test.pvalue
                break
            result.pvalues.append(test.pvalue)
            result.null_max.append(float(test.null.max()))
        result.genes.append(int(gene))
        result.latents.append(int(latent))
        result.g2.append(float(matrix[gene, latent]))
        result.matrices.append(matrix)
    return result


def _bin_entries(strata: _Strata, h: np.ndarray, permutations: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Non-zero entries (bin, sample) of the one-hot matrix: bin (b, c, j) holds the samples that permutation b
    puts in stratum c with h_j = 1; j = q collects the whole stratum."""
    n, q = h.shape
    augmented = np.hstack([h.astype(bool), np.ones((n, 1), dtype=bool)])
    if permutations is None:
        codes, flags = strata.codes[None, :], augmented[None]
    else:
        codes, flags = strata.codes[permutations], augmented[permutations]
    batch = codes.shape[0]
    bins = (np.arange(batch)[:, None] * strata.size + codes)[:, :, None] * (q + 1) + np.arange(q + 1)
    samples = np.broadcast_to(np.arange(n)[None, :, None], bins.shape)
    return bins[flags], samples[flags]


def _g2_exact(counts: Any, latent_counts: Any, sizes: Any, model: Model, xlogx: Any) -> Any:
    """G² (b × q × P) without correction, from integer counts (b × C × (q+1) × P) of n(c, h_j = 1, x_i = 1) and,
    at j = q, n(c, x_i = 1); latent_counts (C × q × 1) = n(c, h_j = 1), sizes (C × 1 × 1) = n(c).

    G²/2 = Σ T(n(h,S,x)) − Σ T(n(h,S)) − Σ T(n(S,x)) + Σ T(n(S)) (conditional), or with T(n(x)) and T(N) for the
    last two (joint), where T(k) = k·log k is looked up in `xlogx`. Only the first sum is per gene × latent.
    Works on numpy arrays and torch tensors alike.
    """
    n11, n_x1 = counts[:, :, :-1, :], counts[:, :, -1:, :]
    n01 = n_x1 - n11
    cells = (xlogx[n11].sum(-3) + xlogx[n01].sum(-3) + xlogx[latent_counts - n11].sum(-3)
             + xlogx[(sizes - latent_counts) - n01].sum(-3))
    h_term = (xlogx[latent_counts] + xlogx[sizes - latent_counts]).sum(-3)
    if model == "conditional":
        x_term = (xlogx[n_x1] + xlogx[sizes - n_x1]).sum(-3)
        total_term = xlogx[sizes].sum()
    else:
        n, x1 = sizes.sum(), n_x1.sum(-3)
        x_term = xlogx[x1] + xlogx[n - x1]
        total_term = xlogx[n]
    return 2 * (cells - h_term - x_term + total_term)


def _g2_corrected(xp: Any, counts: Any, latent_counts: Any, sizes: Any, model: Model, empty_cell: float,
                  unseen: float) -> Any:
    """G² (b × q × P) with empty cells set to empty_cell, from float counts laid out as for `_g2_exact`.

    Margins change with the correction, so every cell is scored as n·log(n/m) (xp: numpy or torch).
    """
    n11, n_x1 = counts[:, :, :-1, :], counts[:, :, -1:, :]
    cells = [[sizes - latent_counts - n_x1 + n11, n_x1 - n11], [latent_counts - n11, n11]]  # cells[h][x]
    cells = [[xp.where(cell == 0, empty_cell, cell) for cell in row] for row in cells]
    h_margin = [row[0] + row[1] for row in cells]
    x_margin = [cells[0][x] + cells[1][x] for x in (0, 1)]
    if model == "conditional":
        stratum = h_margin[0] + h_margin[1]
        terms = [cells[a][b] * xp.log(cells[a][b] * stratum / (h_margin[a] * x_margin[b]))
                 for a, b in product((0, 1), (0, 1))]
        return 2 * sum(terms).sum(-3)
    x_total = [margin.sum(-3) + 2 * empty_cell * unseen for margin in x_margin]
    total = x_total[0] + x_total[1]
    terms = [cells[a][b] * xp.log(cells[a][b] * total[:, None] / (h_margin[a] * x_total[b][:, None]))
             for a, b in product((0, 1), (0, 1))]
    unseen_strata = sum(xp.log(total / (2 * x_total[b])) for b in (0, 1))  # four cells of e, m = 2e·n(x)/N each
    return 2 * (sum(terms).sum(-3) + 2 * empty_cell * unseen * unseen_strata)


def _xlogx_table(n: int) -> np.ndarray:
    """k·log k for k = 0..n (0·log 0 = 0)."""
    k = np.arange(n + 1, dtype=np.float64)
    return k * np.log(np.maximum(k, 1.0))


@dataclass(frozen=True)
class _Scored:
    """A stratum the CPU engine scores: its latents, its samples' weights in the count product, and how the product
    turns into G² terms."""

    stratum: int
    latents: slice | np.ndarray
    """The latents scored in it (slice(None): all)."""
    rows: slice | np.ndarray
    """Their rows, then the stratum's total row, among the q + 1 rows of a dense one-hot block."""
    weights: np.ndarray
    """(scored latents [+ 1]) × n(c) float32. With a table: (n(c) − L_j)·h_j + 1 per latent, L_j = n(c, h_j = 1), so
    the product is a·(n(c) − L_j + 1) + b, the table position of the cell counts a = n(c, h_j = 1, x_i = 1) and
    b = n(c, h_j = 0, x_i = 1). Without: h_j per latent, then ones (n(c, x_i = 1))."""
    offsets: np.ndarray | None
    """With a table: where each latent's terms start in it ((scored latents × 1) float32)."""
    ones: np.ndarray
    """L_j per scored latent ((scored latents × 1) intp)."""
    size: int


@dataclass(frozen=True)
class _Plan:
    """One selected set's strata laid out for the CPU engine."""

    strata: _Strata
    order: np.ndarray
    """Sample rows sorted by stratum: stratum c's are order[bounds[c]:bounds[c + 1]]."""
    bounds: np.ndarray
    scored: list[_Scored]
    """With e = 0 the strata with a latent that varies in them (conditional) or ≥ 2 samples (joint); else all."""
    table: np.ndarray
    """Per tabled stratum and latent, the G² terms of every cell count pair (a, b): see `_cell_terms`."""
    constant: np.ndarray
    """(q, 1): the permutation-invariant part of G²/2, Σ_c [T(n(c)) (conditional only) − T(L_j) − T(n(c) − L_j)]
    over the scored stratum-latent pairs."""

    @property
    def largest(self) -> int:
        """Samples in the largest scored stratum."""
        return max((scored.size for scored in self.scored), default=1)


def _plan(strata: _Strata, h: np.ndarray, model: Model, empty_cell: float, xlogx: np.ndarray,
          dense: bool) -> _Plan:
    """Lay out one selected set's strata for `_NumpyCounts`; without the dense one-hot product, strata whose terms
    fit in TABLE_ELEMENTS (and all of them together in WORK_ELEMENTS) get a look-up table."""
    n, q = h.shape
    sizes, latent = strata.sizes[:, 0, 0], strata.latent_counts[:, :, 0]
    order = np.argsort(strata.codes, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    if empty_cell > 0:
        scored = np.ones((strata.size, q), dtype=bool)  # corrected: every cell counts
    elif model == "conditional":
        scored = (latent > 0) & (latent < sizes[:, None])
    else:
        scored = np.repeat(sizes[:, None] >= 2, q, axis=1)
    augmented = np.hstack([h, np.ones((n, 1), dtype=h.dtype)]).astype(np.float32)
    blocks, tables, tabled = [], [], 0
    for c in np.flatnonzero(scored.any(axis=1)):
        chosen = np.flatnonzero(scored[c])
        size, ones = int(sizes[c]), latent[c, chosen][:, None]
        samples = augmented[order[bounds[c]:bounds[c + 1]]]
        lengths = ((ones + 1) * (size - ones + 1)).ravel()
        entries = int(lengths.sum())
        offsets = None
        if not dense and empty_cell == 0 and entries <= TABLE_ELEMENTS and tabled + entries <= WORK_ELEMENTS:
            weights = (size - ones) * samples[:, chosen].T + 1
            offsets = (tabled + np.cumsum(lengths) - lengths).astype(np.float32)[:, None]
            tables += [_cell_terms(xlogx, size, int(m), model) for m in ones.ravel()]
            tabled += entries
        else:
            weights = samples[:, np.append(chosen, q)].T
        every = chosen.size == q
        blocks.append(_Scored(int(c), slice(None) if every else chosen, slice(None) if every else np.append(chosen, q),
                              np.ascontiguousarray(weights, dtype=np.float32), offsets, ones, size))
    h_term = xlogx[latent] + xlogx[sizes[:, None] - latent]
    stratum_term = xlogx[sizes][:, None] if model == "conditional" else 0.0
    constant = np.where(scored, stratum_term - h_term, 0.0).sum(axis=0)[:, None]
    table = np.concatenate(tables) if tables else np.empty(0)
    return _Plan(strata, order, bounds, blocks, table, constant)


def _cell_terms(xlogx: np.ndarray, size: int, ones: int, model: Model) -> np.ndarray:
    """G²/2 terms of one stratum-latent pair that depend on the cell counts, at position a·(size − ones + 1) + b:
    T(a) + T(ones − a) + T(b) + T(size − ones − b), less T(a + b) + T(size − a − b) (conditional)."""
    a = np.arange(ones + 1)[:, None]
    b = np.arange(size - ones + 1)[None, :]
    terms = xlogx[a] + xlogx[ones - a] + xlogx[b] + xlogx[size - ones - b]
    if model == "conditional":
        terms -= xlogx[a + b] + xlogx[size - a - b]
    return terms.ravel()


class _NumpyCounts:
    """Counts and G² with numpy/BLAS on the CPU, stratum by stratum (see the module docstring)."""

    def __init__(self, x: np.ndarray | sp.csr_matrix) -> None:
        self.x = x
        n = x.shape[0]
        self.xlogx = _xlogx_table(n)
        ones = np.asarray(x.sum(axis=0)).ravel().astype(np.intp)
        self.joint_term = self.xlogx[n] - self.xlogx[ones] - self.xlogx[n - ones]
        """T(N) − T(n(x_i = 1)) − T(n(x_i = 0)) per gene: the joint model's permutation-invariant x term."""
        self._plan: _Plan | None = None

    def batch_size(self, strata: _Strata, q: int) -> int:
        n, p = self.x.shape
        if strata.size <= DENSE_STRATA:
            return max(1, min(MAX_BATCH, WORK_ELEMENTS // (strata.size * (q + 1) * max(n, p))))
        largest = int(strata.sizes.max())
        return max(1, min(MAX_BATCH, BLOCK_COLUMNS // p, WORK_ELEMENTS // (largest * p)))

    def g2(self, strata: _Strata, h: np.ndarray, permutations: np.ndarray | None, model: Model,
           empty_cell: float) -> np.ndarray:
        """G² (b × q × p) for each permutation of the rows of (h, x_S) (the identity when None)."""
        n, p = self.x.shape
        q = h.shape[1]
        dense = strata.size <= DENSE_STRATA
        plan = self._plan
        if plan is None or plan.strata is not strata:
            plan = self._plan = _plan(strata, h, model, empty_cell, self.xlogx, dense)
        permutations = np.arange(n)[None, :] if permutations is None else permutations
        batch = permutations.shape[0]
        if dense:
            onehot = _dense_onehot(strata, h, permutations)
            columns = WORK_ELEMENTS // max(n, onehot.shape[0])
        else:
            inverse = np.empty_like(permutations)
            inverse[np.arange(batch)[:, None], permutations] = np.arange(n)
            sources = inverse[:, plan.order]  # the X rows paired with the sorted (h, x_S) rows
            columns = min(BLOCK_COLUMNS, WORK_ELEMENTS // plan.largest) // batch
        if empty_cell > 0:
            columns = min(columns, WORK_ELEMENTS // (strata.size * (q + 1) * batch))
        width = max(1, min(p, columns))
        result = np.empty((batch, q, p))
        with _blas_controller().limit(limits=1, user_api="blas"):
            for start in range(0, p, width):
                genes = slice(start, min(p, start + width))
                x = self.x[:, genes] if width < p else self.x
                if dense:
                    counts = _product(onehot, x).reshape(strata.size, q + 1, -1)
                    blocks = (counts[scored.stratum][scored.rows] for scored in plan.scored)
                else:
                    blocks = (scored.weights @ _rows(x, sources[:, plan.bounds[scored.stratum]:
                                                                plan.bounds[scored.stratum + 1]].T)
                              for scored in plan.scored)
                if empty_cell > 0:
                    values = self._corrected(plan, blocks, model, empty_cell, batch)
                else:
                    values = self._exact(plan, blocks, model, genes, batch)
                result[:, :, genes] = values.reshape(q, batch, -1).transpose(1, 0, 2)
        return result

    def _exact(self, plan: _Plan, blocks: Iterator[np.ndarray], model: Model, genes: slice,
               batch: int) -> np.ndarray:
        """G² (q × b·genes; columns permutation-major, then gene) from each scored stratum's count block."""
        total = np.zeros((plan.constant.shape[0], batch * (genes.stop - genes.start)))
        for block, scored in zip(blocks, plan.scored, strict=True):
            if scored.offsets is not None:
                positions = np.add(block, scored.offsets, out=np.empty(block.shape, dtype=np.intp), casting="unsafe")
                total[scored.latents] += plan.table.take(positions)
            else:
                total[scored.latents] += self._terms(block, scored, model)
        total += plan.constant
        if model == "joint":
            total += np.tile(self.joint_term[genes], batch)
        return 2 * total

    def _terms(self, block: np.ndarray, scored: _Scored, model: Model) -> np.ndarray:
        """`_cell_terms` looked up in the k·log k table, from a block of n(c, h_j = 1, x_i = 1) rows and the
        n(c, x_i = 1) row."""
        xlogx = self.xlogx
        both, x_ones = block[:-1].astype(np.intp), block[-1:].astype(np.intp)
        only_x = x_ones - both
        ones, size = scored.ones, scored.size
        terms = xlogx.take(both) + xlogx.take(ones - both) + xlogx.take(only_x) + xlogx.take(size - ones - only_x)
        if model == "conditional":
            terms -= xlogx.take(x_ones) + xlogx.take(size - x_ones)
        return terms

    @staticmethod
    def _corrected(plan: _Plan, blocks: Iterator[np.ndarray], model: Model, empty_cell: float,
                   batch: int) -> np.ndarray:
        """G² with the continuity correction: all strata's blocks into the layout of `_g2_corrected`."""
        strata = plan.strata
        counts = np.stack([block.astype(np.float64) for block in blocks])  # every stratum is scored
        counts = counts.reshape(strata.size, counts.shape[1], batch, -1).transpose(2, 0, 1, 3)
        values = _g2_corrected(np, counts, strata.latent_counts.astype(np.float64),
                               strata.sizes.astype(np.float64), model, empty_cell, strata.unseen)
        return values.transpose(1, 0, 2)


def _dense_onehot(strata: _Strata, h: np.ndarray, permutations: np.ndarray) -> np.ndarray:
    """Dense one-hot matrix (C·(q+1)·b × n): row (c, j, b) holds the samples that permutation b puts in stratum c
    with h_j = 1; j = q collects the whole stratum."""
    n = permutations.shape[1]
    flags = np.hstack([h.astype(bool), np.ones((n, 1), dtype=bool)])[permutations].transpose(2, 0, 1)
    codes = strata.codes[permutations]
    onehot = (codes == np.arange(strata.size)[:, None, None, None]) & flags
    return onehot.reshape(-1, n).astype(np.float32)


def _product(onehot: np.ndarray, x: np.ndarray | sp.csr_matrix) -> np.ndarray:
    """onehot @ X as float32 (a BLAS product for dense X)."""
    if sp.issparse(x):
        return np.ascontiguousarray((x.T @ onehot.T).T, dtype=np.float32)
    return onehot @ x.astype(np.float32)


def _rows(x: np.ndarray | sp.csr_matrix, index: np.ndarray) -> np.ndarray:
    """X's rows at index (S × b) as float32 S × (b·genes), permutation-major within a row."""
    if sp.issparse(x):
        return x[index.ravel()].toarray().reshape(index.shape[0], -1)
    return x[index].reshape(index.shape[0], -1).astype(np.float32)


class _TorchCounts:
    """Count products and G² with torch on a GPU (sparse one-hot product in float32, G² in float64)."""

    def __init__(self, x: np.ndarray | sp.csr_matrix, device: str) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        dense = x.toarray() if sp.issparse(x) else x
        self.x = torch.as_tensor(np.asarray(dense, dtype=np.float32), device=self.device)
        self.xlogx = torch.as_tensor(_xlogx_table(x.shape[0]), device=self.device)

    def batch_size(self, strata: _Strata, q: int) -> int:
        n, p = self.x.shape
        return max(1, min(MAX_BATCH, WORK_ELEMENTS // (strata.size * (q + 1) * max(n, p))))

    def g2(self, strata: _Strata, h: np.ndarray, permutations: np.ndarray | None, model: Model,
           empty_cell: float) -> np.ndarray:
        """G² (b × q × p): one sparse one-hot product per chunk of candidates, every stratum-latent cell scored."""
        n, p = self.x.shape
        q = h.shape[1]
        rows, samples = _bin_entries(strata, h, permutations)
        batch = 1 if permutations is None else permutations.shape[0]
        shape = (batch * strata.size * (q + 1), n)
        width = max(1, WORK_ELEMENTS // (batch * strata.size * (q + 1)))
        result = np.empty((batch, q, p))
        for start in range(0, p, width):
            stop = min(p, start + width)
            counts = self._counts(rows, samples, shape, slice(start, stop))
            result[:, :, start:stop] = self._g2(counts.reshape(batch, strata.size, q + 1, stop - start), strata,
                                                model, empty_cell)
        return result

    def _counts(self, rows: np.ndarray, samples: np.ndarray, shape: tuple[int, int], columns: slice) -> Any:
        torch = self.torch
        indices = torch.as_tensor(np.stack([rows, samples]), device=self.device)
        values = torch.ones(rows.size, dtype=torch.float32, device=self.device)
        onehot = torch.sparse_coo_tensor(indices, values, shape, check_invariants=False)
        return torch.sparse.mm(onehot, self.x[:, columns].contiguous())

    def _g2(self, counts: Any, strata: _Strata, model: Model, empty_cell: float) -> np.ndarray:
        torch = self.torch
        if empty_cell == 0:
            as_int = functools.partial(torch.as_tensor, dtype=torch.int64, device=self.device)
            values = _g2_exact(counts.round().to(torch.int64), as_int(strata.latent_counts), as_int(strata.sizes),
                               model, self.xlogx)
        else:
            as_float = functools.partial(torch.as_tensor, dtype=torch.float64, device=self.device)
            values = _g2_corrected(torch, counts.to(torch.float64), as_float(strata.latent_counts),
                                   as_float(strata.sizes), model, empty_cell, strata.unseen)
        return values.cpu().numpy()


@functools.cache
def _blas_controller() -> ThreadpoolController:
    """BLAS runs single-threaded in the skinny count products: multi-threaded OpenBLAS is up to 15 times slower
    on them when the cores are busy, and parallelism comes from n_jobs over permutations instead."""
    return ThreadpoolController()


def _resolve_device(device: str) -> str:
    """'cpu', 'cuda[:k]', or 'auto' (CUDA when torch sees a GPU)."""
    if device == "cpu":
        return device
    if device != "auto" and not device.startswith("cuda"):
        raise ScdgmError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    import torch

    if torch.cuda.is_available():
        return "cuda" if device == "auto" else device
    if device == "auto":
        return "cpu"
    raise ScdgmError(f"device {device!r} asked for, but torch sees no CUDA GPU")


def _backend_for(device: str, x: np.ndarray | sp.csr_matrix) -> _NumpyCounts | _TorchCounts:
    return _NumpyCounts(x) if device == "cpu" else _TorchCounts(x, device)


def _binary_genes(x: Any) -> np.ndarray | sp.csr_matrix:
    """Check X is a 2-D 0/1 matrix; return it dense as uint8 when that fits in DENSE_LIMIT_BYTES, else as float32
    CSR."""
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float32, copy=True)
        x.sum_duplicates()
        values = x.data
    else:
        x = np.asarray(x)
        values = x
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(f"genes must be a non-empty samples × genes matrix, got shape {x.shape}")
    if not ((values == 0) | (values == 1)).all():
        raise InputError("genes must be binary (0/1): discretise them first")
    if sp.issparse(x) and x.shape[0] * x.shape[1] <= DENSE_LIMIT_BYTES:
        return x.toarray().astype(np.uint8)
    return x if sp.issparse(x) else np.ascontiguousarray(x, dtype=np.uint8)


def _binary_latents(h: Any, n: int) -> np.ndarray:
    """Check H is n × q and 0/1; return it as uint8."""
    h = h.toarray() if sp.issparse(h) else np.asarray(h)
    if h.ndim != 2 or h.shape[0] != n or h.shape[1] == 0:
        raise InputError(f"latents must be a {n} × q matrix (same samples as the genes), got shape {h.shape}")
    if not ((h == 0) | (h == 1)).all():
        raise InputError("latents must be binary (0/1): discretise them first")
    return h.astype(np.uint8)
