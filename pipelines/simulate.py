"""Simulated count data with planted ground truth: gene programs behind cell types, raw-like droplet counts,
and the binary benchmark.

`simulate_programs` draws negative-binomial counts for cell types driven by known gene programs; `simulate_raw`
draws counts shaped like a droplet experiment before QC and gene selection (~30,000 genes, 13 MT- genes, a few
low-quality cells: the input of `scdgm prepare --label-key cell_type`); `simulate_binary` is the 0/1 benchmark
used to check the log-linear gene selection (docs: loglinear.md). All are seeded and vectorised. The programs and
raw kinds draw their annotations first and their counts a chunk of cells at a time, the same counts whatever the
chunk size, so `scdgm data simulate` writes data larger than memory chunk by chunk (params.yaml scale.*).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from scdgm.chunked import H5adWriter
from scdgm.errors import InputError
from scdgm.pipelines.config import apply_overrides, load_params
from scdgm.pipelines.io import write_h5ad_atomic
from scdgm.pipelines.prepare import split_cells

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

CHUNK_ENTRIES = 4_000_000  # dense cells x genes entries drawn at once (~32 MB of float64)
STATE_FRACTION = 0.3  # share of cells, of every type, in which each cell-state program is on
BLOCK_CELLS = 1024  # raw: cells drawn by one generator seeded by (seed, block), so chunking never changes the data
MT_GENES = ("MT-ND1", "MT-ND2", "MT-CO1", "MT-CO2", "MT-ATP8", "MT-ATP6", "MT-CO3", "MT-ND3", "MT-ND4L", "MT-ND4",
            "MT-ND5", "MT-ND6", "MT-CYB")
"""The 13 protein-coding mitochondrial genes as 10x references name them: the raw kind's last genes."""
RAW_GENE_SD = 2.6  # raw: sd of the genes' log frequencies; ~850 of 30,000 genes are detected at 2,000 counts
RAW_TYPE_SD = 0.25  # raw: sd of each cell type's log shift of every gene (mild differences everywhere)
RAW_LIBRARY_SD = 0.45  # raw: sd of the log library sizes
RAW_MT_FRACTION = 0.03  # raw: median share of a healthy cell's counts from MT- genes (log-normal, sd 0.3)
LOW_QUALITY_LIBRARY = 0.15  # raw: a low-quality cell keeps this share of its library, and 25-50% are MT- counts
RAW_DENSE_GENES = 1000  # raw: the most expressed genes, drawn dense; the rest (a fifth of the counts) by sampling
RAW_NNZ_PER_CELL = 1000  # raw: stored counts per cell assumed when deciding to stream (about 900 are drawn)


class SimulationKind(StrEnum):
    """The simulators the CLI offers."""

    programs = "programs"
    raw = "raw"
    binary = "binary"


def _require(condition: bool, message: str) -> None:
    """Raise an InputError with `message` unless `condition` holds."""
    if not condition:
        raise InputError(message)


def _chunked_csr(cells: range, n_genes: int, draw: Callable[[slice], np.ndarray]) -> sp.csr_matrix:
    """Stack `draw(slice)` (dense counts of a slice of cells) over consecutive slices of `cells`, in order, into
    one float32 CSR matrix."""
    import scipy.sparse as sp

    step = max(1, CHUNK_ENTRIES // max(n_genes, 1))
    return _stacked([
        sp.csr_matrix(draw(slice(start, min(start + step, cells.stop))).astype(np.float32))
        for start in range(cells.start, cells.stop, step)
    ])


def _stacked(parts: list[sp.csr_matrix]) -> sp.csr_matrix:
    """CSR blocks of consecutive cells as one CSR matrix."""
    import scipy.sparse as sp

    return sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]


@dataclass
class Simulation:
    """A simulated data set: its annotations (a row per cell or gene, drawn first) and its counts, drawn on demand
    a chunk of cells at a time, so they can be written without ever being held whole."""

    obs: pd.DataFrame
    var: pd.DataFrame
    obsm: dict[str, np.ndarray]
    uns: dict[str, Any]
    chunks: Callable[[int], Iterator[sp.csr_matrix]]
    """`chunks(chunk_cells)`: float32 CSR counts of consecutive chunks of that many cells (raw: whole blocks, at
    least one), the same counts whatever the chunk size."""

    def anndata(self) -> ad.AnnData:
        """The whole data set in memory."""
        import anndata as ad

        adata = ad.AnnData(X=_stacked(list(self.chunks(len(self.obs)))), obs=self.obs, var=self.var)
        adata.obsm.update(self.obsm)
        adata.uns.update(self.uns)
        return adata

    def write(self, path: str | Path, chunk_cells: int) -> Path:
        """Write the data set to `path` (.h5ad, atomically) drawing and appending `chunk_cells` cells at a time."""
        with H5adWriter(path, len(self.var)) as writer:
            for counts in self.chunks(chunk_cells):
                writer.append(counts)
            writer.finish(self.obs, self.var, self.obsm, self.uns)
        return Path(path)


def _gene_names(n_genes: int) -> list[str]:
    """Neutral gene names ('gene_0001'...): the truth lives in var, not in the names."""
    width = len(str(n_genes))
    return [f"gene_{i:0{width}d}" for i in range(1, n_genes + 1)]


def _categorical(prefix: str, codes: np.ndarray, n_levels: int) -> pd.Categorical:
    """Codes 0..n_levels-1 as a pandas Categorical named '{prefix}_{code}' with every level present."""
    import pandas as pd

    return pd.Categorical.from_codes(codes, categories=[f"{prefix}_{i}" for i in range(n_levels)])


def simulate_programs(n_cells: int, n_genes: int, **options: Any) -> ad.AnnData:
    """`programs_simulation` (the same arguments) drawn whole into memory."""
    return programs_simulation(n_cells, n_genes, **options).anndata()


def programs_simulation(
    n_cells: int,
    n_genes: int,
    n_types: int = 5,
    n_programs: int = 7,
    genes_per_program: int = 25,
    batch_effect: float = 0.0,
    n_batches: int = 1,
    zero_inflation: float = 0.0,
    seed: int = 0,
    program_strength: float = 2.5,
    library_size: float = 1000.0,
    dispersion: float = 10.0,
) -> Simulation:
    """Negative-binomial counts of cell types driven by known gene programs, with the truth kept in the AnnData.

    Each of the first `n_types` programs belongs to one cell type (mean activity `program_strength` there, 0
    elsewhere); the remaining programs are cell states, on (at that strength) in a random 30% of all cells. A cell's
    activities get Gaussian noise (clipped at 0); gene g's log-rate is its baseline plus the sum of its
    programs' activities times its positive weight; library sizes are log-normal around `library_size`.
    Optional per-batch gene scaling (log-normal sd `batch_effect`) and zero inflation (each count zeroed with
    probability `zero_inflation`). Truth: var['program'] (-1 for background genes), var['program_weight'],
    var['dispersion'], obs['cell_type'], obs['batch'], obs['library_size'], obsm['program_activity'],
    uns['simulation'] (parameters and the type-by-program mean activities). The counts continue the design's random
    stream cell after cell (zero inflation has a stream of its own), so any chunking draws the same numbers.
    """
    import pandas as pd

    _require(n_cells >= 1 and n_genes >= 1, "n_cells and n_genes must be at least 1")
    _require(n_types >= 1 and n_batches >= 1, "n_types and n_batches must be at least 1")
    _require(
        n_programs >= n_types,
        f"n_programs ({n_programs}) must be at least n_types ({n_types}): each cell type owns one program",
    )
    _require(genes_per_program >= 1, "genes_per_program must be at least 1")
    _require(
        n_programs * genes_per_program <= n_genes,
        f"{n_programs} programs of {genes_per_program} genes need at least {n_programs * genes_per_program} "
        f"genes, got n_genes={n_genes}",
    )
    _require(0.0 <= zero_inflation < 1.0, f"zero_inflation must be in [0, 1), got {zero_inflation}")
    _require(batch_effect >= 0.0, f"batch_effect must be >= 0, got {batch_effect}")
    _require(library_size > 0 and dispersion > 0, "library_size and dispersion must be positive")
    rng = np.random.default_rng(seed)

    # Genes: baseline frequencies, dispersions, disjoint programs with positive weights.
    log_base = rng.normal(0.0, 1.5, n_genes)
    gene_dispersion = dispersion * np.exp(rng.normal(0.0, 0.3, n_genes))
    expressed = np.flatnonzero(log_base >= np.quantile(log_base, 0.25))  # programs avoid the faintest genes
    if expressed.size < n_programs * genes_per_program:
        expressed = np.arange(n_genes)
    members = rng.permutation(expressed)[: n_programs * genes_per_program].reshape(n_programs, genes_per_program)
    loadings = np.zeros((n_programs, n_genes))  # program x gene weights, one program per gene at most
    for k, genes in enumerate(members):
        loadings[k, genes] = rng.uniform(0.5, 1.5, genes_per_program)
    weight = loadings.sum(axis=0)
    program = np.where(weight > 0, loadings.argmax(axis=0), -1)

    # Cells: unequal type proportions, noisy program activities, library sizes, batches.
    proportions = 1.0 / np.sqrt(np.arange(1, n_types + 1))
    proportions /= proportions.sum()
    cell_type = rng.choice(n_types, size=n_cells, p=proportions)
    type_means = np.zeros((n_types, n_programs))
    type_means[np.arange(n_types), np.arange(n_types)] = program_strength
    activity = type_means[cell_type] + rng.normal(0.0, 0.3, (n_cells, n_programs))
    activity[:, n_types:] += program_strength * (rng.random((n_cells, n_programs - n_types)) < STATE_FRACTION)
    activity = np.clip(activity, 0.0, None)
    library = library_size * np.exp(rng.normal(0.0, 0.35, n_cells))
    batch = rng.integers(0, n_batches, n_cells)
    batch_log_scale = rng.normal(0.0, batch_effect, (n_batches, n_genes)) if batch_effect > 0 else None
    state = rng.bit_generator.state

    def chunks(chunk_cells: int) -> Iterator[sp.csr_matrix]:
        stream = np.random.Generator(np.random.PCG64())
        stream.bit_generator.state = state
        zeroing = np.random.default_rng([seed, 1])

        def draw(cells: slice) -> np.ndarray:
            log_rate = log_base + activity[cells] @ loadings
            if batch_log_scale is not None:
                log_rate += batch_log_scale[batch[cells]]
            rate = np.exp(log_rate - log_rate.max(axis=1, keepdims=True))
            mean = rate * (library[cells] / rate.sum(axis=1))[:, None]
            return stream.negative_binomial(gene_dispersion, gene_dispersion / (gene_dispersion + mean))

        for start in range(0, n_cells, chunk_cells):
            counts = _chunked_csr(range(start, min(start + chunk_cells, n_cells)), n_genes, draw)
            if zero_inflation > 0:
                counts.data[zeroing.random(counts.nnz) < zero_inflation] = 0
                counts.eliminate_zeros()
            yield counts

    obs = pd.DataFrame(
        {
            "cell_type": _categorical("type", cell_type, n_types),
            "batch": _categorical("batch", batch, n_batches),
            "library_size": library.astype(np.float32),
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(
        {"program": program, "program_weight": weight.astype(np.float32), "dispersion": gene_dispersion},
        index=_gene_names(n_genes),
    )
    simulation = {
        "kind": "programs",
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_types": n_types,
        "n_programs": n_programs,
        "genes_per_program": genes_per_program,
        "batch_effect": batch_effect,
        "n_batches": n_batches,
        "zero_inflation": zero_inflation,
        "seed": seed,
        "program_strength": program_strength,
        "library_size": library_size,
        "dispersion": dispersion,
        "type_proportions": proportions,
        "type_program_mean": type_means,
    }
    return Simulation(obs, var, {"program_activity": activity.astype(np.float32)}, {"simulation": simulation}, chunks)


def simulate_raw(n_cells: int, n_genes: int, **options: Any) -> ad.AnnData:
    """`raw_simulation` (the same arguments) drawn whole into memory."""
    return raw_simulation(n_cells, n_genes, **options).anndata()


def raw_simulation(
    n_cells: int,
    n_genes: int,
    n_types: int = 5,
    n_programs: int = 7,
    genes_per_program: int = 25,
    seed: int = 0,
    program_strength: float = 2.5,
    library_size: float = 2000.0,
    low_quality: float = 0.03,
    dispersion: float = 10.0,
) -> Simulation:
    """Counts shaped like a droplet experiment before QC and gene selection, with cell types driven by programs.

    Genes: log-normal frequencies (sd RAW_GENE_SD: at the default 2,000 counts ~850 of 30,000 genes are detected),
    each cell type shifting every gene's log frequency a little (sd RAW_TYPE_SD), the 13 MT- genes last. Programs as
    in `programs_simulation`, on genes drawn from the most expressed 5%. Cells: log-normal library sizes (median
    `library_size`), a log-normal MT- share (median 3%), and a `low_quality` share of damaged cells (15% of the
    library, 25-50% MT- counts) for QC to drop. Program and MT- genes are negative binomial; the other genes are
    Poisson given the cell, drawn as that many counts spread over the cell type's frequencies. Each block of
    BLOCK_CELLS cells has its own generator, seeded by (seed, block). Truth: var['program'] (-1 elsewhere),
    var['program_weight'], obs['cell_type'], obs['library_size'], obs['mt_fraction'], obs['low_quality'],
    obsm['program_activity'], uns['simulation'].
    """
    import pandas as pd
    import scipy.sparse as sp

    n_mt = len(MT_GENES)
    n_plain = n_genes - n_mt
    needed = n_programs * genes_per_program
    _require(n_cells >= 1, "n_cells must be at least 1")
    _require(n_types >= 1 and genes_per_program >= 1, "n_types and genes_per_program must be at least 1")
    _require(
        n_programs >= n_types,
        f"n_programs ({n_programs}) must be at least n_types ({n_types}): each cell type owns one program",
    )
    _require(
        n_plain > needed,
        f"{n_programs} programs of {genes_per_program} genes and {n_mt} MT- genes need more than {needed + n_mt} "
        f"genes, got n_genes={n_genes}",
    )
    _require(0.0 <= low_quality < 1.0, f"low_quality must be in [0, 1), got {low_quality}")
    _require(library_size > 0 and dispersion > 0, "library_size and dispersion must be positive")
    rng = np.random.default_rng(seed)

    # Genes: frequencies, programs among the most expressed, per-type shifts, MT- shares.
    log_base = rng.normal(0.0, RAW_GENE_SD, n_plain)
    log_base -= log_base.max()
    candidates = np.argsort(-log_base)[: max(2 * needed, n_plain // 20)]
    program_genes = rng.permutation(candidates)[:needed]  # program k owns genes k*genes_per_program...
    loadings = np.zeros((n_programs, needed))
    loadings[np.repeat(np.arange(n_programs), genes_per_program), np.arange(needed)] = rng.uniform(0.5, 1.5, needed)
    type_log = log_base + rng.normal(0.0, RAW_TYPE_SD, (n_types, n_plain))
    mt_share = np.exp(rng.normal(0.0, 0.7, n_mt))
    mt_share /= mt_share.sum()
    nb_dispersion = dispersion * np.exp(rng.normal(0.0, 0.3, needed + n_mt))
    program_log = type_log[:, program_genes]
    background = np.setdiff1d(np.arange(n_plain), program_genes)
    common = np.sort(background[np.argsort(-log_base[background])[: min(RAW_DENSE_GENES, background.size // 2)]])
    tail = np.setdiff1d(background, common).astype(np.int32)
    common_weight = np.exp(type_log[:, common])
    tail_weight = np.exp(type_log[:, tail])
    tail_total = tail_weight.sum(axis=1)
    background_total = common_weight.sum(axis=1) + tail_total
    cdf = np.cumsum(tail_weight, axis=1) / tail_total[:, None]
    cdf[:, -1] = 1.0
    cdf = (cdf + np.arange(n_types)[:, None]).ravel()  # type t's cumulative tail frequencies run from t to t + 1
    dense_genes = np.concatenate([program_genes, n_plain + np.arange(n_mt), common])
    dense_order = np.argsort(dense_genes)  # drawn in that order, stored in gene order
    dense_columns = dense_genes[dense_order].astype(np.int32)

    # Cells: types, program activities, library sizes, MT- shares, damaged cells.
    proportions = 1.0 / np.sqrt(np.arange(1, n_types + 1))
    proportions /= proportions.sum()
    cell_type = rng.choice(n_types, size=n_cells, p=proportions)
    type_means = np.zeros((n_types, n_programs))
    type_means[np.arange(n_types), np.arange(n_types)] = program_strength
    activity = type_means[cell_type] + rng.normal(0.0, 0.3, (n_cells, n_programs))
    activity[:, n_types:] += program_strength * (rng.random((n_cells, n_programs - n_types)) < STATE_FRACTION)
    activity = np.clip(activity, 0.0, None)
    library = library_size * np.exp(rng.normal(0.0, RAW_LIBRARY_SD, n_cells))
    mt_fraction = RAW_MT_FRACTION * np.exp(rng.normal(0.0, 0.3, n_cells))
    damaged = rng.random(n_cells) < low_quality
    library[damaged] *= LOW_QUALITY_LIBRARY
    mt_fraction[damaged] = rng.uniform(0.25, 0.5, int(damaged.sum()))

    def block(index: int) -> sp.csr_matrix:
        cells = slice(index * BLOCK_CELLS, min((index + 1) * BLOCK_CELLS, n_cells))
        draws = np.random.default_rng([seed, 2, index])
        types = cell_type[cells]
        n = types.size
        program_rate = np.exp(program_log[types] + activity[cells] @ loadings)
        plain = library[cells] * (1.0 - mt_fraction[cells]) / (background_total[types] + program_rate.sum(axis=1))
        mean = np.hstack([program_rate * plain[:, None], np.outer(library[cells] * mt_fraction[cells], mt_share)])
        dense = np.hstack([
            draws.negative_binomial(nb_dispersion, nb_dispersion / (nb_dispersion + mean)),
            draws.poisson(common_weight[types] * plain[:, None]),
        ])
        dense = sp.csr_matrix(dense[:, dense_order].astype(np.float32))
        dense = sp.csr_matrix((dense.data, dense_columns[dense.indices], dense.indptr), shape=(n, n_genes))
        # The tail: each cell's Poisson total spread over its type's frequencies by sorted uniforms (normalised
        # sums of exponentials), so each cell's genes come out in order and equal neighbours are one count.
        sizes = draws.poisson(plain * tail_total[types])
        spacing = np.cumsum(draws.standard_exponential(int(sizes.sum()) + n))
        last = np.cumsum(sizes + 1) - 1
        before = np.concatenate([[0.0], spacing[last[:-1]]])
        keep = np.ones(spacing.size, dtype=bool)
        keep[last] = False
        owner = np.repeat(np.arange(n), sizes)
        uniform = (spacing[keep] - before[owner]) / (spacing[last] - before)[owner]
        column = np.searchsorted(cdf, types[owner] + uniform, side="right") - types[owner] * tail.size
        column = np.minimum(column, tail.size - 1)
        key = owner * tail.size + column
        starts = np.flatnonzero(np.diff(key, prepend=-1))
        values = np.diff(starts, append=key.size).astype(np.float32)
        indptr = np.concatenate([[0], np.cumsum(np.bincount(owner[starts], minlength=n))])
        counts = sp.csr_matrix((values, tail[column[starts]], indptr), shape=(n, n_genes))
        return counts + dense  # disjoint columns, both sorted: a sorted CSR matrix

    n_blocks = -(-n_cells // BLOCK_CELLS)

    def chunks(chunk_cells: int) -> Iterator[sp.csr_matrix]:
        step = max(1, chunk_cells // BLOCK_CELLS)
        for first in range(0, n_blocks, step):
            yield _stacked([block(index) for index in range(first, min(first + step, n_blocks))])

    obs = pd.DataFrame(
        {
            "cell_type": _categorical("type", cell_type, n_types),
            "library_size": library.astype(np.float32),
            "mt_fraction": mt_fraction.astype(np.float32),
            "low_quality": damaged,
        },
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    program = np.full(n_genes, -1)
    program[program_genes] = np.repeat(np.arange(n_programs), genes_per_program)
    weight = np.zeros(n_genes, dtype=np.float32)
    weight[program_genes] = loadings.sum(axis=0)
    var = pd.DataFrame(
        {"program": program, "program_weight": weight}, index=[*_gene_names(n_plain), *MT_GENES]
    )
    simulation = {
        "kind": "raw",
        "n_cells": n_cells,
        "n_genes": n_genes,
        "n_types": n_types,
        "n_programs": n_programs,
        "genes_per_program": genes_per_program,
        "seed": seed,
        "program_strength": program_strength,
        "library_size": library_size,
        "low_quality": low_quality,
        "dispersion": dispersion,
        "type_proportions": proportions,
        "type_program_mean": type_means,
    }
    return Simulation(obs, var, {"program_activity": activity.astype(np.float32)}, {"simulation": simulation}, chunks)


PROGRAMS_SHAPE = (2000, 2000)
"""`scdgm data simulate --kind programs` without --n-cells/--n-genes."""
BINARY_CELLS, BINARY_NOISE_GENES = 1000, 20
"""The binary benchmark's shape (docs/loglinear.md): `simulate_binary`'s defaults and the CLI's."""


def simulate_binary(
    n_cells: int = BINARY_CELLS,
    n_signal_per_latent: int = 5,
    n_noise: int = BINARY_NOISE_GENES,
    seed: int = 0,
) -> ad.AnnData:
    """The binary benchmark of loglinear.md: 4 groups with 2-D latents N(+-2, 1); signal and noise genes.

    Cells fall in 4 equal groups, one per sign pattern of the latent means (+-2, +-2); z ~ N(mean, I).
    Genes 1..m are 1{z1 + N(0,1) > 0}, genes m+1..2m the same with z2, then `n_noise` Bernoulli(0.5) genes.
    Stored as 0/1 counts. Truth: var['signal_latent'] (0, 1, or -1 for noise), obs['group'],
    obsm['true_latent'], uns['simulation'].
    """
    import anndata as ad
    import pandas as pd

    _require(n_cells >= 1, "n_cells must be at least 1")
    _require(n_signal_per_latent >= 0 and n_noise >= 0, "gene counts must not be negative")
    n_genes = 2 * n_signal_per_latent + n_noise
    _require(n_genes >= 1, "the benchmark needs at least one gene")
    rng = np.random.default_rng(seed)
    group_means = np.array([[2.0, 2.0], [2.0, -2.0], [-2.0, 2.0], [-2.0, -2.0]])
    group = np.arange(n_cells) * len(group_means) // n_cells
    latent = group_means[group] + rng.normal(0.0, 1.0, (n_cells, 2))
    signal_latent = np.concatenate(
        [np.zeros(n_signal_per_latent, int), np.ones(n_signal_per_latent, int), np.full(n_noise, -1)]
    )

    def draw(cells: slice) -> np.ndarray:
        n = cells.stop - cells.start
        noise = rng.normal(0.0, 1.0, (n, 2 * n_signal_per_latent))
        signal = latent[cells][:, signal_latent[signal_latent >= 0]] + noise
        return np.hstack([signal > 0, rng.random((n, n_noise)) < 0.5])

    counts = _chunked_csr(range(n_cells), n_genes, draw)
    obs = pd.DataFrame(
        {"group": _categorical("group", group, len(group_means))}, index=[f"cell_{i}" for i in range(n_cells)]
    )
    var = pd.DataFrame({"signal_latent": signal_latent}, index=_gene_names(n_genes))
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.obsm["true_latent"] = latent.astype(np.float32)
    adata.uns["simulation"] = {
        "kind": "binary",
        "n_cells": n_cells,
        "n_signal_per_latent": n_signal_per_latent,
        "n_noise": n_noise,
        "seed": seed,
        "group_means": group_means,
    }
    return adata


RAW_SHAPE = (10_000, 30_000)
"""`scdgm data simulate --kind raw` without --n-cells/--n-genes."""


def stored_mb_estimate(kind: SimulationKind, n_cells: int, n_genes: int) -> float:
    """MB the counts would take as float32 CSR (as scdgm.chunked measures a file): programs and binary count every
    entry (a bound), raw RAW_NNZ_PER_CELL per cell."""
    per_cell = min(n_genes, RAW_NNZ_PER_CELL) if kind is SimulationKind.raw else n_genes
    return (n_cells * per_cell * 8 + (n_cells + 1) * 8) / 2**20


def scale_settings(overrides: list[str] | None) -> tuple[int, float]:
    """(scale.chunk_cells, scale.stream_above_mb) from the params and `--set scale.<key>=<value>` overrides."""
    strays = [item for item in overrides or [] if not item.strip().startswith("scale.")]
    _require(not strays, f"simulate takes only --set scale.<key>=<value>, got {', '.join(strays)}")
    scale = apply_overrides(load_params(), overrides).get("scale") or {}
    chunk_cells, stream_above_mb = scale.get("chunk_cells"), scale.get("stream_above_mb")
    _require(isinstance(chunk_cells, int) and chunk_cells >= 1, f"scale.chunk_cells must be >= 1, got {chunk_cells}")
    _require(
        isinstance(stream_above_mb, int | float) and stream_above_mb >= 0,
        f"scale.stream_above_mb must be a number >= 0, got {stream_above_mb}",
    )
    return chunk_cells, float(stream_above_mb)


def simulate_command(
    out: Annotated[Path, typer.Option("--out", help="Where to write the .h5ad.")],
    kind: Annotated[
        SimulationKind,
        typer.Option(
            help="programs: NB counts from gene programs, split as by prepare (ready to train); raw: droplet-like "
            "counts before QC (~30,000 genes with MT-, damaged cells; for `scdgm prepare --label-key cell_type`); "
            "binary: 0/1 benchmark."
        ),
    ] = SimulationKind.programs,
    n_cells: Annotated[
        int | None, typer.Option(min=1, help="Number of cells [default: programs 2000, raw 10000, binary 1000].")
    ] = None,
    n_genes: Annotated[
        int | None,
        typer.Option(
            min=1, help="Number of genes, binary: signal + noise [default: programs 2000, raw 30000, binary 30]."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(min=0, help="Random seed; the same seed gives the same data.")] = 0,
    n_types: Annotated[int, typer.Option(min=1, help="programs, raw: number of cell types.")] = 5,
    n_programs: Annotated[int, typer.Option(min=1, help="programs, raw: number of gene programs (>= types).")] = 7,
    genes_per_program: Annotated[int, typer.Option(min=1, help="programs, raw: genes in each program.")] = 25,
    batch_effect: Annotated[float, typer.Option(help="programs: sd of per-batch log gene scaling.")] = 0.0,
    n_batches: Annotated[int, typer.Option(min=1, help="programs: number of batches.")] = 1,
    zero_inflation: Annotated[float, typer.Option(help="programs: probability each count is zeroed.")] = 0.0,
    n_signal_per_latent: Annotated[int, typer.Option(min=0, help="binary: signal genes per latent.")] = 5,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Override scale.chunk_cells or scale.stream_above_mb: programs and raw data whose counts would "
            "take more MB are drawn and written a chunk of cells at a time (the same file either way).",
        ),
    ] = None,
) -> None:
    """Simulate counts with known ground truth and write them as .h5ad."""
    chunk_cells, stream_above_mb = scale_settings(overrides)
    if kind is SimulationKind.binary:
        n_genes = n_genes or 2 * n_signal_per_latent + BINARY_NOISE_GENES
        n_noise = n_genes - 2 * n_signal_per_latent
        _require(n_noise >= 0, f"--n-genes {n_genes} is less than the {2 * n_signal_per_latent} signal genes")
        adata = simulate_binary(n_cells or BINARY_CELLS, n_signal_per_latent=n_signal_per_latent, n_noise=n_noise,
                                seed=seed)
        path = write_h5ad_atomic(adata, out)
        typer.echo(f"wrote {path}: {adata.n_obs} cells x {adata.n_vars} genes (binary, seed {seed})")
        return
    if kind is SimulationKind.programs:
        simulation = programs_simulation(
            n_cells or PROGRAMS_SHAPE[0], n_genes or PROGRAMS_SHAPE[1], n_types=n_types, n_programs=n_programs,
            genes_per_program=genes_per_program, batch_effect=batch_effect, n_batches=n_batches,
            zero_inflation=zero_inflation, seed=seed,
        )
        fractions = (load_params().get("prepare") or {}).get("split") or {}
        simulation.obs["split"] = split_cells(simulation.obs["cell_type"], fractions, seed)
    else:
        simulation = raw_simulation(
            n_cells or RAW_SHAPE[0], n_genes or RAW_SHAPE[1], n_types=n_types, n_programs=n_programs,
            genes_per_program=genes_per_program, seed=seed,
        )
    shape = (len(simulation.obs), len(simulation.var))
    streamed = stored_mb_estimate(kind, *shape) > stream_above_mb
    path = simulation.write(out, chunk_cells) if streamed else write_h5ad_atomic(simulation.anndata(), out)
    how = f", written {chunk_cells} cells at a time" if streamed else ""
    typer.echo(f"wrote {path}: {shape[0]} cells x {shape[1]} genes ({kind.value}, seed {seed}{how})")
