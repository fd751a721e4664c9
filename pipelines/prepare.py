"""`scdgm prepare`: cell QC (outliers by MADs of this data, or fixed limits), gene QC, labels (given or
marker-annotated), highly variable genes, seeded split.

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
from scdgm.pipelines.annotate import annotate_by_markers, check_thresholds
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
    mito = np.asarray([str(g).upper().startswith("MT-") for g in adata.var_names])
    total = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    mito_counts = np.asarray(counts[:, mito].sum(axis=1), dtype=np.float64).ravel() if mito.any() else None
    metrics = {
        "n_genes": np.diff(counts.indptr),
        "total_counts": total,
        "mito_fraction": np.zeros(adata.n_obs) if mito_counts is None else
        np.divide(mito_counts, total, out=np.zeros(adata.n_obs), where=total > 0),
    }
    limits, skipped = qc_limits(metrics, mito_counts, settings)
    failing = {
        name: metrics[metric] < threshold if side == "<" else metrics[metric] > threshold
        for name, (metric, side, threshold) in limits.items()
    }
    keep = ~np.logical_or.reduce([np.zeros(adata.n_obs, dtype=bool), *failing.values()])
    qc = qc_report(adata, settings["qc"], limits, failing, skipped, keep, settings.get("label_key"))
    if not keep.any():
        n_genes = metrics["n_genes"]
        raise InputError(
            f"no cells left after QC: none of {adata.n_obs} cells passes {describe_limits(qc)} "
            f"(detected genes range {n_genes.min()}-{n_genes.max()}); {QC_HINTS[settings['qc']]}"
        )
    check_split_sizes(int(keep.sum()), settings["split"], qc)
    adata = adata[keep].copy()
    adata.X = counts[keep]
    adata.obs["n_genes"] = metrics["n_genes"][keep].astype(np.int64)
    adata.obs["total_counts"] = total[keep].astype(np.float32)
    adata.obs["mito_fraction"] = metrics["mito_fraction"][keep].astype(np.float32)
    n_cells = np.bincount(adata.X.indices, minlength=adata.n_vars)
    genes = n_cells >= settings["min_cells"]
    if not genes.any():
        raise InputError(
            f"no genes left after QC: none of {adata.n_vars} genes is detected in min_cells={settings['min_cells']} "
            f"of the {adata.n_obs} cells that passed"
        )
    return adata[:, genes].copy(), qc


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
    adata: ad.AnnData,
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
    typer.echo(
        f"wrote {path}: {result.n_obs} cells x {result.n_vars} genes; "
        + ", ".join(f"{name} {count}" for name, count in sizes.items())
        + "; " + describe_qc(result.uns["scdgm_prepare"]["qc"])
    )
