"""`scdgm prepare`: cell QC (outliers by MADs of this data, or fixed limits), gene QC, labels (given or
marker-annotated), highly variable genes, seeded split.

The output keeps raw integer counts in .X and layers['counts'] for the highly variable genes, the label in
obs['cell_type'], the split in obs['split'] (train/validation/test) and the lineage in uns['scdgm_prepare'].
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from scdgm.defaults import default_section
from scdgm.errors import InputError, ScdgmError
from scdgm.pipelines.annotate import annotate_by_markers, check_thresholds
from scdgm.pipelines.config import apply_overrides, load_params
from scdgm.pipelines.io import _make_unique, read_counts, validate_counts, write_h5ad_atomic
from scdgm.pipelines.stream_prepare import (
    cell_counts,
    count_metrics,
    gene_moments,
    mean_and_variance,
    mito_genes,
    seurat_v3,
    streamed_counts,
    subset,
    write_prepared,
)
from scdgm.pipelines.streaming import scale_settings

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd

    from scdgm.chunked import H5adRows

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
QC_MODES = ("mad", "fixed")
MAD_SCALE = 1.4826
"""Scales the median absolute deviation to the standard deviation of normal data (R's mad, OSCA's isOutlier), so
prepare.nmads reads as standard deviations; the scverse best-practices guide's unscaled 5 MADs are 3.4 of these."""
MAD_ZERO = "MAD is 0 (half the cells or more share the median value), so no outlier limit"
QC_HINTS = {
    "mad": "Raise prepare.nmads / mito_nmads (or mito_ceiling), or set prepare.qc: fixed with limits for this data",
    "fixed": "Loosen prepare.min_genes / max_genes / max_mito_fraction for this data, or set prepare.qc: mad",
}
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
    if settings["qc"] not in QC_MODES:
        raise ScdgmError(f"prepare.qc must be one of {', '.join(QC_MODES)}, got {settings['qc']!r}")
    for key in ("nmads", "mito_nmads"):
        if not (_is_number(settings[key]) and 0 < settings[key] < np.inf):
            raise ScdgmError(f"prepare.{key} must be a positive number, got {settings[key]!r}")
    for key in ("max_mito_fraction", "mito_ceiling"):
        mito = settings[key]
        if mito is not None and not (_is_number(mito) and 0 <= mito <= 1):
            raise ScdgmError(f"prepare.{key} must be in [0, 1] or null, got {mito!r}")
    resolution = settings["leiden_resolution"]
    if not (_is_number(resolution) and 0 < resolution < np.inf):
        raise ScdgmError(f"prepare.leiden_resolution must be a positive number, got {resolution!r}")
    if settings["label_key"] is not None and not isinstance(settings["label_key"], str):
        raise ScdgmError(f"prepare.label_key must be an obs column name or null, got {settings['label_key']!r}")
    check_thresholds(settings["annotation_min_markers"], settings["annotation_min_score"],
                     settings["annotation_min_margin"])  # before QC, and also when labels are given
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
    """Keep cells within the QC limits (`qc_limits`: MAD outliers or fixed limits), then genes detected in enough
    of them; returns the new AnnData and what QC removed (`qc_report`). Too few cells left for the split is a user
    error.

    Adds obs['n_genes'], obs['total_counts'] and obs['mito_fraction'] (computed over all input genes).
    """
    import scipy.sparse as sp

    counts = sp.csr_matrix(adata.X, dtype=np.float32)
    if (counts.data == 0).any():
        counts = counts.copy()
        counts.eliminate_zeros()
    total, n_genes, mito_counts = count_metrics(counts, mito_genes(adata.var_names))
    metrics = cell_metrics(total, n_genes, mito_counts)
    keep, qc = select_cells(metrics, mito_counts, settings, adata.obs)
    adata = adata[keep].copy()
    adata.X = counts[keep]
    add_metrics(adata.obs, metrics, keep)
    genes = select_genes(np.bincount(adata.X.indices, minlength=adata.n_vars), settings["min_cells"], adata.n_obs)
    return adata[:, genes].copy(), qc


def cell_metrics(total: np.ndarray, n_genes: np.ndarray, mito_counts: np.ndarray | None) -> dict[str, np.ndarray]:
    """The QC metrics of every cell: genes detected, total counts and the fraction of counts from MT- genes."""
    return {
        "n_genes": n_genes,
        "total_counts": total,
        "mito_fraction": np.zeros(total.size) if mito_counts is None else
        np.divide(mito_counts, total, out=np.zeros(total.size), where=total > 0),
    }


def select_cells(
    metrics: dict[str, np.ndarray], mito_counts: np.ndarray | None, settings: dict[str, Any], obs: pd.DataFrame
) -> tuple[np.ndarray, dict[str, Any]]:
    """The cells within the QC limits (a mask) and the `qc_report`; no cell left, or too few for the split, is a
    user error naming the limits."""
    limits, skipped = qc_limits(metrics, mito_counts, settings)
    n_obs = metrics["total_counts"].size
    failing = {
        name: metrics[metric] < threshold if side == "<" else metrics[metric] > threshold
        for name, (metric, side, threshold) in limits.items()
    }
    keep = ~np.logical_or.reduce([np.zeros(n_obs, dtype=bool), *failing.values()])
    qc = qc_report(obs, settings["qc"], limits, failing, skipped, keep, settings.get("label_key"))
    if not keep.any():
        n_genes = metrics["n_genes"]
        raise InputError(
            f"no cells left after QC: none of {n_obs} cells passes {describe_limits(qc)} "
            f"(detected genes range {n_genes.min()}-{n_genes.max()}); {QC_HINTS[settings['qc']]}"
        )
    check_split_sizes(int(keep.sum()), settings["split"], qc)
    return keep, qc


def add_metrics(obs: pd.DataFrame, metrics: dict[str, np.ndarray], keep: np.ndarray) -> None:
    """Set obs['n_genes'], obs['total_counts'] and obs['mito_fraction'] of the kept cells (`obs` holds only them)."""
    obs["n_genes"] = metrics["n_genes"][keep].astype(np.int64)
    obs["total_counts"] = metrics["total_counts"][keep].astype(np.float32)
    obs["mito_fraction"] = metrics["mito_fraction"][keep].astype(np.float32)


def select_genes(n_cells: np.ndarray, min_cells: int, n_obs: int) -> np.ndarray:
    """The genes detected in at least `min_cells` of the `n_obs` cells that passed QC (`n_cells`: cells per gene)."""
    genes = n_cells >= min_cells
    if not genes.any():
        raise InputError(
            f"no genes left after QC: none of {n_cells.size} genes is detected in min_cells={min_cells} "
            f"of the {n_obs} cells that passed"
        )
    return genes


def qc_limits(
    metrics: dict[str, np.ndarray], mito_counts: np.ndarray | None, settings: dict[str, Any]
) -> tuple[dict[str, tuple[str, str, float]], dict[str, str]]:
    """The cell QC limits as {name: (metric, '<' or '>', threshold)}: cells beyond a threshold fail it; and the
    metrics left unfiltered, with why ({metric: reason}). `mito_counts` is None without MT- genes (no mito limit).

    `qc: mad` flags outliers on log scales (MADs scaled to a standard deviation, MAD_SCALE): total counts and
    genes detected beyond `nmads` MADs of the median log1p on either side; the mito fraction above `mito_nmads`
    MADs of the median log fraction (one count added to MT- and total counts), and above `mito_ceiling` when set.
    On the log scale a cell type with a few times more MT- reads is not an outlier while dying cells (most
    reads MT-) are; on the plain fraction a class with twice the median would be cut. A metric whose MAD is 0 (half
    the cells share one value) has no spread to judge outliers by and is not filtered by MADs. `qc: fixed`
    applies min_genes, max_genes and max_mito_fraction as given.
    """
    limits: dict[str, tuple[str, str, float]] = {}
    skipped: dict[str, str] = {}
    if settings["qc"] == "fixed":
        limits["min_genes"] = ("n_genes", "<", settings["min_genes"])
        if settings["max_genes"] is not None:
            limits["max_genes"] = ("n_genes", ">", settings["max_genes"])
    else:
        for metric in ("total_counts", "n_genes"):
            centre, spread = median_and_mad(np.log1p(metrics[metric]))
            if spread == 0:
                skipped[metric] = MAD_ZERO
                continue
            reach = settings["nmads"] * spread
            limits[f"{metric}_low"] = (metric, "<", float(np.expm1(centre - reach)))
            limits[f"{metric}_high"] = (metric, ">", float(np.expm1(centre + reach)))
    if mito_counts is None:
        skipped["mito_fraction"] = "no MT- genes"
    elif settings["qc"] == "fixed":
        if settings["max_mito_fraction"] is not None:
            limits["max_mito_fraction"] = ("mito_fraction", ">", settings["max_mito_fraction"])
    else:
        centre, spread = median_and_mad(np.log1p(mito_counts) - np.log1p(metrics["total_counts"]))
        if spread == 0:
            skipped["mito_fraction"] = MAD_ZERO
        else:
            limits["mito_fraction_high"] = ("mito_fraction", ">", min(1.0, float(np.exp(centre + settings["mito_nmads"] * spread))))
        if settings["mito_ceiling"] is not None:
            limits["mito_ceiling"] = ("mito_fraction", ">", settings["mito_ceiling"])
    return limits, skipped


def median_and_mad(values: np.ndarray) -> tuple[float, float]:
    """The median and the median absolute deviation from it, scaled by MAD_SCALE."""
    centre = float(np.median(values))
    return centre, MAD_SCALE * float(np.median(np.abs(values - centre)))


def qc_report(
    obs: pd.DataFrame,
    mode: str,
    limits: dict[str, tuple[str, str, float]],
    failing: dict[str, np.ndarray],
    skipped: dict[str, str],
    keep: np.ndarray,
    label_key: str | None,
) -> dict[str, Any]:
    """What QC removed: the mode, each limit's threshold and the cells failing it (a cell may fail several), the
    metrics not filtered and why, cells dropped, and with labels the cells dropped per class; warns when a class
    loses more than MAX_CLASS_LOSS of its cells."""
    report: dict[str, Any] = {
        "mode": mode,
        "cells_in": int(keep.size),
        "cells_dropped": int((~keep).sum()),
        "limits": {name: f"{metric} {side} {show(threshold)}" for name, (metric, side, threshold) in limits.items()},
        "thresholds": {name: float(threshold) for name, (_, _, threshold) in limits.items()},
        "dropped_by": {name: int(mask.sum()) for name, mask in failing.items()},
        "skipped": skipped,
    }
    if label_key is not None and label_key in obs:
        labels = obs[label_key].astype(str).to_numpy()
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


def show(value: float) -> str:
    """A threshold as text: whole numbers as integers, others to four significant digits (no exponent)."""
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"


def describe_limits(qc: dict[str, Any]) -> str:
    """The QC limits of a `qc_report` in one line: mode, each limit with its threshold, the metrics not filtered."""
    limits = ", ".join(qc["limits"].values()) or "no limit"
    skipped = "".join(f"; {metric} not filtered: {why}" for metric, why in qc["skipped"].items())
    return f"qc={qc['mode']} limits (a cell fails one when {limits}){skipped}"


def describe_qc(qc: dict[str, Any]) -> str:
    """What QC dropped, for the terminal: the cells dropped, and per limit its threshold and the cells failing it."""
    failing = ", ".join(f"{qc['limits'][name]}: {count}" for name, count in qc["dropped_by"].items()) or "none"
    skipped = "".join(f"; {metric} not filtered: {why}" for metric, why in qc["skipped"].items())
    return (f"QC (qc={qc['mode']}) dropped {qc['cells_dropped']} of {qc['cells_in']} cells; cells failing each limit: "
            f"{failing}{skipped}")


def check_split_sizes(n_cells: int, fractions: dict[str, float], qc: dict[str, Any]) -> None:
    """Refuse data that QC left too small for a train/validation/test split, saying what QC removed."""
    smallest = min(fraction for fraction in fractions.values() if fraction > 0)
    needed = int(np.ceil(MIN_CELLS_PER_SPLIT / smallest))
    if n_cells < needed:
        removed = ", ".join(f"{name} ({qc['limits'][name]}) {count}" for name, count in qc["dropped_by"].items())
        raise InputError(
            f"only {n_cells} of {qc['cells_in']} cells pass QC, too few for a train/validation/test split "
            f"({MIN_CELLS_PER_SPLIT} cells in each, so at least {needed}); cells failing each limit: {removed}. "
            + QC_HINTS[qc["mode"]]
        )


def flag_variable_genes(adata: ad.AnnData, n_top_genes: int) -> None:
    """Set var['highly_variable'] (Seurat v3 flavour on raw counts); every gene, with a warning when QC left fewer
    than asked for."""
    import scanpy as sc

    if keeps_every_gene(adata.n_vars, n_top_genes):
        adata.var["highly_variable"] = True
        return
    sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=n_top_genes)


def keeps_every_gene(n_genes: int, n_top_genes: int) -> bool:
    """Whether QC left no more genes than n_top_genes (then all are kept, with a warning when fewer)."""
    if n_genes < n_top_genes:
        logger.warning("only %d genes pass QC, fewer than n_top_genes=%d: keeping them all", n_genes, n_top_genes)
    return n_genes <= n_top_genes


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
            min_markers=settings["annotation_min_markers"],
            min_score=settings["annotation_min_score"],
            min_margin=settings["annotation_min_margin"],
        )
    else:
        result.obs["cell_type"] = pd.Categorical(result.obs[label_key].astype(str))
    n_qc = result.shape
    result = result[:, result.var["highly_variable"].to_numpy()].copy()
    result.layers["counts"] = result.X.copy()
    result.obs["split"] = split_cells(result.obs["cell_type"], settings["split"], seed)
    result.uns["scdgm_prepare"] = lineage(settings, seed, n_in, n_qc, result.n_vars, result.obs["split"], qc)
    return result


def lineage(
    settings: dict[str, Any],
    seed: int,
    shape_in: tuple[int, int],
    shape_qc: tuple[int, int],
    n_genes_out: int,
    split: pd.Series,
    qc: dict[str, Any],
) -> dict[str, Any]:
    """uns['scdgm_prepare']: the settings, seed, shapes in / after QC, genes out, split sizes and the QC report."""
    return {
        "params": settings,
        "seed": seed,
        "n_cells_in": shape_in[0],
        "n_genes_in": shape_in[1],
        "n_cells_after_qc": shape_qc[0],
        "n_genes_after_qc": shape_qc[1],
        "n_genes_out": n_genes_out,
        "split_sizes": {s: int((split == s).sum()) for s in SPLITS},
        "annotated": settings["label_key"] is None,
        "qc": qc,
    }


NEEDS_LABELS = (
    "the input is larger than scale.stream_above_mb ({limit} MB; its counts take {size:.0f} MB), so it is prepared "
    "a chunk of cells at a time and cannot be annotated by markers (that clusters all cells in memory): give "
    "--label-key (an obs column with the labels) or raise scale.stream_above_mb to annotate in memory"
)


def prepare_streamed(
    rows: H5adRows,
    out: Path,
    params: dict[str, Any],
    scale: dict[str, Any],
    label_key: str | None = None,
    seed: int = 0,
    allow_non_integer: bool = False,
) -> tuple[pd.Series, dict[str, Any]]:
    """`prepare` of the counts of `rows` written to `out` (X and layers['counts'], float32 CSR), reading
    `scale['chunk_cells']` cells at a time; returns the kept cells' labels (obs['cell_type']) and the lineage
    (uns['scdgm_prepare']).

    Labels must be given (`label_key`, else params['label_key']): marker annotation needs all cells in memory.
    """
    import anndata as ad
    import pandas as pd

    settings = resolve_settings(params)
    label_key = label_key if label_key is not None else settings["label_key"]
    settings["label_key"] = label_key
    if label_key is None:
        raise InputError(NEEDS_LABELS.format(limit=scale["stream_above_mb"], size=rows.stored_mb))
    names = ad.AnnData(obs=rows.obs, var=rows.var)  # names only: the counts stay on disk
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*names are not unique")
        _make_unique(names, rows.path)
    obs, var = names.obs, names.var
    if label_key not in obs:
        columns = ", ".join(map(str, obs.columns)) or "none"
        raise InputError(f"label column {label_key!r} not in obs (columns: {columns})")
    if rows.n_cells == 0 or rows.n_genes == 0:
        raise InputError(f"{rows.path}: the count matrix is empty: {rows.n_cells} cells x {rows.n_genes} genes")
    check_gene_budget(settings["n_top_genes"], rows.n_genes)
    chunk_cells = int(scale["chunk_cells"])

    mito = mito_genes(var.index)
    total, n_genes, mito_counts = cell_counts(rows, obs.index, var.index, mito, chunk_cells, allow_non_integer)
    metrics = cell_metrics(total, n_genes, mito_counts)
    keep, qc = select_cells(metrics, mito_counts, settings, obs)
    n_kept = int(keep.sum())
    detected, sums, squares = gene_moments(rows, keep, chunk_cells)
    genes = select_genes(detected, settings["min_cells"], n_kept)
    var = subset(var, genes)
    if keeps_every_gene(int(genes.sum()), settings["n_top_genes"]):
        var["highly_variable"] = True
        uns_hvg: dict[str, Any] = {}
    else:
        means, variances = mean_and_variance(sums[genes], squares[genes], n_kept)
        table = seurat_v3(rows, keep, genes, means, variances, settings["n_top_genes"], chunk_cells)
        for column in table.columns:
            var[column] = table[column].to_numpy()
        uns_hvg = {"hvg": {"flavor": "seurat_v3"}}
    hvg = var["highly_variable"].to_numpy()
    columns = np.flatnonzero(genes)[hvg]

    obs = subset(obs, keep)
    add_metrics(obs, metrics, keep)
    obs["cell_type"] = pd.Categorical(obs[label_key].astype(str))
    obs["split"] = split_cells(obs["cell_type"], settings["split"], seed)
    var = subset(var, hvg)
    info = lineage(settings, seed, (rows.n_cells, rows.n_genes), (n_kept, int(genes.sum())), int(hvg.sum()),
                   obs["split"], qc)
    info["input"] = str(rows.path)
    write_prepared(rows, out, keep, columns, (obs, var, {**rows.uns(), **uns_hvg, "scdgm_prepare": info}), chunk_cells)
    return obs["cell_type"], info


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
    """Quality-control, label, select genes and split raw counts into a ready-to-train .h5ad; an .h5ad whose counts
    take more than scale.stream_above_mb is prepared a chunk of cells at a time (`prepare_streamed`)."""
    if params is not None and not params.is_file():
        raise ScdgmError(f"params file not found: {params}")
    config = apply_overrides(load_params(params), overrides)
    section = dict(config.get("prepare") or {})
    if n_top_genes is not None:
        section["n_top_genes"] = n_top_genes
    seed = int(config.get("seed", 0))
    scale = scale_settings(config)
    rows = streamed_counts(raw, format_, transpose, scale)
    if rows is not None:
        with rows:
            labels, info = prepare_streamed(rows, out, section, scale, label_key, seed, allow_non_integer)
        typer.echo(summary(out, (labels.size, info["n_genes_out"]), labels, info["qc"]))
        return
    adata = read_counts(raw, format=format_, transpose=transpose, allow_non_integer=allow_non_integer)
    result = prepare(adata, section, label_key=label_key, seed=seed, allow_non_integer=allow_non_integer)
    result.uns["scdgm_prepare"]["input"] = str(raw)
    path = write_h5ad_atomic(result, out)
    typer.echo(summary(path, result.shape, result.obs["cell_type"], result.uns["scdgm_prepare"]["qc"]))


def summary(path: Path, shape: tuple[int, int], cell_types: pd.Series, qc: dict[str, Any]) -> str:
    """The one line `scdgm prepare` prints: the file written, its shape, cells per type and what QC dropped."""
    sizes = cell_types.value_counts()
    return (f"wrote {path}: {shape[0]} cells x {shape[1]} genes; "
            + ", ".join(f"{name} {count}" for name, count in sizes.items()) + "; " + describe_qc(qc))
