"""The runtime explainer behind serving and the MLflow pyfunc: load a model and its explanation once, then
explain cells fast (everything that does not depend on the cell is prepared at load).

For each cell: latent mean and variance; its 0/1 pattern over the explanation genes (real counts cut by the
thresholds fitted on synthetic cells); the nearest reference pattern (Hamming), how many real cells had it, and
the label transferred from them with its support; the latent that moves most from the average cell (in
standard deviations); and the genes that drive the cell: those it expresses above a typical cell that move it
furthest from the average cell, along its own direction in standardised latent space (the dominant latent alone
is often a minor factor for cells of the commonest type, which sit near the average on the major ones). A gene's
contribution is, for linear models, its term loading × (log expression − the training cells' mean) projected on
that direction (for PCA the gene's share of the cell's score), for the others its integrated gradient of the
projected latent mean from the typical cell at the cell's depth (`attributions.typical_profile`); only genes above
the typical cell count, and each contribution is times the gene weight (`loadings.gene_statistics`: genes seen
in a handful of cells, whose single counts move a cell a lot, are scaled down or left out). Drivers are the
top-k genes by that score, largest first.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from scdgm.errors import InputError, ScdgmError
from scdgm.formats import EXPLANATION_DIR, REFERENCE_FILE
from scdgm.interpret.attributions import integrated_gradients, latent_mean_function, typical_baselines
from scdgm.interpret.label_transfer import UNASSIGNED, LabelReference
from scdgm.models.base import GenerativeModel, LinearDecoder
from scdgm.models.data import CountBatches

REFERENCE_FORMAT = "scdgm-explanation-reference"
REFERENCE_VERSION = 2
"""2: drivers along the cell's direction from the typical cell, gene weights (1: dominant latent, raw)."""


def log_normalized(counts: sp.csr_matrix, target_sum: float) -> sp.csr_matrix:
    """log1p(counts / library size × target_sum) per cell, kept sparse (what linear models' loadings read)."""
    library = np.maximum(np.asarray(counts.sum(axis=1)).ravel(), 1.0)
    expression = sp.csr_matrix(counts.multiply((target_sum / library)[:, None]), dtype=np.float64)
    expression.data = np.log1p(expression.data)
    return expression


@dataclass
class CellExplanations:
    """Columnar explanations of n cells (numpy arrays and lists; `records()` gives one plain dict per cell)."""

    mean: np.ndarray
    var: np.ndarray
    genes: list[str]
    """The explanation genes, in selection order: position k of a pattern is gene k."""
    patterns: list[str]
    matched_patterns: list[str]
    distance: np.ndarray
    """Hamming distance from the cell's pattern to the matched reference pattern (0 when seen)."""
    frequency: np.ndarray
    """Real cells with the matched pattern when the explanation was made."""
    labels: list[str] | None
    support: np.ndarray | None
    """Share of the matched pattern's real cells that carry the transferred label."""
    assigned: np.ndarray
    """Whether the reference's abstention rule labels the cell (pattern close enough, matched pattern seen often
    enough); the others are "unassigned"."""
    dominant_latent: np.ndarray
    driver_method: str | None
    """How driver scores were computed: 'loadings', 'integrated_gradients' or None (no drivers)."""
    driver_genes: list[list[str]]
    driver_scores: np.ndarray

    def __len__(self) -> int:
        return len(self.patterns)

    def records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per cell."""
        return [
            {
                "latent_mean": self.mean[i].tolist(),
                "latent_var": self.var[i].tolist(),
                "pattern": self.patterns[i],
                "matched_pattern": self.matched_patterns[i],
                "pattern_distance": int(self.distance[i]),
                "pattern_frequency": int(self.frequency[i]),
                "label": None if self.labels is None else self.labels[i],
                "label_support": None if self.support is None else float(self.support[i]),
                "label_assigned": None if self.labels is None else bool(self.assigned[i]),
                "assigned_label": None if self.labels is None
                else self.labels[i] if self.assigned[i] else UNASSIGNED,
                "dominant_latent": int(self.dominant_latent[i]),
                "drivers": [
                    {"gene": gene, "score": float(score)}
                    for gene, score in zip(self.driver_genes[i], self.driver_scores[i], strict=True)
                ],
            }
            for i in range(len(self))
        ]


class Explainer:
    """A fitted model plus its explanation reference; `explain` maps counts (model gene order) to explanations."""

    def __init__(self, model: GenerativeModel, reference: dict[str, Any]) -> None:
        if reference.get("format") != REFERENCE_FORMAT or reference.get("version") != REFERENCE_VERSION:
            raise ScdgmError(f"not a {REFERENCE_FORMAT} v{REFERENCE_VERSION} document; run `scdgm explain` again")
        self.model = model
        self.reference = reference
        self.genes: list[str] = list(model.genes)
        self.patterns = LabelReference.from_dict(reference["label_transfer"])
        names = [self.genes[i] for i in self.patterns.genes]
        if names != reference["genes"]:
            raise ScdgmError("the explanation was made for another model: its genes do not match the model's")
        self.label_key: str | None = reference.get("label_key")
        latents = reference["latents"]
        self.latent_center = np.asarray(latents["center"], dtype=np.float64)
        self.latent_scale = np.maximum(np.asarray(latents["scale"], dtype=np.float64), 1e-12)
        self.drivers = dict(reference["drivers"])
        self.top_k = int(self.drivers.get("top_k", 10))
        self._prepare_drivers()

    @classmethod
    def load(cls, model_dir: str | Path) -> Explainer:
        """Read the model directory and its explanation/reference.json (written by `scdgm explain`)."""
        model_dir = Path(model_dir)
        path = model_dir / EXPLANATION_DIR / REFERENCE_FILE
        if not path.is_file():
            raise ScdgmError(f"{model_dir}: the model has no explanation (no {path}); run `scdgm explain` first")
        try:
            reference = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ScdgmError(f"{path}: unreadable explanation reference ({exc})") from None
        return cls(GenerativeModel.load(model_dir), reference)

    def _prepare_drivers(self) -> None:
        """Everything per-model the drivers need: gene weights and the attributed encoder function with the
        typical-cell profile, or loadings and the training cells' mean log expression."""
        self._attributed = None
        method = self.drivers.get("method")
        if method is None:
            return
        self._weights = self._gene_vector("weights")
        if method == "loadings":
            if not isinstance(self.model, LinearDecoder):
                raise ScdgmError(f"the explanation has loadings, but a {self.model.kind} model has none")
            self._loadings = self.model.loadings().to_numpy(dtype=np.float64)
            self._expression_mean = self._gene_vector("expression_mean")
        elif method == "integrated_gradients":
            self._attributed = latent_mean_function(self.model)
            self._profile = torch.as_tensor(self._gene_vector("profile"), dtype=torch.float32,
                                            device=self._attributed.device)
        else:
            raise ScdgmError(f"unknown driver method {method!r} in the explanation")

    def _gene_vector(self, key: str) -> np.ndarray:
        """reference drivers[key], one number per model gene."""
        values = np.asarray(self.drivers[key], dtype=np.float64)
        if values.shape != (len(self.genes),):
            raise ScdgmError(f"the explanation's drivers.{key} has {values.size} values for {len(self.genes)} genes")
        return values

    def _check(self, counts: Any) -> sp.csr_matrix:
        """The counts as float32 CSR, with one line naming what is wrong when they cannot be explained."""
        counts = sp.csr_matrix(counts, dtype=np.float32)
        if counts.ndim != 2 or counts.shape[1] != len(self.genes):
            raise InputError(f"expected cells × {len(self.genes)} counts in the model's gene order, got {counts.shape}")
        if counts.shape[0] == 0:
            raise InputError("no cells to explain")
        if counts.nnz and (not np.isfinite(counts.data).all() or (counts.data < 0).any()):
            raise InputError("counts must be finite and non-negative")
        return counts

    def explain(self, counts: Any, batch: Sequence[str] | None = None) -> CellExplanations:
        """Explain cells given as counts (cells × model genes, in `self.genes` order; sparse or dense)."""
        counts = self._check(counts)
        codes = self.model.batch_codes(batch, counts.shape[0])
        embedding = self.model.embed_counts(counts, batch)
        mean, var = embedding.mean, embedding.var
        dominant = self.dominant_latent(mean)
        if self._attributed is not None:
            scores = self._attributions(counts, codes, self.directions(mean))
        elif self.drivers.get("method") == "loadings":
            scores = self._loading_scores(counts, self.directions(mean))
        else:
            scores = None
        transfer = self.patterns.transfer(self.patterns.pattern_bits(counts))
        driver_genes, driver_scores = self._top_drivers(scores, counts.shape[0])
        return CellExplanations(
            mean=mean, var=var, genes=list(self.reference["genes"]),
            patterns=transfer["pattern"].tolist(), matched_patterns=transfer["matched_pattern"].tolist(),
            distance=transfer["distance"].to_numpy(), frequency=transfer["frequency"].to_numpy(),
            labels=transfer["label"].tolist() if self.label_key else None,
            support=transfer["support"].to_numpy() if self.label_key else None,
            assigned=transfer["assigned"].to_numpy(),
            dominant_latent=dominant, driver_method=self.drivers.get("method"),
            driver_genes=driver_genes, driver_scores=driver_scores,
        )

    def dominant_latent(self, mean: np.ndarray) -> np.ndarray:
        """Per cell, the latent farthest from the average cell, in standard deviations of the explained cells."""
        return np.abs((mean - self.latent_center) / self.latent_scale).argmax(axis=1)

    def directions(self, mean: np.ndarray) -> np.ndarray:
        """Per cell, the latent-space vector d with d · Δz = how far a latent change Δz moves the cell away from
        the average cell along its own direction, in standard deviations of the explained cells."""
        standard = (mean - self.latent_center) / self.latent_scale
        norm = np.maximum(np.linalg.norm(standard, axis=1, keepdims=True), 1e-12)
        return standard / norm / self.latent_scale

    def _attributions(self, counts: sp.csr_matrix, codes: np.ndarray | None, directions: np.ndarray) -> np.ndarray:
        """Integrated gradients of each cell's projected latent mean from the typical cell at its depth, for the
        genes above that typical cell, times the gene weights (cells x genes)."""
        device = self._attributed.device
        steps = int(self.drivers["n_steps"])
        parts = []
        for batch in CountBatches(counts, batch_codes=codes, batch_size=1024, device=device):
            toward = torch.as_tensor(directions[batch.index.numpy()], dtype=torch.float32, device=device)
            baselines = typical_baselines(batch.x, self._profile)
            values = integrated_gradients(self._attributed, batch.x, baselines, None, batch.batch_index, steps,
                                          directions=toward)
            parts.append((values * (batch.x > baselines)).cpu().numpy())
        return np.concatenate(parts) * self._weights

    def _loading_scores(self, counts: sp.csr_matrix, directions: np.ndarray) -> np.ndarray:
        """(log expression above the training mean) × (loadings projected on the cell's direction) × gene weight,
        per cell and gene."""
        expression = log_normalized(counts, float(self.drivers["target_sum"])).toarray()
        above = np.maximum(expression - self._expression_mean, 0.0)
        return above * (directions @ self._loadings.T) * self._weights

    def _top_drivers(self, scores: np.ndarray | None, n: int) -> tuple[list[list[str]], np.ndarray]:
        """The top-k genes by score per cell, largest first, and their scores (empty without a driver method)."""
        if scores is None:
            return [[] for _ in range(n)], np.zeros((n, 0))
        k = min(self.top_k, scores.shape[1])
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(-scores, top, axis=1).argsort(axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        genes = np.asarray(self.genes, dtype=object)[top]
        return [list(row) for row in genes], np.take_along_axis(scores, top, axis=1)
