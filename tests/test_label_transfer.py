"""Label transfer by patterns: majority label, unseen patterns by Hamming distance and frequency, abstention,
accuracy."""
import json

import numpy as np
import pytest

from scdgm.errors import InputError, ScdgmError
from scdgm.interpret.discretize import fit_discretizer
from scdgm.interpret.label_transfer import LabelReference, build_reference, transfer_accuracy


def make_reference() -> tuple[LabelReference, np.ndarray]:
    """Real cells over 4 genes, two selected (1 and 3): patterns 11 (B×5, T×1), 10 (B×2, T×2), 00 (T×3)."""
    patterns = ["11"] * 6 + ["10"] * 4 + ["00"] * 3
    labels = ["B"] * 5 + ["T"] + ["B", "B", "T", "T"] + ["T"] * 3
    x = np.zeros((len(patterns), 4))
    for row, pattern in enumerate(patterns):
        x[row, 1], x[row, 3] = 3 * int(pattern[0]), 3 * int(pattern[1])
    x[:, 0] = np.arange(len(patterns))  # an unselected gene
    discretizer = fit_discretizer(np.vstack([x, np.zeros((20, 4))]))  # thresholds 0: "non-zero"
    return build_reference(x, labels, discretizer, genes=[1, 3]), labels


def test_majority_label_and_ties_between_labels():
    reference, _ = make_reference()
    assert reference.patterns == ["11", "10", "00"]
    result = reference.transfer(np.array([[1, 1], [1, 0], [0, 0]]))
    assert result["label"].tolist() == ["B", "B", "T"]  # 10 is a B/T tie: B is more frequent overall (7 vs 6)
    assert result["support"].tolist() == pytest.approx([5 / 6, 0.5, 1.0])
    assert result["frequency"].tolist() == [6, 4, 3]
    assert result["distance"].tolist() == [0, 0, 0]


def test_unseen_pattern_goes_to_nearest_then_most_frequent():
    reference, _ = make_reference()
    row = reference.transfer_one([0, 1])  # Hamming 1 from both 11 (6 cells) and 00 (3 cells): 11 wins
    assert row == {"label": "B", "pattern": "01", "matched_pattern": "11", "distance": 1, "frequency": 6,
                   "support": pytest.approx(5 / 6), "assigned": False, "assigned_label": "unassigned"}
    wide = LabelReference([0, 1, 2], np.zeros(3), ["000", "111", "011"], ["a", "b"],
                          np.array([[1, 0], [0, 4], [3, 0]]))
    assert wide.transfer_one([1, 1, 0])["matched_pattern"] == "111"  # distance 1 beats 011 at distance 2
    assert wide.transfer_one([0, 0, 1])["matched_pattern"] == "011"  # 000 and 011 both at 1: 011 is more frequent


def test_abstention_by_hamming_radius_and_pattern_support():
    reference, _ = make_reference()
    bits = np.array([[1, 1], [1, 0], [0, 0], [0, 1]])  # the last pattern was never seen
    default = reference.transfer(bits)  # abstains on unseen patterns only
    assert default["assigned"].tolist() == [True, True, True, False]
    assert default["assigned_label"].tolist() == ["B", "B", "T", "unassigned"]
    assert default["label"].tolist() == ["B", "B", "T", "B"]  # every cell still gets the nearest pattern's label
    table = reference.to_dict()
    radius = LabelReference.from_dict(table | {"max_distance": 1}).transfer(bits)
    assert radius["assigned"].all()
    assert reference.abstains_on == "patterns not seen"
    assert LabelReference.from_dict(table | {"max_distance": None}).abstains_on == "nothing (every cell is labelled)"
    support = LabelReference.from_dict(table | {"max_distance": None, "min_cells": 4}).transfer(bits)
    assert support["assigned"].tolist() == [True, True, False, True]  # 00 was seen in 3 cells, 01 matches 11 (6)
    assert LabelReference.from_dict(table | {"max_distance": None, "min_cells": 4}).abstains_on == (
        "patterns seen in fewer than 4 reference cells")
    version_1 = {k: v for k, v in table.items() if k not in ("max_distance", "min_cells")} | {"version": 1}
    assert LabelReference.from_dict(version_1).transfer(bits)["assigned"].tolist() == [True, True, True, False]
    with pytest.raises(ScdgmError, match="abstain_distance"):
        LabelReference.from_dict(table | {"max_distance": -1})
    with pytest.raises(ScdgmError, match="abstain_min_cells"):
        LabelReference.from_dict(table | {"min_cells": 0})


def test_reference_round_trips_through_json_and_cuts_real_counts():
    reference, labels = make_reference()
    loaded = LabelReference.from_dict(json.loads(json.dumps(reference.to_dict())))
    bits = np.array([[0, 1], [1, 1], [0, 0], [1, 0]])
    assert loaded.transfer(bits).equals(reference.transfer(bits))
    real = np.array([[9.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert loaded.pattern_bits(real).tolist() == [[1, 1], [0, 0]]
    with pytest.raises(InputError, match="binary"):
        loaded.transfer(np.array([[2, 0]]))


def test_accuracy_per_class_and_confusion_matrix():
    truth = ["B", "B", "B", "T", "T", "NK"]
    predicted = ["B", "B", "T", "T", "T", "T"]
    accuracy = transfer_accuracy(predicted, truth)
    assert accuracy.overall == pytest.approx(4 / 6)
    assert accuracy.per_class.to_dict() == pytest.approx({"B": 2 / 3, "NK": 0.0, "T": 1.0})
    assert accuracy.confusion.loc["B", "T"] == 1 and accuracy.confusion.loc["NK", "T"] == 1
    assert accuracy.confusion.to_numpy().sum() == 6
    with pytest.raises(InputError):
        transfer_accuracy(["B"], ["B", "T"])


def test_posterior_draws_recover_their_source_labels():
    """Draws keep the label of their real cell; patterns that separate labels transfer them well."""
    rng = np.random.default_rng(0)
    labels = np.repeat(["B", "T", "NK"], 100)
    means = {"B": [5, 0, 0], "T": [0, 5, 0], "NK": [0, 5, 5]}
    real = rng.poisson([means[label] for label in labels]).astype(float)
    draws = rng.poisson([means[label] for label in np.tile(labels, 3)]).astype(float)
    discretizer = fit_discretizer(draws, quantile=0.5)
    reference = build_reference(real, labels, discretizer, genes=[0, 1, 2])
    result = reference.transfer(discretizer.genes_binary(draws))
    accuracy = transfer_accuracy(result["label"], np.tile(labels, 3))
    assert accuracy.overall > 0.9 and set(accuracy.per_class.index) == {"B", "T", "NK"}
