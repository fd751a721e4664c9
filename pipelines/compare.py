"""Compare the best model of each family (vae, ldvae, ae, gan, dbm, pca) on the same held-out cells: pick a champion
on one metric (ties within a tolerance broken by a second metric, then by name), draw the metrics side by side and
write them as markdown for `scdgm report`. Input everywhere: a table indexed by model kind, one column per metric."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scdgm.errors import ScdgmError
from scdgm.files import write_with


@dataclass(frozen=True)
class Metric:
    """A comparison metric: its table column, its label in figures and which direction is better."""

    name: str
    label: str
    higher_is_better: bool


METRICS: tuple[Metric, ...] = (
    Metric("label_transfer_accuracy", "Label-transfer accuracy", True),
    Metric("label_transfer_coverage", "Label-transfer coverage", True),
    Metric("knn_accuracy", "kNN accuracy", True),
    Metric("silhouette", "Silhouette", True),
    Metric("mmd_posterior", "MMD, posterior", False),
    Metric("c2st_posterior", "C2ST AUC, posterior", False),
    Metric("mmd_prior", "MMD, prior", False),
    Metric("c2st_prior", "C2ST AUC, prior", False),
    Metric("nll_elbo", "NLL (ELBO)", False),
    Metric("nll_marginal", "NLL (marginal)", False),
    Metric("training_seconds", "Training time (s)", False),
    Metric("cells_per_second", "Throughput (cells/s)", True),
)
_BY_NAME = {metric.name: metric for metric in METRICS}
HELD_OUT = "the test-split cells, held out from training and from the explanation's table"


@dataclass(frozen=True)
class Selection:
    """The family that wins on `metric`, every candidate best first, the families left out and why, and a
    one-sentence reason shown by `scdgm report`."""

    champion: str
    metric: str
    mode: str
    value: float
    runner_up: str | None
    reason: str
    ranking: list[str]
    excluded: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (str, float, list, dict and None only)."""
        return asdict(self)


def _column(table: pd.DataFrame, name: str) -> pd.Series:
    return pd.to_numeric(table[name], errors="coerce").astype(float).set_axis(table.index.astype(str))


def _sig(value: float, digits: int = 3) -> str:
    """`value` rounded to `digits` significant digits, thousands separated ("n/a" for NaN)."""
    if math.isnan(value):
        return "n/a"
    return f"{float(f'{value:.{digits}g}'):,.12g}"


def _pair(first: float, second: float) -> tuple[str, str]:
    """Both values with the fewest significant digits (3 to 6) that tell them apart."""
    digits = next((d for d in range(3, 7) if _sig(first, d) != _sig(second, d)), 6)
    return _sig(first, digits), _sig(second, digits)


def select_champion(
    table: pd.DataFrame,
    metric: str = "label_transfer_accuracy",
    mode: str = "max",
    tie_break: str | None = "knn_accuracy",
    tolerance: float = 0.0,
) -> Selection:
    """Pick the family with the best `metric` (`mode` "max" or "min") on the held-out cells: values within
    `tolerance` of the best tie and are ranked by `tie_break` (its direction from METRICS, else higher), then name."""
    if mode not in ("max", "min"):
        raise ScdgmError(f"mode must be 'max' or 'min', not {mode!r}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ScdgmError(f"tolerance must be a finite number >= 0, not {tolerance!r}")
    if metric not in table.columns:
        raise ScdgmError(f"unknown metric {metric!r}; the table's columns: {', '.join(map(str, table.columns))}")
    if not table.index.is_unique:
        raise ScdgmError(f"one row per model kind expected; repeated: {sorted(set(table.index[table.index.duplicated()]))}")
    values = _column(table, metric)
    finite = np.isfinite(values)
    excluded = {kind: f"no {metric}" for kind in values.index[~finite]}
    candidates = values[finite]
    if candidates.empty:
        available = [str(c) for c in table.columns if np.isfinite(_column(table, c)).any()]
        raise ScdgmError(f"no model has a value for {metric!r}; columns with values: {', '.join(available) or 'none'}")
    best = candidates.max() if mode == "max" else candidates.min()
    tied = set(candidates.index[(candidates - best).abs() <= tolerance])
    breaker = _column(table, tie_break) if tie_break in table.columns else pd.Series(np.nan, index=values.index)
    up = _BY_NAME[tie_break].higher_is_better if tie_break in _BY_NAME else True

    def order(kind: str) -> tuple[bool, float, str]:
        second = breaker[kind]
        return (not np.isfinite(second), (-second if up else second) if np.isfinite(second) else 0.0, kind)

    sign = -1.0 if mode == "max" else 1.0
    ranking = sorted(tied, key=order) + sorted(set(candidates.index) - tied, key=lambda k: (sign * candidates[k], *order(k)))
    champion, runner_up = ranking[0], (ranking[1] if len(ranking) > 1 else None)
    on = f"{metric} ({mode})"
    if runner_up is None:
        reason = f"{champion} wins on {on}: {_sig(best)}, the only family with this metric"
    elif runner_up in tied:
        mine, theirs = _pair(candidates[champion], candidates[runner_up])
        tie = f"{champion} and {runner_up} tie on {on} " + (
            f"at {mine}" if mine == theirs else f"within {tolerance:g} ({champion} {mine}, {runner_up} {theirs})")
        x, y = breaker[champion], breaker[runner_up]
        mine, theirs = _pair(x, y)
        if np.isfinite(x) and x != y:
            reason = f"{tie}; {tie_break} broke the tie: {champion} {mine} vs {runner_up} {theirs}"
        else:
            reason = f"{tie}; alphabetical order broke the tie" + (f" ({tie_break}: {mine} vs {theirs})" if tie_break else "")
    else:
        mine, theirs = _pair(candidates[champion], candidates[runner_up])
        reason = f"{champion} wins on {on}: {mine} vs {runner_up} {theirs}"
    return Selection(champion, metric, mode, float(candidates[champion]), runner_up, f"{reason} (held-out cells)", ranking, excluded)


def comparison_figure(
    table: pd.DataFrame, path: Path, champion: str | None = None, title: str = "Best model of each family on held-out cells"
) -> Path:
    """One bar panel per METRICS column with a finite value, the families in the same order and colours in every
    panel, the champion's bars outlined and hatched; written atomically as a PNG at `path`."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [m for m in METRICS if m.name in table.columns and np.isfinite(_column(table, m.name)).any()]
    if not panels:
        raise ScdgmError(f"no metric to draw: none of {', '.join(m.name for m in METRICS)} has a finite value")
    kinds = [str(kind) for kind in table.index]
    if champion is not None and champion not in kinds:
        raise ScdgmError(f"champion {champion!r} is not one of the table's models: {', '.join(kinds)}")
    colours = colormaps["tab10"].colors
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(columns * max(3.6, 0.75 * len(kinds) + 1.4), rows * 3.8 + 0.6))
    FigureCanvasAgg(figure)
    grid = figure.subplots(rows, columns, squeeze=False)
    for axes in grid.flat[len(panels):]:
        axes.remove()
    labels = [f"{kind}\n(champion)" if kind == champion else kind for kind in kinds]
    for axes, metric in zip(grid.flat, panels, strict=False):
        for i, value in enumerate(_column(table, metric.name)):
            if not np.isfinite(value):
                axes.annotate("n/a", (i, 0), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                              fontsize=9, color="0.4", style="italic")
                continue
            wins = kinds[i] == champion
            axes.bar(i, value, width=0.7, color=colours[i % len(colours)], edgecolor="black" if wins else "none",
                     linewidth=2.0 if wins else 0.0, hatch="//" if wins else None)
            axes.annotate(_sig(value), (i, value), xytext=(0, 3 if value >= 0 else -3), textcoords="offset points",
                          ha="center", va="bottom" if value >= 0 else "top", fontsize=9)
        direction = "higher" if metric.higher_is_better else "lower"
        axes.set_title(f"{metric.label}\n({direction} is better)", fontsize=11)
        axes.set_xticks(range(len(kinds)), labels, fontsize=10)
        for tick, kind in zip(axes.get_xticklabels(), kinds, strict=True):
            tick.set_fontweight("bold" if kind == champion else "normal")
        axes.set_xlim(-0.6, len(kinds) - 0.4)
        axes.axhline(0, color="0.3", linewidth=0.8)
        axes.margins(y=0.18)
        axes.yaxis.set_major_formatter(lambda tick, _: _sig(tick))
        axes.tick_params(axis="y", labelsize=9)
        axes.spines[["top", "right"]].set_visible(False)
    figure.suptitle(title, fontsize=13)
    figure.tight_layout()
    return write_with(path, lambda staging: figure.savefig(staging, format="png", dpi=120))


def _cell(value: Any) -> str:
    if isinstance(value, int | float | np.number) and not isinstance(value, bool | np.bool_):
        return _sig(float(value), 4)
    return "n/a" if pd.isna(value) else str(value)


def comparison_markdown(table: pd.DataFrame, selection: Selection | None) -> str:
    """The metrics as a markdown table (METRICS columns first, 4 significant digits, the champion marked "*"), the
    champion with its reason, and a legend of which direction is better and which cells were used."""
    known = [m.name for m in METRICS if m.name in table.columns]
    columns = known + [c for c in table.columns if c not in known]
    champion = selection.champion if selection else None
    frame = pd.DataFrame({"model": [f"{k}*" if str(k) == champion else str(k) for k in table.index]}
                         | {str(c): [_cell(v) for v in table[c]] for c in columns})
    lines = [frame.to_markdown(index=False, disable_numparse=True, colalign=["left"] + ["right"] * len(columns)), ""]
    if selection is None:
        lines.append("Champion: none selected.")
    else:
        lines.append(f"Champion: {selection.champion}. Why: {selection.reason}.")
        if selection.excluded:
            lines.append("Not ranked: " + ", ".join(f"{k} ({why})" for k, why in selection.excluded.items()) + ".")
    higher = [m for m in known if _BY_NAME[m].higher_is_better]
    lower = [m for m in known if not _BY_NAME[m].higher_is_better]
    lines.append(f"Higher is better: {', '.join(higher) or 'none'}; lower is better: {', '.join(lower) or 'none'}; "
                 f"the quality metrics are computed on {HELD_OUT}; time and throughput are the refit's training.")
    return "\n".join(lines) + "\n"
