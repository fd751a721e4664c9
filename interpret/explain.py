"""The whole explanation of a fitted model: synthetic cells → discretisation → step-wise log-linear gene selection
with permutation p-values → patterns → label transfer, plus loadings (linear models) or integrated-gradient
attributions (the others), latent–label association and plots.

`explain(model, adata)` computes it in memory as an `Explanation` (selected genes, p-values, the report, label
transfer to new cells) and records a summary in adata.uns['scdgm_explanation']; `Explanation.save(directory)`
writes the folder `scdgm explain` writes, atomically: explanation.json (the report), reference.json (what
`interpret.explainer.Explainer` needs to explain new cells), CSV tables and PNG figures. Posterior draws carry
their source cell's label, so label-transfer accuracy is measured against it; prior draws are reported separately.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scdgm.errors import InputError, ScdgmError
from scdgm.files import atomic_path
from scdgm.formats import EXPLANATION_FILE, REFERENCE_FILE
from scdgm.interpret.association import label_latents, latent_association
from scdgm.interpret.attributions import (
    global_attributions,
    latent_mean_function,
    top_attributed_genes,
    typical_profile,
)
from scdgm.interpret.discretize import GENE_CUTS, Discretizer, fit_discretizer
from scdgm.interpret.explainer import REFERENCE_FORMAT, REFERENCE_VERSION, Explainer, log_normalized
from scdgm.interpret.genesets import immune_gene_sets, read_gmt
from scdgm.interpret.label_transfer import LabelReference, build_reference, check_abstention, transfer_accuracy
from scdgm.interpret.loadings import RANKING, gene_importance, gene_statistics, summarize_loadings
from scdgm.interpret.loglinear import SelectionResult, selection_stability, stepwise_select
from scdgm.interpret.patterns import PatternSummary, summarize_patterns
from scdgm.interpret.plots import (
    latent_scatter,
    loadings_chart,
    pattern_heatmap,
    pattern_map,
    project_2d,
    selection_path,
    transfer_map,
)
from scdgm.models.base import GenerativeModel, LinearDecoder, Samples
from scdgm.models.data import counts_view, model_counts, split_mask

EXPLANATION_FORMAT = "scdgm-explanation"
UNLABELLED = "unlabelled"
"""The one label of the reference when the data have no labels: it then only counts patterns."""
MAX_ASSOCIATION_LEVELS = 50
UNS_KEY = "scdgm_explanation"
"""Where `explain` puts its summary in the AnnData (JSON-like values only, so .write_h5ad works)."""
CSV_OPTIONS: dict[str, dict[str, Any]] = {
    "loadings.csv": {"index_label": "gene"},
    "attributions.csv": {"index_label": "gene"},
    "gene_weights.csv": {"index_label": "gene"},
    "cells.csv": {"index_label": "cell"},
    "confusion.csv": {},
}
"""How each table is written (the others without their index)."""


AUTO_DRAWS_TARGET = 10_000
"""Synthetic cells an explanation aims for when `draws` is unset: on the binary benchmark (1,000 cells) one
draw per cell lets noise genes in after 6-7 signal genes, 10 draws rank all 10 first (docs/loglinear.md)."""
AUTO_DRAWS_MAX = 10


@dataclass
class ExplainSettings:
    """Options of an explanation (the `explain:` section of params.yaml)."""

    n_genes: int = 8
    max_cells: int | None = 100_000
    """Cells explained at most: larger data are explained on a seeded random subset of this many (streamed data
    read only those); None = every cell."""
    draws: int | None = None
    """Posterior draws per cell; None = enough for AUTO_DRAWS_TARGET synthetic cells, 1 to AUTO_DRAWS_MAX."""
    prior_cells: int | None = None
    """Prior draws reported separately; None = as many as there are cells, 0 = none."""
    permutations: int = 200
    alpha: float | None = None
    gene_cut: str = "two-group"
    """How genes are cut (interpret/discretize.py): two-group (Otsu on log1p counts) or quantile."""
    quantile: float = 0.5
    latent_rule: str = "sign"
    selection_model: str = "conditional"
    empty_cell: float = 0.0
    label_key: str = "cell_type"
    abstain_distance: int | None = 0
    """Label transfer abstains ("unassigned") on a pattern further than this (Hamming) from every seen pattern;
    None = never on distance."""
    abstain_min_cells: int = 1
    """... and on a matched pattern seen in fewer real cells than this."""
    n_patterns: int = 20
    stability_boot: int = 0
    top_genes: int = 10
    attribution_cells: int = 300
    attribution_steps: int = 16
    driver_genes: int = 10
    min_detection: float = 0.01
    """Genes detected in fewer than this share of the training cells are never ranked (loadings, attributions,
    drivers); the others are ranked by value × mean count / (1 + mean count)."""
    gene_sets: str | None = None
    """GMT file scored against the loadings of linear models; None = the bundled immune sets."""
    plots: bool = True
    seed: int = 0
    device: str = "cpu"
    n_jobs: int = 1

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> ExplainSettings:
        """Settings from a flat mapping; unknown keys are a user error naming the valid ones."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ScdgmError(f"unknown explain parameter(s) {', '.join(unknown)}; valid: {', '.join(known)}")
        settings = cls(**params)
        settings.check()
        return settings

    def draws_per_cell(self, n_cells: int) -> int:
        """`draws`, or when unset as many as make AUTO_DRAWS_TARGET synthetic cells (between 1 and AUTO_DRAWS_MAX):
        with one draw per cell, sampling noise lets noise genes into the selection on a few thousand cells."""
        if self.draws is not None:
            return self.draws
        return int(np.clip(-(-AUTO_DRAWS_TARGET // max(n_cells, 1)), 1, AUTO_DRAWS_MAX))

    def explained_cells(self, n_cells: int) -> np.ndarray | None:
        """Sorted positions of the cells to explain out of `n_cells` (a seeded random `max_cells`), or None for all."""
        if self.max_cells is None or n_cells <= self.max_cells:
            return None
        return np.sort(np.random.default_rng(self.seed).choice(n_cells, self.max_cells, replace=False))

    def check(self) -> None:
        """Reject values no explanation can use, naming the option."""
        if self.max_cells is not None and self.max_cells < 1:
            raise ScdgmError(f"max_cells must be at least 1 (or null for every cell), got {self.max_cells}")
        if self.n_genes < 1 or (self.draws is not None and self.draws < 1) or self.permutations < 0:
            raise ScdgmError("n_genes and draws must be at least 1 and permutations at least 0")
        if self.prior_cells is not None and self.prior_cells < 0:
            raise ScdgmError(f"prior_cells must be >= 0, got {self.prior_cells}")
        check_abstention(self.abstain_distance, self.abstain_min_cells)
        if self.gene_cut not in GENE_CUTS:
            raise ScdgmError(f"gene_cut must be one of {', '.join(GENE_CUTS)}, got {self.gene_cut!r}")
        if self.alpha is not None and not 0 < self.alpha < 1:
            raise ScdgmError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.attribution_steps < 2 or self.attribution_cells < 1 or self.driver_genes < 1 or self.top_genes < 1:
            raise ScdgmError("attribution_steps must be >= 2; attribution_cells, driver_genes, top_genes >= 1")
        if not 0 <= self.min_detection < 1:
            raise ScdgmError(f"min_detection must be in [0, 1), got {self.min_detection}")


@dataclass
class _Run:
    """What the steps of one explanation share: inputs, synthetic draws, their binary form and the selection."""

    model: GenerativeModel
    adata: ad.AnnData
    settings: ExplainSettings
    counts: sp.csr_matrix
    labels: np.ndarray | None
    posterior: Samples
    discretizer: Discretizer
    x: np.ndarray | sp.csr_matrix
    h: np.ndarray
    selection: SelectionResult
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = dataclasses.field(default_factory=dict)
    figures: dict[str, Callable[[Path], Any]] = dataclasses.field(default_factory=dict)

    @property
    def selected(self) -> list[int]:
        return self.selection.genes

    @property
    def gene_names(self) -> list[str]:
        return [self.model.genes[g] for g in self.selection.genes]


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - started, 3)


def _selection_records(result: SelectionResult, genes: list[str]) -> list[dict[str, Any]]:
    frame = result.to_frame(genes)
    for column in ("pvalue", "pvalue_floor", "null_max_g2", "g2_over_null_max"):  # JSON null, not NaN
        frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    return frame.to_dict(orient="records")


def _fit_discretizer(model: GenerativeModel, x: np.ndarray, z: np.ndarray, settings: ExplainSettings) -> Discretizer:
    """Thresholds from the synthetic cells; 0/1 output of binary models is kept as it is (gene on where > 0)."""
    discretizer = fit_discretizer(x, z, settings.quantile, settings.latent_rule, model.genes, settings.gene_cut)
    if model.output == "binary":
        discretizer = dataclasses.replace(discretizer, gene_thresholds=np.zeros(len(model.genes)))
    return discretizer


def _labels(adata: ad.AnnData, key: str) -> np.ndarray | None:
    if key not in adata.obs:
        return None
    labels = adata.obs[key]
    if labels.isna().any():
        raise InputError(f"obs[{key!r}] has missing labels")
    return labels.astype(str).to_numpy()


def _association_columns(obs: pd.DataFrame) -> list[str]:
    """obs columns worth relating to the latents: numeric, or categorical with 2..50 levels (not the split)."""
    columns = []
    for column in obs.columns:
        values = obs[column]
        if column == "split":
            continue
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        if numeric or 2 <= values.nunique() <= MAX_ASSOCIATION_LEVELS:
            columns.append(str(column))
    return columns


@dataclass
class Explanation:
    """An explanation in memory: the report, the reference that explains new cells, the tables, and the figures
    (drawn when saved)."""

    model: GenerativeModel
    report: dict[str, Any] = dataclasses.field(repr=False)
    """What explanation.json holds: selection, patterns, label transfer, drivers, association, timings."""
    reference: dict[str, Any] = dataclasses.field(repr=False)
    """What reference.json holds (see `interpret.explainer.Explainer`)."""
    tables: dict[str, pd.DataFrame] = dataclasses.field(repr=False)
    """The CSV tables, by file name (selection.csv, patterns.csv, cells.csv, ...)."""
    figures: dict[str, Callable[[Path], Any]] = dataclasses.field(default_factory=dict, repr=False)
    """PNG figures by file name: each draws itself to the path it is given."""

    @property
    def selected_genes(self) -> list[str]:
        """The selected genes, in selection order."""
        return [step["gene"] for step in self.report["selection"]]

    @property
    def p_values(self) -> pd.Series:
        """Permutation p-value of each selection step, by gene (NaN where none was computed)."""
        values = [np.nan if step["pvalue"] is None else step["pvalue"] for step in self.report["selection"]]
        return pd.Series(values, index=self.selected_genes, name="pvalue", dtype=float)

    @property
    def label_key(self) -> str | None:
        """The obs column whose labels the explanation transfers (None when the cells had no labels)."""
        return self.reference["label_key"]

    def transfer(self, adata: ad.AnnData, layer: str | None = None) -> pd.Series:
        """The label each cell of `adata` (counts of .X or `layer`, genes matched by name) gets from the real
        cells that share its pattern over the selected genes, indexed by obs_names."""
        if self.label_key is None:
            raise InputError("the explanation was made on unlabelled cells: there are no labels to transfer")
        reference = LabelReference.from_dict(self.reference["label_transfer"])
        counts = model_counts(counts_view(adata, layer), self.model.genes)
        labels = reference.transfer(reference.pattern_bits(counts))["label"].to_numpy()
        return pd.Series(labels, index=adata.obs_names, name=self.label_key)

    def explainer(self) -> Explainer:
        """The runtime explainer (latents, patterns, labels and driver genes of new cells) of this explanation."""
        return Explainer(self.model, self.reference)

    def summary(self) -> dict[str, Any]:
        """A short JSON-like summary (no None values, so AnnData can write it to .h5ad): genes, p-values, G²."""
        selection = self.report["selection"]
        summary: dict[str, Any] = {
            "model_kind": self.model.kind,
            "n_cells": int(self.report["data"]["n_cells"]),
            "selected_genes": self.selected_genes,
            "latents": [int(step["latent"]) for step in selection],
            "g2": [float(step["g2"]) for step in selection],
            "p_values": self.p_values.astype(float).tolist(),
        }
        transfer = self.report["label_transfer"]
        if self.label_key is not None:
            summary["label_key"] = self.label_key
        if "accuracy" in transfer:
            summary["label_transfer_accuracy"] = float(transfer["accuracy"])  # in sample
        if "heldout" in transfer:
            summary["label_transfer_heldout_accuracy"] = float(transfer["heldout"]["accuracy"])
            summary["label_transfer_heldout_coverage"] = float(transfer["heldout"]["coverage"])
        return summary

    def save(self, directory: str | Path) -> dict[str, Any]:
        """Write the explanation folder (replacing one already there) atomically; returns the written report
        with the folder under 'directory'."""
        timings = dict(self.report["timings_seconds"])
        with atomic_path(directory, directory=True) as out:
            for name, table in self.tables.items():
                table.to_csv(out / name, **CSV_OPTIONS.get(name, {"index": False}))
            if self.figures:
                with _timed(timings, "plots"):
                    for name, draw in self.figures.items():
                        draw(out / name)
            files = sorted(p.name for p in out.iterdir()) + [EXPLANATION_FILE, REFERENCE_FILE]
            report = {**self.report, "timings_seconds": timings, "files": files}
            _write_json(out / REFERENCE_FILE, self.reference)
            _write_json(out / EXPLANATION_FILE, report)
        return {**report, "directory": str(Path(directory))}


def _drivers(run: _Run) -> tuple[dict[str, Any], dict[str, Any]]:
    """(report section, reference section) of what drives the latents: loadings or integrated gradients, genes
    ranked with weights from the training cells (all cells without a split)."""
    model, adata, settings = run.model, run.adata, run.settings
    if not isinstance(model, LinearDecoder):
        try:
            latent_mean_function(model)
        except InputError as exc:
            return {"method": None, "reason": str(exc)}, {"method": None}
    train = split_mask(adata, "train")
    reference_counts = run.counts[train] if train.any() else run.counts
    genes = gene_statistics(reference_counts, model.genes, settings.min_detection)
    run.tables["gene_weights.csv"] = genes
    weights = genes["weight"]
    if isinstance(model, LinearDecoder):
        gene_sets = read_gmt(settings.gene_sets) if settings.gene_sets else immune_gene_sets()
        summary = summarize_loadings(model, adata, gene_sets, settings.top_genes, weights=weights)
        run.tables["loadings.csv"] = summary.loadings
        if summary.gene_sets is not None:
            run.tables["gene_sets.csv"] = summary.gene_sets
        if settings.plots:
            variance = summary.variance.set_index("factor")["variance_explained"]
            run.figures["loadings.png"] = lambda path: loadings_chart(summary.top_genes, path, variance)
        target_sum = float(model.target_sum)
        mean = np.asarray(log_normalized(reference_counts, target_sum).mean(axis=0)).ravel()
        reference = {"method": "loadings", "top_k": settings.driver_genes, "target_sum": target_sum,
                     "expression_mean": mean, "weights": weights.to_numpy()}
        return {"method": "loadings", "ranking": RANKING, **summary.to_dict()}, reference
    profile = typical_profile(reference_counts)
    table = global_attributions(model, adata, profile, settings.attribution_cells, settings.attribution_steps,
                                settings.seed)
    run.tables["attributions.csv"] = table
    top = top_attributed_genes(table, settings.top_genes, weights)
    report = {
        "method": "integrated_gradients", "n_steps": settings.attribution_steps,
        "baseline": "the typical cell: the training cells' pooled composition at the cell's library size",
        "n_cells": min(settings.attribution_cells, adata.n_obs),
        "statistic": "mean |attribution| per gene and latent", "ranking": RANKING,
        "top_genes": {factor: group["gene"].tolist() for factor, group in top.groupby("factor", sort=False)},
    }
    reference = {"method": "integrated_gradients", "top_k": settings.driver_genes,
                 "n_steps": settings.attribution_steps, "profile": profile, "weights": weights.to_numpy()}
    return report, reference


def _prior_report(run: _Run, n_cells: int, reference: LabelReference) -> dict[str, Any]:
    """Prior draws on their own: their own selection (no permutations), pattern frequencies over the posterior
    genes and, with labels, which labels their patterns transfer."""
    settings, model = run.settings, run.model
    prior = model.sample(n=n_cells, source="prior", seed=settings.seed + 1)
    x = run.discretizer.genes_binary(prior.x)
    h = run.discretizer.latents_binary(prior.z)
    own = stepwise_select(x, h, settings.n_genes, settings.selection_model, settings.empty_cell,
                          device=settings.device)
    patterns = summarize_patterns(x, h, run.selected, n_top=settings.n_patterns).to_frame()
    report: dict[str, Any] = {
        "n_cells": n_cells,
        "selection": _selection_records(own, model.genes),
        "shared_genes": sorted(model.genes[g] for g in set(own.genes) & set(run.selected)),
        "patterns": patterns[["pattern", "count"]].to_dict(orient="records"),
    }
    if run.labels is not None:
        transferred = reference.transfer(_dense(x[:, run.selected]))["label"]
        report["label_composition"] = transferred.value_counts(normalize=True).sort_index().to_dict()
    return report


def _sample_and_select(model: GenerativeModel, adata: ad.AnnData, settings: ExplainSettings) -> _Run:
    """Posterior draws, their discretisation and the step-wise selection (with p-values when asked)."""
    counts = model_counts(adata, model.genes)
    labels = _labels(adata, settings.label_key)
    timings: dict[str, float] = {}
    with _timed(timings, "sampling"):
        posterior = model.sample(adata, source="posterior", draws=settings.draws_per_cell(adata.n_obs),
                                 seed=settings.seed)
        discretizer = _fit_discretizer(model, posterior.x, posterior.z, settings)
        x = discretizer.genes_binary(posterior.x)
        h = discretizer.latents_binary(posterior.z)
    with _timed(timings, "selection"):
        selection = stepwise_select(
            x, h, settings.n_genes, settings.selection_model, settings.empty_cell, settings.permutations,
            settings.alpha, settings.seed, settings.device, settings.n_jobs,
        )
    if not selection.genes:
        raise ScdgmError(f"no gene passed alpha={settings.alpha} (first p-value {selection.stop_pvalue:.3g})")
    return _Run(model, adata, settings, counts, labels, posterior, discretizer, x, h, selection, timings)


def _dense(bits: np.ndarray | sp.csr_matrix) -> np.ndarray:
    return bits.toarray() if sp.issparse(bits) else np.asarray(bits)


def _transfer(run: _Run, reference: LabelReference) -> dict[str, Any]:
    """Label transfer to the posterior draws (scored against their source cell's label), the real cells'
    patterns and labels (cells.csv) and the confusion matrix; returns the report section."""
    transferred = reference.transfer(_dense(run.x[:, run.selected]))
    real = reference.transfer(reference.pattern_bits(run.counts))
    cells = real[["pattern", "matched_pattern", "frequency"]].copy()
    if run.labels is not None:
        cells.insert(0, "label", real["label"])
    cells.index = run.adata.obs_names
    run.tables["cells.csv"] = cells
    section: dict[str, Any] = {"scope": IN_SAMPLE_SCOPE,
                               "unseen_pattern_fraction": float((transferred["distance"] > 0).mean())}
    if run.labels is None:
        return section
    truth = run.labels[run.posterior.cell_index]
    accuracy = transfer_accuracy(transferred["label"], truth)
    run.tables["confusion.csv"] = accuracy.confusion
    sizes = pd.Series(run.labels).value_counts()
    section.update(
        accuracy=accuracy.overall,
        per_class=accuracy.per_class.to_dict(),
        class_sizes=sizes.sort_index().to_dict(),
        majority_baseline=float(sizes.iloc[0] / sizes.sum()),
    )
    if run.settings.plots:
        xy, _ = project_2d(run.posterior.z)
        predicted = transferred["label"]
        run.figures["transfer.png"] = lambda path: transfer_map(xy, truth, predicted, path)
    return section


def _stability(run: _Run) -> list[dict[str, Any]]:
    """Bootstrap selection frequencies of the genes (stability.csv); the report keeps the genes ever chosen."""
    settings = run.settings
    fractions = selection_stability(run.x, run.h, settings.n_genes, settings.stability_boot, settings.seed,
                                    settings.selection_model, settings.empty_cell, settings.device)
    table = pd.DataFrame({"gene": run.model.genes, "selected_fraction": fractions})
    table = table.sort_values("selected_fraction", ascending=False, kind="stable")
    run.tables["stability.csv"] = table
    return table[table["selected_fraction"] > 0].head(3 * settings.n_genes).to_dict(orient="records")


def _association(run: _Run, mean: np.ndarray) -> dict[str, Any]:
    """MI and ANOVA F of the latent means with obs columns; per label the latent that carries it."""
    table = latent_association(mean, run.adata.obs, _association_columns(run.adata.obs), seed=run.settings.seed)
    run.tables["association.csv"] = table
    section: dict[str, Any] = {"association": table.to_dict(orient="records")}
    if run.labels is not None:
        carriers = label_latents(mean, run.labels)
        run.tables["label_latents.csv"] = carriers
        section["label_latents"] = carriers.to_dict(orient="records")
    return section


def _pattern_plots(run: _Run, patterns: PatternSummary, reference: LabelReference, mean: np.ndarray) -> None:
    """Latent means by label with density contours, the selection path, the pattern MDS map and the cell × gene
    heat map of the real cells' patterns, grouped by their transferred labels."""
    colour = run.labels if run.labels is not None else np.full(run.adata.n_obs, "cells")
    title = f"{run.model.kind} latent means"
    genes, g2, pvalues = run.gene_names, run.selection.g2, run.selection.pvalues
    bits = np.array([[int(c) for c in pattern] for pattern in patterns.patterns], dtype=np.uint8)
    pattern_labels = reference.transfer(bits)["label"] if run.labels is not None else None
    run.figures["latent.png"] = lambda path: latent_scatter(mean, colour, path, title=title)
    run.figures["selection.png"] = lambda path: selection_path(genes, g2, pvalues, path)
    run.figures["patterns.png"] = lambda path: pattern_map(
        patterns.coordinates, patterns.counts, patterns.patterns, path, pattern_labels
    )
    real = reference.pattern_bits(run.counts)
    cell_labels = reference.transfer(real)["label"] if run.labels is not None else np.full(len(real), "cells")
    run.figures["pattern_cells.png"] = lambda path: pattern_heatmap(real, genes, cell_labels, path, run.settings.seed)


def _reference_document(run: _Run, reference: LabelReference, mean: np.ndarray,
                        drivers: dict[str, Any]) -> dict[str, Any]:
    """reference.json: everything `Explainer` needs to explain new cells the way this run did."""
    document = {
        "format": REFERENCE_FORMAT,
        "version": REFERENCE_VERSION,
        "model_kind": run.model.kind,
        "n_model_genes": len(run.model.genes),
        "genes": run.gene_names,
        "gene_indices": [int(g) for g in run.selected],
        "discretizer": _selected_discretizer(run.discretizer, run.selected).to_dict(),
        "label_key": run.settings.label_key if run.labels is not None else None,
        "label_transfer": reference.to_dict(),
        "latents": {"rule": run.discretizer.latent_rule, "thresholds": run.discretizer.latent_thresholds,
                    "center": mean.mean(axis=0), "scale": mean.std(axis=0)},
        "drivers": drivers,
    }
    if isinstance(run.model, LinearDecoder):
        document["loadings"] = _selected_loadings(
            run.model.loadings(), run.model.genes, run.selected, run.settings.top_genes
        )
    return _plain(document)


def compute_explanation(
    model: GenerativeModel, adata: ad.AnnData, settings: ExplainSettings | None = None, **overrides: Any
) -> Explanation:
    """Explain `model` on the cells of `adata` (counts in .X, genes aligned by name), in memory.

    Options come from `settings` with `overrides` applied (e.g. n_genes=8, draws=1, permutations=1000).
    """
    settings = dataclasses.replace(settings or ExplainSettings(), **overrides)
    settings.check()
    if not model.genes:
        raise InputError(f"{model.kind}: the model has not been fitted")
    if settings.n_genes > len(model.genes):
        raise InputError(f"n_genes ({settings.n_genes}) exceeds the model's {len(model.genes)} genes")
    n_cells_in = adata.n_obs
    chosen = settings.explained_cells(adata.n_obs)
    if chosen is not None:
        adata = adata[chosen].copy()
    run = _sample_and_select(model, adata, settings)
    labels = run.labels if run.labels is not None else np.full(adata.n_obs, UNLABELLED)
    reference = build_reference(run.counts, labels, run.discretizer, run.selected, settings.abstain_distance,
                                settings.abstain_min_cells)
    patterns = summarize_patterns(run.x, run.h, run.selected, n_top=settings.n_patterns)
    mean = model.embed(adata, key_added=None).mean.astype(np.float64)

    report: dict[str, Any] = {
        "format": EXPLANATION_FORMAT,
        "version": 1,
        "model": {"kind": model.kind, "n_latent": model.n_latent, "n_genes": len(model.genes),
                  "output": model.output},
        "data": {"n_cells": adata.n_obs, "n_cells_in": n_cells_in, "n_draws": int(run.posterior.x.shape[0]),
                 "label_key": settings.label_key if run.labels is not None else None},
        "settings": dataclasses.asdict(settings),
        "selection": _selection_records(run.selection, model.genes),
        "stopped_early": run.selection.stopped_early,
        "stop_pvalue": run.selection.stop_pvalue,
        "patterns": patterns.to_frame().to_dict(orient="records"),
    }
    run.tables["selection.csv"] = run.selection.to_frame(model.genes)
    run.tables["patterns.csv"] = patterns.to_frame()
    with _timed(run.timings, "label_transfer"):
        report["label_transfer"] = _transfer(run, reference)
    train, test = split_mask(adata, "train"), split_mask(adata, "test")
    if run.labels is not None and "split" in adata.obs and train.any() and test.any():
        with _timed(run.timings, "heldout_transfer"):
            report["label_transfer"]["heldout"] = heldout_label_transfer(
                model, adata[train], adata[test], settings, permutations=0, alpha=None, n_genes=len(run.selected),
                plots=False)
    if settings.stability_boot > 0:
        with _timed(run.timings, "stability"):
            report["stability"] = _stability(run)
    prior_cells = adata.n_obs if settings.prior_cells is None else settings.prior_cells
    if prior_cells > 0:
        with _timed(run.timings, "prior"):
            report["prior"] = _prior_report(run, prior_cells, reference)
    with _timed(run.timings, "drivers"):
        report["drivers"], drivers = _drivers(run)
    with _timed(run.timings, "association"):
        report.update(_association(run, mean))
    if settings.plots:
        _pattern_plots(run, patterns, reference, mean)
    report["timings_seconds"] = run.timings
    return Explanation(model, report, _reference_document(run, reference, mean, drivers), run.tables, run.figures)


HELDOUT_SCOPE = ("held out: genes and the pattern table from the training-split cells, scored on posterior draws "
                 "of the test-split cells")
IN_SAMPLE_SCOPE = "in sample: draws of the same cells the pattern table was built from"
HELDOUT_FIGURES = ("accuracy", "coverage", "covered_accuracy", "majority_baseline")
"""The numbers of `heldout_label_transfer` that evaluation and the sweep's comparison report."""


def heldout_label_transfer(
    model: GenerativeModel, train: ad.AnnData, test: ad.AnnData, settings: ExplainSettings | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Label transfer as a held-out figure of merit: genes selected on posterior draws of the `train` cells and
    the pattern table built from their real counts, then scored on posterior draws of the `test` cells against
    their own labels (`settings.label_key`). Returns `accuracy` (every draw labelled) and its per-class values,
    `coverage` (share of test draws the abstention rule labels: settings.abstain_distance / abstain_min_cells),
    `covered_accuracy`, both per class, and `majority_baseline` (the training cells' most frequent label, scored
    on the test cells)."""
    settings = dataclasses.replace(settings or ExplainSettings(), **overrides)
    settings.check()
    train_labels, test_labels = _labels(train, settings.label_key), _labels(test, settings.label_key)
    if train_labels is None or test_labels is None:
        raise InputError(f"held-out label transfer needs labels in obs[{settings.label_key!r}] of both cell sets")
    if settings.n_genes > len(model.genes):
        raise InputError(f"n_genes ({settings.n_genes}) exceeds the model's {len(model.genes)} genes")
    run = _sample_and_select(model, train, settings)
    reference = build_reference(run.counts, train_labels, run.discretizer, run.selected, settings.abstain_distance,
                                settings.abstain_min_cells)
    draws = model.sample(test, source="posterior", draws=settings.draws_per_cell(train.n_obs), seed=settings.seed + 1)
    transferred = reference.transfer(reference.pattern_bits(draws.x))
    truth = test_labels[draws.cell_index]
    seen = transferred["assigned"].to_numpy()
    majority = pd.Series(train_labels).value_counts().index[0]
    every = transfer_accuracy(transferred["label"], truth)
    covered = transfer_accuracy(transferred["label"][seen], truth[seen]) if seen.any() else None
    return {
        "scope": HELDOUT_SCOPE,
        "n_train_cells": int(train.n_obs),
        "n_test_cells": int(test.n_obs),
        "n_test_draws": int(len(truth)),
        "genes": [model.genes[g] for g in run.selected],
        "accuracy": every.overall,
        "per_class_accuracy": every.per_class.to_dict(),
        "coverage": float(seen.mean()),
        "per_class_coverage": pd.Series(seen).groupby(truth).mean().to_dict(),
        "covered_accuracy": covered.overall if covered is not None else float("nan"),
        "per_class_covered_accuracy": covered.per_class.to_dict() if covered is not None else {},
        "majority_baseline": float((test_labels == majority).mean()),
        "abstains_on": reference.abstains_on,
    }


def explain(
    model: GenerativeModel,
    adata: ad.AnnData,
    settings: ExplainSettings | None = None,
    *,
    layer: str | None = None,
    **overrides: Any,
) -> Explanation:
    """Explain `model` on the cells of `adata` (counts of .X, or `adata.layers[layer]`) and return the
    `Explanation`; its summary also goes to `adata.uns['scdgm_explanation']` (nothing else in `adata` changes).

    Options come from `settings` (default `ExplainSettings()`) with `overrides` applied, e.g. n_genes=8.
    """
    explanation = compute_explanation(model, counts_view(adata, layer), settings, **overrides)
    adata.uns[UNS_KEY] = explanation.summary()
    return explanation


def run_explanation(
    model: GenerativeModel,
    adata: ad.AnnData,
    out_dir: str | Path,
    settings: ExplainSettings | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Explain `model` on the cells of `adata` and write the explanation folder `out_dir` (what `scdgm explain`
    does); returns the report written as explanation.json, with the folder under 'directory'."""
    return compute_explanation(model, adata, settings, **overrides).save(out_dir)


def _selected_discretizer(discretizer: Discretizer, selected: list[int]) -> Discretizer:
    """The rule restricted to the selected genes (what serving needs), in selection order."""
    names = None if discretizer.genes is None else [discretizer.genes[g] for g in selected]
    return dataclasses.replace(discretizer, gene_thresholds=discretizer.gene_thresholds[selected], genes=names)


def _selected_loadings(
    loadings: pd.DataFrame, genes: list[str], selected: list[int], n_top: int
) -> dict[str, list[float]]:
    """Loadings of the selected genes and of each factor's top genes (by |loading|), by gene name."""
    names = [genes[g] for g in selected] + gene_importance(loadings).nlargest(n_top).index.tolist()
    return {name: loadings.loc[name].astype(float).tolist() for name in dict.fromkeys(names)}


def _write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(_plain(document), indent=2, allow_nan=False))


def _plain(value: Any) -> Any:
    """Plain JSON values: numpy scalars and arrays unpacked, NaN and infinities as null, keys as strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
