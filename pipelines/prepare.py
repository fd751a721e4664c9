"""`scdgm prepare`: cell and gene QC, labels (given or marker-annotated), highly variable genes, seeded split.

The output keeps raw integer counts in .X and layers['counts'] for the highly variable genes, the label in
obs['cell_type'], the split in obs['split'] (train/validation/test) and the lineage in uns['scdgm_prepare'].
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from scdgm.defaults import default_section
from scdgm.errors import InputError, ScdgmError
from scdgm.pipelines.annotate import annotate_by_markers
from scdgm.pipelines.config import apply_overrides, load_params
from scdgm.pipelines.io import read_counts, validate_counts, write_h5ad_atomic

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
MAX_CLASS_LOSS = 0.2
"""QC dropping a larger share of a labelled class than this is warned about (QC tuned elsewhere cuts cell types)."""
MIN_CELLS_PER_SPLIT = 2
"""Cells each split with a positive fraction must receive: fewer cannot validate (early stopping) or test."""
SETTING_MINIMUMS = (  # (setting, least value, may be null)
    ("n_top_genes", 1, False),
    ("min_genes", 0, False),
    ("max_genes", 1, True),
    ("min_cells", 0, False),
    ("n_pcs", 1, False),
    ("n_neighbors", 2, False),
)
CLI_NAMES = {"n_top_genes": " (--n-top-genes)"}
DEFAULTS: dict[str, Any] = default_section("prepare")
"""The packaged params.yaml's `prepare:` section: what `prepare()` uses for every setting not given."""


def resolve_settings(params: dict[str, Any]) -> dict[str, Any]:
    """The prepare settings: DEFAULTS updated with `params` (the prepare section); unknown keys are errors."""
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ScdgmError(f"unknown prepare parameter(s): {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
    split = params.get("split", {})
    if not isinstance(split, dict) or not set(split) <= set(SPLITS):
        raise ScdgmError(f"prepare.split must map {', '.join(SPLITS)} to fractions, got {split!r}")
    settings = {**DEFAULTS, **params, "split": {**DEFAULTS["split"], **split}}
    split = settings["split"]
    if not all(_is_number(split[s]) for s in SPLITS):
        raise ScdgmError(f"prepare.split fractions must be numbers, got {split!r}")
    fractions = np.array([float(split[s]) for s in SPLITS])
    if (fractions < 0).any() or not np.isclose(fractions.sum(), 1.0):
        raise ScdgmError(f"prepare.split fractions must be >= 0 and sum to 1, got {split!r}")
    for key, minimum, optional in SETTING_MINIMUMS:
        value = settings[key]
        if not (value is None and optional) and not (_is_number(value, integer=True) and value >= minimum):
            allowed = f"an integer >= {minimum}" + (" or null" if optional else "")
            raise ScdgmError(f"prepare.{key}{CLI_NAMES.get(key, '')} must be {allowed}, got {value!r}")
    mito, resolution = settings["max_mito_fraction"], settings["leiden_resolution"]
    if mito is not None and not (_is_number(mito) and 0 <= mito <= 1):
        raise ScdgmError(f"prepare.max_mito_fraction must be in [0, 1] or null, got {mito!r}")
    if not (_is_number(resolution) and 0 < resolution < np.inf):
        raise ScdgmError(f"prepare.leiden_resolution must be a positive number, got {resolution!r}")
    if settings["label_key"] is not None and not isinstance(settings["label_key"], str):
        raise ScdgmError(f"prepare.label_key must be an obs column name or null, got {settings['label_key']!r}")
    return settings


def _is_number(value: Any, integer: bool = False) -> bool:
    """A real number (an integer when `integer`), not a bool or text."""
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    return isinstance(value, kinds) and not isinstance(value, bool)


def check_gene_budget(n_top_genes: int, n_genes: int) -> None:
    """More highly variable genes than the input has genes is a request that cannot be met: refuse it."""
    if n_top_genes > n_genes:
        raise InputError(
            f"--n-top-genes / prepare.n_top_genes asks for {n_top_genes} highly variable genes but the input has "
            f"only {n_genes} genes; ask for at most {n_genes}"
        )


def quality_control(adata: ad.AnnData, settings: dict[str, Any]) -> tuple[ad.AnnData, dict[str, Any]]:
    """Keep cells within the gene-count and mitochondrial limits, then genes detected in enough of them; returns
    the new AnnData and what QC removed (`qc_report`). Too few cells left for the split is a user error.

    Adds obs['n_genes'], obs['total_counts'] and obs['mito_fraction'] (computed over all input genes).
    """
    import scipy.sparse as sp

    counts = sp.csr_matrix(adata.X, dtype=np.float32)
    if (counts.data == 0).any():
        counts = counts.copy()
        counts.eliminate_zeros()
    n_genes = np.diff(counts.indptr)
    total = np.asarray(counts.sum(axis=1)).ravel()
    mito = np.asarray([str(g).upper().startswith("MT-") for g in adata.var_names])
    mito_counts = np.asarray(counts[:, mito].sum(axis=1)).ravel() if mito.any() else np.zeros(adata.n_obs)
    mito_fraction = np.divide(mito_counts, total, out=np.zeros(adata.n_obs), where=total > 0)
    failing = {"min_genes": n_genes < settings["min_genes"]}
    if settings["max_genes"] is not None:
        failing["max_genes"] = n_genes > settings["max_genes"]
    if settings["max_mito_fraction"] is not None:
        failing["max_mito_fraction"] = mito_fraction > settings["max_mito_fraction"]
    keep = ~np.logical_or.reduce(list(failing.values()))
    qc = qc_report(adata, failing, keep, settings.get("label_key"))
    if not keep.any():
        raise InputError(
            f"no cells left after QC: none of {adata.n_obs} cells has min_genes={settings['min_genes']} <= genes "
            f"detected <= max_genes={settings['max_genes']} and mito fraction <= "
            f"max_mito_fraction={settings['max_mito_fraction']} (detected genes range {n_genes.min()}-{n_genes.max()})"
        )
    check_split_sizes(int(keep.sum()), settings["split"], qc)
    adata = adata[keep].copy()
    adata.X = counts[keep]
    adata.obs["n_genes"] = n_genes[keep].astype(np.int64)
    adata.obs["total_counts"] = total[keep].astype(np.float32)
    adata.obs["mito_fraction"] = mito_fraction[keep].astype(np.float32)
    n_cells = np.bincount(adata.X.indices, minlength=adata.n_vars)
    genes = n_cells >= settings["min_cells"]
    if not genes.any():
        raise InputError(
            f"no genes left after QC: none of {adata.n_vars} genes is detected in min_cells={settings['min_cells']} "
            f"of the {adata.n_obs} cells that passed"
        )
    return adata[:, genes].copy(), qc


def qc_report(adata: ad.AnnData, failing: dict[str, np.ndarray], keep: np.ndarray, label_key: str | None) -> dict[str, Any]:
    """What QC removed: cells failing each limit (a cell may fail several), cells dropped and kept, and with
    labels the cells dropped per class; warns when a class loses more than MAX_CLASS_LOSS of its cells."""
    report: dict[str, Any] = {
        "cells_in": int(keep.size),
        "cells_dropped": int((~keep).sum()),
        "dropped_by": {name: int(mask.sum()) for name, mask in failing.items()},
    }
    if label_key is not None and label_key in adata.obs:
        labels = adata.obs[label_key].astype(str).to_numpy()
        names, totals = np.unique(labels, return_counts=True)
        dropped = {str(n): int((~keep & (labels == n)).sum()) for n in names}
        report["dropped_per_class"] = dropped
        for name, total in zip(names, totals, strict=True):
            share = dropped[str(name)] / total
            if share > MAX_CLASS_LOSS:
                logger.warning(
                    "QC drops %d of %d %r cells (%.0f%%, more than %.0f%%): the limits %s may not fit this data; "
                    "the counts are in uns['scdgm_prepare']['qc']", dropped[str(name)], total, str(name), 100 * share,
                    100 * MAX_CLASS_LOSS, ", ".join(f"{k} ({int((m & (labels == name)).sum())})" for k, m in failing.items()),
                )
    return report


def check_split_sizes(n_cells: int, fractions: dict[str, float], qc: dict[str, Any]) -> None:
    """Refuse data that QC left too small for a train/validation/test split, saying what QC removed."""
    smallest = min(fraction for fraction in fractions.values() if fraction > 0)
    needed = int(np.ceil(MIN_CELLS_PER_SPLIT / smallest))
    if n_cells < needed:
        removed = ", ".join(f"{name} {count}" for name, count in qc["dropped_by"].items())
        raise InputError(
            f"only {n_cells} of {qc['cells_in']} cells pass QC, too few for a train/validation/test split "
            f"({MIN_CELLS_PER_SPLIT} cells in each, so at least {needed}); cells failing each limit: {removed}. "
            "Loosen prepare.min_genes / max_genes / max_mito_fraction for this data"
        )


def flag_variable_genes(adata: ad.AnnData, n_top_genes: int) -> None:
    """Set var['highly_variable'] (Seurat v3 flavour on raw counts); every gene, with a warning when QC left fewer
    than asked for."""
    import scanpy as sc

    if adata.n_vars <= n_top_genes:
        if adata.n_vars < n_top_genes:
            logger.warning("only %d genes pass QC, fewer than n_top_genes=%d: keeping them all", adata.n_vars, n_top_genes)
        adata.var["highly_variable"] = True
        return
    sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=n_top_genes)


def split_cells(labels: pd.Series, fractions: dict[str, float], seed: int) -> pd.Categorical:
    """Seeded train/validation/test assignment with the given fractions within each label (stratified).

    Cells of a label are shuffled and cell i of n goes to the split whose cumulative fraction first exceeds
    (i + 0.5) / n, so every label is divided as evenly as its size allows.
    """
    import pandas as pd

    rng = np.random.default_rng(seed)
    groups = pd.factorize(labels)[0]
    bounds = np.cumsum([fractions[s] for s in SPLITS])
    codes = np.empty(len(groups), dtype=np.int64)
    for group in np.unique(groups):
        members = rng.permutation(np.flatnonzero(groups == group))
        position = (np.arange(members.size) + 0.5) / members.size
        codes[members] = np.minimum(np.searchsorted(bounds, position, side="right"), len(SPLITS) - 1)
    return pd.Categorical.from_codes(codes, categories=list(SPLITS))


def prepare(
    adata: ad.AnnData,
    params: dict[str, Any],
    label_key: str | None = None,
    seed: int = 0,
    allow_non_integer: bool = False,
) -> ad.AnnData:
    """QC, labels, highly variable genes and split of a raw-count AnnData; returns a new, ready-to-train AnnData.

    `params` is the prepare section of params.yaml; `label_key` (else params['label_key']) names the obs column
    copied to obs['cell_type']; without one, PBMC cells are annotated by marker genes before gene selection.
    """
    import pandas as pd

    settings = resolve_settings(params)
    label_key = label_key if label_key is not None else settings["label_key"]
    settings["label_key"] = label_key
    if label_key is not None and label_key not in adata.obs:
        columns = ", ".join(map(str, adata.obs.columns)) or "none"
        raise InputError(f"label column {label_key!r} not in obs (columns: {columns})")
    validate_counts(adata, allow_non_integer=allow_non_integer)
    check_gene_budget(settings["n_top_genes"], adata.n_vars)
    n_in = adata.shape
    result, qc = quality_control(adata, settings)
    flag_variable_genes(result, settings["n_top_genes"])
    if label_key is None:
        annotate_by_markers(
            result,
            n_pcs=int(settings["n_pcs"]),
            n_neighbors=int(settings["n_neighbors"]),
            resolution=float(settings["leiden_resolution"]),
            seed=seed,
        )
    else:
        result.obs["cell_type"] = pd.Categorical(result.obs[label_key].astype(str))
    n_qc = result.shape
    result = result[:, result.var["highly_variable"].to_numpy()].copy()
    result.layers["counts"] = result.X.copy()
    result.obs["split"] = split_cells(result.obs["cell_type"], settings["split"], seed)
    result.uns["scdgm_prepare"] = {
        "params": settings,
        "seed": seed,
        "n_cells_in": n_in[0],
        "n_genes_in": n_in[1],
        "n_cells_after_qc": n_qc[0],
        "n_genes_after_qc": n_qc[1],
        "n_genes_out": result.n_vars,
        "split_sizes": {s: int((result.obs["split"] == s).sum()) for s in SPLITS},
        "annotated": label_key is None,
        "qc": qc,
    }
    return result


def prepare_command(
    raw: Annotated[Path, typer.Option("--input", help="Raw counts (.h5ad, 10x .h5/.mtx folder, csv/tsv...).")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the prepared .h5ad.")],
    n_top_genes: Annotated[
        int | None,
        typer.Option(help="Highly variable genes to keep, at least 1 [default: params.yaml prepare.n_top_genes]."),
    ] = None,
    label_key: Annotated[
        str | None, typer.Option(help="obs column with cell labels; none = annotate PBMC by markers.")
    ] = None,
    format_: Annotated[
        str | None, typer.Option("--format", help="Input format; guessed from the name when absent.")
    ] = None,
    transpose: Annotated[bool, typer.Option(help="The input has genes in rows and cells in columns.")] = False,
    allow_non_integer: Annotated[
        bool, typer.Option(help="Accept non-integer counts (e.g. from pseudo-alignment).")
    ] = False,
    params: Annotated[
        Path | None, typer.Option("--params", help="params.yaml to read (the project's by default).")
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a parameter, e.g. --set prepare.min_genes=50.")
    ] = None,
) -> None:
    """Quality-control, label, select genes and split raw counts into a ready-to-train .h5ad."""
    if params is not None and not params.is_file():
        raise ScdgmError(f"params file not found: {params}")
    config = apply_overrides(load_params(params), overrides)
    section = dict(config.get("prepare") or {})
    if n_top_genes is not None:
        section["n_top_genes"] = n_top_genes
    adata = read_counts(raw, format=format_, transpose=transpose, allow_non_integer=allow_non_integer)
    seed = int(config.get("seed", 0))
    result = prepare(adata, section, label_key=label_key, seed=seed, allow_non_integer=allow_non_integer)
    result.uns["scdgm_prepare"]["input"] = str(raw)
    path = write_h5ad_atomic(result, out)
    sizes = result.obs["cell_type"].value_counts()
    qc = result.uns["scdgm_prepare"]["qc"]
    typer.echo(
        f"wrote {path}: {result.n_obs} cells x {result.n_vars} genes; "
        + ", ".join(f"{name} {count}" for name, count in sizes.items())
        + f"; QC dropped {qc['cells_dropped']} of {qc['cells_in']} cells (failing "
        + ", ".join(f"{name} {count}" for name, count in qc["dropped_by"].items()) + ")"
    )
