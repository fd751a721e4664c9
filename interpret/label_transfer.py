"""Label transfer by patterns (review Fig. 8): a synthetic cell takes the majority label of the real cells that
share its pattern over the selected genes; an unseen pattern goes to the nearest seen one by Hamming distance,
ties to the more frequent pattern. Real cells are cut with the synthetic cells' thresholds. A transfer may
abstain: a cell whose pattern lies further than `max_distance` from every seen pattern, or whose matched pattern
was seen in fewer than `min_cells` real cells, is "unassigned" (it still gets the nearest pattern's label, so the
figure with every cell labelled can be reported next to the one that abstains).

The reference (pattern → label counts, with the genes and thresholds that make a pattern) is a JSON-friendly
dict for serving, and classifies one cell with a dict lookup.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scdgm.errors import InputError, ScdgmError
from scdgm.interpret.discretize import Discretizer

FORMAT = "scdgm-label-reference"
FORMAT_VERSION = 2
"""Version 2 added the abstention rule (max_distance, min_cells); version 1 references abstain on unseen patterns."""
UNASSIGNED = "unassigned"
"""The label of a cell the transfer abstains on."""


@dataclass
class LabelReference:
    """Counts of labels among real cells per pattern; patterns are most frequent first."""

    genes: list[int]
    thresholds: np.ndarray
    """Bit k of a cell's pattern is x[:, genes[k]] > thresholds[k]."""
    patterns: list[str]
    label_names: list[str]
    counts: np.ndarray
    """(patterns × labels) numbers of real cells."""
    gene_names: list[str] | None = None
    max_distance: int | None = 0
    """Abstain on cells whose pattern is further (Hamming) from every seen pattern; None = never on distance."""
    min_cells: int = 1
    """Abstain on cells whose matched pattern was seen in fewer real cells."""
    _index: dict[int, int] = field(init=False, repr=False)
    _bits: np.ndarray = field(init=False, repr=False)
    _majority: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.counts = np.asarray(self.counts, dtype=np.int64)
        self.thresholds = np.asarray(self.thresholds, dtype=np.float64)
        if self.counts.shape != (len(self.patterns), len(self.label_names)) or not self.patterns:
            raise ScdgmError("a label reference needs one row of label counts per seen pattern")
        check_abstention(self.max_distance, self.min_cells)
        self._bits = np.array([[int(c) for c in pattern] for pattern in self.patterns], dtype=np.int64)
        self._index = {int(code): k for k, code in enumerate(_codes(self._bits))}
        overall = self.counts.sum(axis=0)
        # majority label per pattern; ties go to the label that is more frequent overall, then to the first name
        self._majority = np.array([
            max(range(len(self.label_names)), key=lambda label: (row[label], overall[label], -label))
            for row in self.counts])

    @property
    def abstains_on(self) -> str:
        """The abstention rule in words (reports and the CLI quote it)."""
        rules = [] if self.max_distance is None else [
            "patterns not seen" if self.max_distance == 0
            else f"patterns further than Hamming distance {self.max_distance} from every seen one"]
        if self.min_cells > 1:
            rules.append(f"patterns seen in fewer than {self.min_cells} reference cells")
        return " or ".join(rules) or "nothing (every cell is labelled)"

    @property
    def frequencies(self) -> np.ndarray:
        """Number of real cells with each seen pattern."""
        return self.counts.sum(axis=1)

    def pattern_bits(self, x: Any) -> np.ndarray:
        """Binary patterns (cells × selected genes) of cells given as counts over all genes."""
        if x.ndim != 2 or x.shape[1] <= max(self.genes):
            raise InputError(f"expected cells × genes counts with at least {max(self.genes) + 1} genes, "
                             f"got shape {x.shape}")
        columns = x[:, self.genes]
        columns = columns.toarray() if sp.issparse(columns) else np.asarray(columns)
        return (columns > self.thresholds).astype(np.uint8)

    def transfer(self, bits: Any) -> pd.DataFrame:
        """Label synthetic cells from their binary patterns (cells × selected genes, in selection order).

        Columns: label, pattern, matched_pattern, distance (Hamming, 0 when seen), frequency (real cells with the
        matched pattern), support (share of those cells that carry the label), assigned (the abstention rule
        passes) and assigned_label (label, or "unassigned").
        """
        bits = bits.toarray() if sp.issparse(bits) else np.asarray(bits)
        return pd.DataFrame(self._transfer_columns(bits))

    def transfer_one(self, bits: Sequence[int]) -> dict[str, Any]:
        """Label one cell from its binary pattern: the fields of one row of `transfer`, as plain Python values."""
        columns = self._transfer_columns(np.asarray(bits)[None, :])
        return {key: value[0].item() if isinstance(value[0], np.generic) else value[0]
                for key, value in columns.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "genes": [int(g) for g in self.genes],
            "gene_names": self.gene_names,
            "thresholds": [float(t) for t in self.thresholds],
            "patterns": list(self.patterns),
            "label_names": list(self.label_names),
            "counts": self.counts.tolist(),
            "max_distance": self.max_distance,
            "min_cells": self.min_cells,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LabelReference:
        """Inverse of `to_dict`; a dict of another format or version is a user error."""
        if data.get("format") != FORMAT or data.get("version") not in (1, FORMAT_VERSION):
            raise ScdgmError(f"not a {FORMAT} v{FORMAT_VERSION} dict (format={data.get('format')!r})")
        return cls(data["genes"], np.asarray(data["thresholds"]), data["patterns"], data["label_names"],
                   np.asarray(data["counts"]), data["gene_names"],
                   data.get("max_distance", 0), data.get("min_cells", 1))  # version 1: abstain on unseen patterns

    def _transfer_columns(self, bits: np.ndarray) -> dict[str, np.ndarray]:
        """Per-cell arrays behind `transfer`: each distinct pattern is matched once."""
        if bits.ndim != 2 or bits.shape[1] != len(self.genes) or not ((bits == 0) | (bits == 1)).all():
            raise InputError(f"expected cells × {len(self.genes)} binary (0/1) patterns, got shape {bits.shape}")
        codes = _codes(bits.astype(np.int64))
        unique, inverse = np.unique(codes, return_inverse=True)
        matched, distance = (values[inverse.ravel()] for values in self._match(unique))
        labels = self._majority[matched]
        frequency = self.frequencies[matched]
        names = np.asarray(self.label_names, dtype=object)[labels]
        assigned = frequency >= self.min_cells
        if self.max_distance is not None:
            assigned &= distance <= self.max_distance
        return {
            "label": names,
            "pattern": np.asarray([format(int(code), f"0{len(self.genes)}b") for code in codes], dtype=object),
            "matched_pattern": np.asarray(self.patterns, dtype=object)[matched],
            "distance": distance,
            "frequency": frequency,
            "support": self.counts[matched, labels] / frequency,
            "assigned": assigned,
            "assigned_label": np.where(assigned, names, UNASSIGNED).astype(object),
        }

    def _match(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Seen pattern index and Hamming distance for each pattern code (nearest, then most frequent, then first)."""
        matched = np.array([self._index.get(int(code), -1) for code in codes], dtype=np.int64)
        distance = np.zeros(codes.size, dtype=np.int64)
        unseen = matched < 0
        if unseen.any():
            bits = _bits_of(codes[unseen], len(self.genes))
            hamming = bits @ (1 - self._bits).T + (1 - bits) @ self._bits.T
            # lexicographic choice: smallest distance, then largest frequency, then earliest pattern
            key = hamming * (self.frequencies.max() + 1) - self.frequencies
            matched[unseen] = key.argmin(axis=1)
            distance[unseen] = hamming[np.arange(hamming.shape[0]), matched[unseen]]
        return matched, distance


@dataclass
class TransferAccuracy:
    """Agreement of transferred labels with the true ones: overall, per true class, and the confusion matrix."""

    overall: float
    per_class: pd.Series
    confusion: pd.DataFrame


def check_abstention(max_distance: int | None, min_cells: int) -> None:
    """Reject abstention settings no transfer can use, naming the option."""
    if max_distance is not None and max_distance < 0:
        raise ScdgmError(f"abstain_distance must be >= 0 or null, got {max_distance}")
    if min_cells < 1:
        raise ScdgmError(f"abstain_min_cells must be >= 1, got {min_cells}")


def build_reference(
    x_real: Any,
    labels: Sequence[Any],
    discretizer: Discretizer,
    genes: Sequence[int],
    max_distance: int | None = 0,
    min_cells: int = 1,
) -> LabelReference:
    """Count labels per pattern among real cells, cut by the discretizer's thresholds for the selected genes;
    the reference abstains as `max_distance` and `min_cells` say (see `LabelReference`)."""
    labels = np.asarray(labels).astype(str)
    if labels.shape[0] != x_real.shape[0]:
        raise InputError(f"{labels.shape[0]} labels for {x_real.shape[0]} real cells")
    if not genes:
        raise ScdgmError("label transfer needs at least one selected gene")
    genes = [int(g) for g in genes]
    bits = discretizer.genes_binary(x_real, columns=genes)
    bits = bits.toarray() if sp.issparse(bits) else bits
    table = pd.crosstab(pd.Series(_codes(bits.astype(np.int64)), name="code"), pd.Series(labels, name="label"))
    order = table.sum(axis=1).sort_values(ascending=False, kind="stable").index
    table = table.loc[order]
    width = len(genes)
    names = None if discretizer.genes is None else [discretizer.genes[g] for g in genes]
    return LabelReference(genes, discretizer.gene_thresholds[genes],
                          [format(int(code), f"0{width}b") for code in table.index],
                          [str(c) for c in table.columns], table.to_numpy(), names, max_distance, min_cells)


def transfer_accuracy(predicted: Sequence[Any], truth: Sequence[Any]) -> TransferAccuracy:
    """Share of cells whose transferred label equals the true one (for posterior draws: their source cell's)."""
    predicted = pd.Series(np.asarray(predicted).astype(str), name="predicted")
    truth = pd.Series(np.asarray(truth).astype(str), name="true")
    if predicted.size != truth.size or predicted.size == 0:
        raise InputError(f"{predicted.size} predicted and {truth.size} true labels: need the same, non-zero number")
    correct = predicted.to_numpy() == truth.to_numpy()
    per_class = pd.Series(correct).groupby(truth.to_numpy()).mean().rename("accuracy")
    return TransferAccuracy(float(correct.mean()), per_class, pd.crosstab(truth, predicted))


def _codes(bits: np.ndarray) -> np.ndarray:
    """Integer code of each binary row, first column as the highest bit (so codes sort like the 0/1 strings)."""
    width = bits.shape[1]
    if width > 62:
        raise ScdgmError("patterns over more than 62 genes are not supported")
    return bits @ (np.int64(1) << np.arange(width - 1, -1, -1, dtype=np.int64))


def _bits_of(codes: np.ndarray, width: int) -> np.ndarray:
    """Inverse of `_codes`."""
    return (codes[:, None] >> np.arange(width - 1, -1, -1, dtype=np.int64)) & 1
