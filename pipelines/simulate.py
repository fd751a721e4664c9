"""Simulated count data with planted ground truth: gene programs behind cell types, and the binary benchmark.

`simulate_programs` draws negative-binomial counts for cell types driven by known gene programs;
`simulate_binary` is the 0/1 benchmark used to check the log-linear gene selection (docs: loglinear.md).
Both are seeded, vectorised and built in chunks of cells, so a million cells fit in memory as sparse counts.
"""
from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import numpy as np
import typer

from scdgm.errors import InputError
from scdgm.pipelines.io import write_h5ad_atomic

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

CHUNK_ENTRIES = 4_000_000  # dense cells x genes entries drawn at once (~32 MB of float64)
STATE_FRACTION = 0.3  # share of cells, of every type, in which each cell-state program is on


class SimulationKind(StrEnum):
    """The simulators the CLI offers."""

    programs = "programs"
    binary = "binary"


def _require(condition: bool, message: str) -> None:
    """Raise an InputError with `message` unless `condition` holds."""
    if not condition:
        raise InputError(message)


def _chunked_csr(n_cells: int, n_genes: int, draw: Callable[[slice], np.ndarray]) -> sp.csr_matrix:
    """Stack `draw(cells)` (dense counts of a slice of cells) into one float32 CSR matrix, chunk by chunk."""
    import scipy.sparse as sp

    step = max(1, CHUNK_ENTRIES // max(n_genes, 1))
    chunks = [
        sp.csr_matrix(draw(slice(start, min(start + step, n_cells))).astype(np.float32))
        for start in range(0, n_cells, step)
    ]
    return sp.vstack(chunks, format="csr") if len(chunks) > 1 else chunks[0]


def _gene_names(n_genes: int) -> list[str]:
    """Neutral gene names ('gene_0001'...): the truth lives in var, not in the names."""
    width = len(str(n_genes))
    return [f"gene_{i:0{width}d}" for i in range(1, n_genes + 1)]


def _categorical(prefix: str, codes: np.ndarray, n_levels: int) -> pd.Categorical:
    """Codes 0..n_levels-1 as a pandas Categorical named '{prefix}_{code}' with every level present."""
    import pandas as pd

    return pd.Categorical.from_codes(codes, categories=[f"{prefix}_{i}" for i in range(n_levels)])


def simulate_programs(
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
) -> ad.AnnData:
    """Negative-binomial counts of cell types driven by known gene programs, with the truth kept in the AnnData.

    Each of the first `n_types` programs belongs to one cell type (mean activity `program_strength` there, 0
    elsewhere); the remaining programs are cell states, on (at that strength) in a random 30% of all cells. A cell's
    activities get Gaussian noise (clipped at 0); gene g's log-rate is its baseline plus the sum of its
    programs' activities times its positive weight; library sizes are log-normal around `library_size`.
    Optional per-batch gene scaling (log-normal sd `batch_effect`) and zero inflation (each count zeroed with
    probability `zero_inflation`). Truth: var['program'] (-1 for background genes), var['program_weight'],
    var['dispersion'], obs['cell_type'], obs['batch'], obs['library_size'], obsm['program_activity'],
    uns['simulation'] (parameters and the type-by-program mean activities).
    """
    import anndata as ad
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

    def draw(cells: slice) -> np.ndarray:
        log_rate = log_base + activity[cells] @ loadings
        if batch_log_scale is not None:
            log_rate += batch_log_scale[batch[cells]]
        rate = np.exp(log_rate - log_rate.max(axis=1, keepdims=True))
        mean = rate * (library[cells] / rate.sum(axis=1))[:, None]
        return rng.negative_binomial(gene_dispersion, gene_dispersion / (gene_dispersion + mean))

    counts = _chunked_csr(n_cells, n_genes, draw)
    if zero_inflation > 0:
        counts.data[rng.random(counts.nnz) < zero_inflation] = 0
        counts.eliminate_zeros()

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
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.obsm["program_activity"] = activity.astype(np.float32)
    adata.uns["simulation"] = {
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
    return adata


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

    counts = _chunked_csr(n_cells, n_genes, draw)
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


def simulate_command(
    out: Annotated[Path, typer.Option("--out", help="Where to write the .h5ad.")],
    kind: Annotated[
        SimulationKind, typer.Option(help="programs: NB counts from gene programs; binary: 0/1 benchmark.")
    ] = SimulationKind.programs,
    n_cells: Annotated[
        int | None, typer.Option(min=1, help="Number of cells [default: programs 2000, binary 1000].")
    ] = None,
    n_genes: Annotated[
        int | None,
        typer.Option(min=1, help="Number of genes, binary: signal + noise [default: programs 2000, binary 30].")
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same data.")] = 0,
    n_types: Annotated[int, typer.Option(min=1, help="programs: number of cell types.")] = 5,
    n_programs: Annotated[int, typer.Option(min=1, help="programs: number of gene programs (>= types).")] = 7,
    genes_per_program: Annotated[int, typer.Option(min=1, help="programs: genes in each program.")] = 25,
    batch_effect: Annotated[float, typer.Option(help="programs: sd of per-batch log gene scaling.")] = 0.0,
    n_batches: Annotated[int, typer.Option(min=1, help="programs: number of batches.")] = 1,
    zero_inflation: Annotated[float, typer.Option(help="programs: probability each count is zeroed.")] = 0.0,
    n_signal_per_latent: Annotated[int, typer.Option(min=0, help="binary: signal genes per latent.")] = 5,
) -> None:
    """Simulate counts with known ground truth and write them as .h5ad."""
    if kind is SimulationKind.programs:
        adata = simulate_programs(
            n_cells or PROGRAMS_SHAPE[0], n_genes or PROGRAMS_SHAPE[1], n_types=n_types, n_programs=n_programs, genes_per_program=genes_per_program,
            batch_effect=batch_effect, n_batches=n_batches, zero_inflation=zero_inflation, seed=seed,
        )
    else:
        n_genes = n_genes or 2 * n_signal_per_latent + BINARY_NOISE_GENES
        n_noise = n_genes - 2 * n_signal_per_latent
        _require(n_noise >= 0, f"--n-genes {n_genes} is less than the {2 * n_signal_per_latent} signal genes")
        adata = simulate_binary(n_cells or BINARY_CELLS, n_signal_per_latent=n_signal_per_latent, n_noise=n_noise,
                                seed=seed)
    path = write_h5ad_atomic(adata, out)
    typer.echo(f"wrote {path}: {adata.n_obs} cells x {adata.n_vars} genes ({kind.value}, seed {seed})")
