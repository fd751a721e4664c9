"""Comparing the best model of each family on held-out cells: the champion and its reason, ties, families without
the metric, the errors a user can fix, the comparison figure (a valid PNG written atomically) and the markdown."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from scdgm.errors import ScdgmError
from scdgm.pipelines.compare import METRICS, Metric, comparison_figure, comparison_markdown, select_champion

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def families(**columns: list[float]) -> pd.DataFrame:
    """A comparison table of the six families (vae, ldvae, ae, gan, dbm, pca), one column per metric given."""
    return pd.DataFrame(columns, index=pd.Index(["vae", "ldvae", "ae", "gan", "dbm", "pca"], name="model"))


@pytest.fixture
def table() -> pd.DataFrame:
    nan = np.nan
    return families(
        label_transfer_accuracy=[0.712, 0.690, 0.650, nan, 0.500, 0.600],
        knn_accuracy=[0.80, 0.85, 0.82, 0.70, nan, 0.60],
        silhouette=[0.10, -0.05, 0.20, 0.30, 0.0, nan],
        nll_elbo=[1234.5, 1200.1, 1500.0, nan, nan, nan],
        training_seconds=[120.0, 130.0, 60.0, 300.0, 45.0, 1.2],
        seed=[0, 1, 2, 3, 4, 5],
    )


def test_metrics_are_unique_and_typed():
    assert len({m.name for m in METRICS}) == len(METRICS) == 12
    assert all(isinstance(m, Metric) for m in METRICS)
    directions = {m.name: m.higher_is_better for m in METRICS}
    assert directions["label_transfer_accuracy"] and directions["cells_per_second"]
    assert not directions["c2st_posterior"] and not directions["nll_marginal"] and not directions["training_seconds"]


def test_max_picks_the_highest_and_ranks_every_candidate(table):
    selection = select_champion(table)
    assert (selection.champion, selection.runner_up, selection.value) == ("vae", "ldvae", 0.712)
    assert selection.ranking == ["vae", "ldvae", "ae", "pca", "dbm"]
    assert selection.excluded == {"gan": "no label_transfer_accuracy"}
    assert selection.reason == "vae wins on label_transfer_accuracy (max): 0.712 vs ldvae 0.69 (held-out cells)"
    document = json.loads(json.dumps(selection.to_dict()))
    assert document["champion"] == "vae" and document["ranking"][0] == "vae" and document["excluded"] == selection.excluded


def test_min_picks_the_lowest_and_excludes_families_without_the_metric(table):
    selection = select_champion(table, "nll_elbo", "min")
    assert selection.champion == "ldvae" and selection.ranking == ["ldvae", "vae", "ae"]
    assert set(selection.excluded) == {"gan", "dbm", "pca"}
    assert "ldvae wins on nll_elbo (min): 1,200 vs vae 1,230" in selection.reason


def test_only_candidate_says_so():
    selection = select_champion(families(silhouette=[np.nan, np.nan, 0.4, np.nan, np.nan, np.nan]), "silhouette")
    assert selection.champion == "ae" and selection.runner_up is None and selection.ranking == ["ae"]
    assert "the only family with this metric" in selection.reason and len(selection.excluded) == 5


def test_exact_tie_is_broken_by_knn_accuracy(table):
    tied = table.assign(label_transfer_accuracy=[0.7, 0.7, 0.6, 0.7, 0.5, 0.6], knn_accuracy=[0.80, 0.85, 0.9, np.nan, 0.3, 0.6])
    selection = select_champion(tied)
    # gan ties too but has no knn_accuracy: ranked last among the tied
    assert selection.ranking[:3] == ["ldvae", "vae", "gan"] and selection.champion == "ldvae"
    assert selection.reason == ("ldvae and vae tie on label_transfer_accuracy (max) at 0.7; knn_accuracy broke the tie: "
                                "ldvae 0.85 vs vae 0.8 (held-out cells)")


def test_tie_break_direction_comes_from_metrics(table):
    tied = table.assign(label_transfer_accuracy=[0.7, 0.7, 0.6, 0.6, 0.5, 0.6])
    assert select_champion(tied, tie_break="training_seconds").champion == "vae"  # 120 s beats 130 s: lower is better
    assert select_champion(tied, tie_break="seed").champion == "ldvae"  # not in METRICS: higher wins


def test_tolerance_makes_close_values_tie(table):
    assert select_champion(table, tolerance=0.0).champion == "vae"
    selection = select_champion(table, tolerance=0.03)  # vae 0.712 and ldvae 0.690 tie; ae 0.650 does not
    assert selection.champion == "ldvae" and selection.value == 0.690 and selection.ranking[:3] == ["ldvae", "vae", "ae"]
    assert "within 0.03 (ldvae 0.69, vae 0.712)" in selection.reason
    assert "knn_accuracy broke the tie: ldvae 0.85 vs vae 0.8" in selection.reason
    assert select_champion(table, tolerance=0.1).champion == "ldvae"  # ae (0.82) ties too, ldvae's 0.85 still best


def test_remaining_ties_go_by_name():
    same = families(label_transfer_accuracy=[0.5] * 6, knn_accuracy=[0.9] * 6)
    selection = select_champion(same)
    assert selection.ranking == ["ae", "dbm", "gan", "ldvae", "pca", "vae"]
    assert "alphabetical order broke the tie (knn_accuracy: 0.9 vs 0.9)" in selection.reason
    assert select_champion(same, tie_break=None).ranking == selection.ranking
    assert select_champion(same, tie_break="not_a_column").champion == "ae"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"metric": "accuracy"}, "unknown metric 'accuracy'; the table's columns: label_transfer_accuracy, knn_accuracy"),
        ({"mode": "maximum"}, "mode must be 'max' or 'min', not 'maximum'"),
        ({"tolerance": -0.1}, "tolerance must be a finite number >= 0"),
        ({"metric": "mmd_prior"}, "no model has a value for 'mmd_prior'; columns with values: label_transfer_accuracy, knn_accuracy, "),
    ],
)
def test_errors_name_what_to_fix(table, arguments, message):
    with pytest.raises(ScdgmError) as caught:
        select_champion(table.assign(mmd_prior=np.nan), **arguments)
    assert message in str(caught.value)


def test_repeated_model_kind_is_an_error(table):
    with pytest.raises(ScdgmError, match="one row per model kind"):
        select_champion(pd.concat([table, table.iloc[[0]]]))


def test_figure_is_a_png_replaced_atomically(tmp_path, table):
    import matplotlib.image

    path = tmp_path / "figures" / "comparison.png"
    assert comparison_figure(table, path, champion="vae") == path
    first = path.read_bytes()
    assert first.startswith(PNG_SIGNATURE)
    image = matplotlib.image.imread(path)
    # five metric panels with a finite value (seed is not a metric): two rows of up to four
    assert image.ndim == 3 and image.shape[1] > image.shape[0] > 300
    before = path.stat().st_ino
    comparison_figure(table[["label_transfer_accuracy", "knn_accuracy"]], path, champion=None)
    assert path.read_bytes().startswith(PNG_SIGNATURE) and path.read_bytes() != first
    assert path.stat().st_ino != before  # a new file renamed into place, not rewritten in place
    assert [p.name for p in path.parent.iterdir()] == ["comparison.png"]  # no staging file left


def test_figure_needs_a_finite_metric_and_a_known_champion(tmp_path, table):
    with pytest.raises(ScdgmError, match="no metric to draw"):
        comparison_figure(families(mmd_prior=[np.nan] * 6, seed=list(range(6))), tmp_path / "none.png")
    with pytest.raises(ScdgmError, match="champion 'scvi' is not one of the table's models"):
        comparison_figure(table, tmp_path / "bad.png", champion="scvi")
    assert list(tmp_path.iterdir()) == []


def test_markdown_marks_the_champion_and_explains(table):
    selection = select_champion(table)
    text = comparison_markdown(table, selection)
    lines = text.splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header == ["model", "label_transfer_accuracy", "knn_accuracy", "silhouette", "nll_elbo", "training_seconds", "seed"]
    rows = {line.split("|")[1].strip(): line for line in lines[2:8]}
    assert set(rows) == {"vae*", "ldvae", "ae", "gan", "dbm", "pca"}
    assert "1,234" in rows["vae*"] and "n/a" in rows["gan"]  # 4 significant digits; NaN as n/a
    assert f"Champion: vae. Why: {selection.reason}." in lines
    assert "Not ranked: gan (no label_transfer_accuracy)." in lines
    assert lines[-1].startswith("Higher is better: label_transfer_accuracy, knn_accuracy, silhouette; lower is better: nll_elbo, training_seconds")
    assert "test-split cells, held out from training and from the explanation's table" in lines[-1]
    assert "*" not in comparison_markdown(table, None).split("Champion")[0]
