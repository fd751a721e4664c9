"""PNG figures of an explanation (matplotlib's object API with the Agg canvas: no pyplot state, no display):
latent scatter with density contours per label, top genes per factor, selection path, original vs transferred
labels, the pattern MDS map and the cell × gene pattern heat map."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import gaussian_kde

MAX_KDE_POINTS = 2000


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


def project_2d(z: np.ndarray, projection: str = "pca") -> tuple[np.ndarray, tuple[str, str]]:
    """Two coordinates per row: the first two columns ('first') or the top two principal components ('pca')."""
    z = np.asarray(z, dtype=np.float64)
    if z.shape[1] == 1:
        return np.column_stack([z[:, 0], np.zeros(len(z))]), ("latent_0", "")
    if projection == "first" or z.shape[1] == 2:
        return z[:, :2], ("latent_0", "latent_1")
    if projection != "pca":
        raise ValueError(f"projection must be 'first' or 'pca', got {projection!r}")
    centred = z - z.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T, ("PC1 of latents", "PC2 of latents")


def _colours(labels: Sequence) -> dict[str, tuple]:
    from matplotlib import colormaps

    names = sorted(set(map(str, labels)))
    cmap = colormaps["tab20" if len(names) > 10 else "tab10"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _labelled_scatter(axes: Axes, xy: np.ndarray, labels: Sequence, colours: dict[str, tuple], contours: bool) -> None:
    labels = np.asarray(labels).astype(str)
    rng = np.random.default_rng(0)
    grid = np.mgrid[
        xy[:, 0].min() : xy[:, 0].max() : 80j, xy[:, 1].min() : xy[:, 1].max() : 80j
    ] if contours else None
    for name, colour in colours.items():
        points = xy[labels == name]
        if not len(points):
            continue
        axes.scatter(points[:, 0], points[:, 1], s=4, color=colour, alpha=0.5, linewidths=0, label=name)
        if grid is None or len(points) < 10:
            continue
        sample = points[rng.choice(len(points), min(len(points), MAX_KDE_POINTS), replace=False)]
        try:
            density = gaussian_kde(sample.T)(grid.reshape(2, -1)).reshape(grid.shape[1:])
        except np.linalg.LinAlgError:  # all points on a line: no density to draw
            continue
        axes.contour(grid[0], grid[1], density, levels=density.max() * np.array([0.25, 0.5, 0.75]),
                     colors=[colour], linewidths=0.8)


def latent_scatter(
    z: np.ndarray, labels: Sequence, path: str | Path, projection: str = "pca", title: str = "latent space"
) -> Path:
    """Cells in the latent space (first two latents or a PCA of them), coloured by label, with density
    contours per label (review Figs. 4 and 6)."""
    xy, axis_names = project_2d(z, projection)
    figure = Figure(figsize=(6.5, 5))
    axes = figure.add_subplot()
    _labelled_scatter(axes, xy, labels, _colours(labels), contours=True)
    axes.set(xlabel=axis_names[0], ylabel=axis_names[1], title=title)
    axes.legend(markerscale=3, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return _save(figure, path)


def loadings_chart(
    top: pd.DataFrame, path: str | Path, variance: pd.Series | None = None, n_factors: int = 6
) -> Path:
    """Per factor (the `n_factors` explaining most variance given `variance`, by factor name; else the first),
    its top-ranked genes of each sign (`loadings.top_genes`) as named bars of their score, loading × gene weight,
    the strongest positive at the top and the strongest negative at the bottom: what each factor means, in genes a
    reader knows."""
    factors = list(dict.fromkeys(top["factor"]))
    if variance is not None:
        factors = sorted(factors, key=lambda factor: -float(variance.get(factor, 0.0)))
    factors = factors[:n_factors]
    columns = min(3, max(len(factors), 1))
    rows = max(1, -(-len(factors) // columns))
    height = max(2, top.groupby("factor").size().max() if len(top) else 2)
    figure = Figure(figsize=(4.2 * columns, 0.22 * height * rows + 1.2 * rows))
    panels = figure.subplots(rows, columns, squeeze=False).ravel()
    for axes, factor in zip(panels, factors, strict=False):
        own = top[top["factor"] == factor]
        genes = pd.concat([own[own["sign"] == "+"].sort_values("rank"),
                           own[own["sign"] == "-"].sort_values("rank", ascending=False)])
        y = np.arange(len(genes))[::-1]
        colours = np.where(genes["sign"] == "+", "tab:red", "tab:blue")
        axes.barh(y, genes["score"], color=colours, alpha=0.8)
        axes.set_yticks(y, genes["gene"].tolist(), fontsize=7)
        axes.axvline(0, color="0.5", linewidth=0.6)
        share = f" ({100 * float(variance[factor]):.1f}% var.)" if variance is not None and factor in variance else ""
        axes.set_title(f"{factor}{share}", fontsize=9)
        axes.tick_params(axis="x", labelsize=7)
    for axes in panels[len(factors):]:
        axes.set_visible(False)
    figure.suptitle("top genes per factor: loading × gene weight (mean count / (1 + mean count))", fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


def selection_path(
    genes: Sequence[str], g2: Sequence[float], pvalues: Sequence[float] | None, path: str | Path
) -> Path:
    """G² of each selected gene in selection order, with its permutation p-value on a second axis."""
    steps = np.arange(1, len(genes) + 1)
    figure = Figure(figsize=(max(5, 0.6 * len(genes) + 2), 4))
    axes = figure.add_subplot()
    axes.bar(steps, g2, color="tab:blue", alpha=0.7)
    axes.set_xticks(steps, [f"{s}. {g}" for s, g in zip(steps, genes, strict=True)], rotation=60, ha="right", fontsize=8)
    axes.set(ylabel="G² (deviance)", title="step-wise selection")
    if pvalues is not None and len(pvalues):
        right = axes.twinx()
        right.plot(steps, pvalues, "o-", color="tab:red")
        right.axhline(0.05, color="tab:red", linestyle=":", linewidth=0.8)
        right.set(ylabel="permutation p-value", ylim=(0, 1.02))
    return _save(figure, path)


def transfer_map(xy: np.ndarray, original: Sequence, transferred: Sequence, path: str | Path) -> Path:
    """Synthetic cells on a 2-D embedding, coloured by the label of their source cell (left) and by the label
    transferred through their pattern (right), as in review Fig. 8."""
    colours = _colours(list(original) + list(transferred))
    figure = Figure(figsize=(12, 5))
    left, right = figure.subplots(1, 2, sharex=True, sharey=True)
    _labelled_scatter(left, xy, original, colours, contours=False)
    _labelled_scatter(right, xy, transferred, colours, contours=False)
    left.set(title="original label", xlabel="dim 1", ylabel="dim 2")
    right.set(title="transferred label", xlabel="dim 1")
    right.legend(markerscale=3, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return _save(figure, path)


def pattern_map(
    coords: np.ndarray, frequencies: Sequence[float], names: Sequence[str], path: str | Path,
    labels: Sequence[str] | None = None,
) -> Path:
    """Patterns on their classical MDS map (sqrt Jensen-Shannon distances), points sized by frequency and, given
    `labels` (e.g. each pattern's transferred label), coloured by label."""
    coords = np.asarray(coords, dtype=np.float64).reshape(len(names), -1)
    if coords.shape[1] == 1:
        coords = np.column_stack([coords[:, 0], np.zeros(len(coords))])
    sizes = np.asarray(frequencies, dtype=np.float64)
    sizes = 20 + 1000 * sizes / max(sizes.max(), 1e-12)
    labels = np.asarray(labels if labels is not None else ["pattern"] * len(names)).astype(str)
    figure = Figure(figsize=(7, 6))
    axes = figure.add_subplot()
    for label, colour in _colours(labels).items():
        chosen = labels == label
        axes.scatter(coords[chosen, 0], coords[chosen, 1], s=sizes[chosen], alpha=0.6, color=colour,
                     linewidths=0, label=label)
    for (x, y), name in zip(coords[:, :2], names, strict=True):
        axes.annotate(str(name), (x, y), fontsize=7, ha="center", va="center", family="monospace")
    axes.set(xlabel="MDS 1", ylabel="MDS 2", title="gene patterns (size: frequency)")
    if len(set(labels)) > 1:
        axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, markerscale=0.5)
    return _save(figure, path)


MAX_HEATMAP_CELLS = 600
"""Cells drawn in the pattern heat map (a seeded sample, each label keeping its share)."""


def pattern_heatmap(
    bits: np.ndarray, genes: Sequence[str], labels: Sequence[str], path: str | Path, seed: int = 0
) -> Path:
    """Cells × selected genes, on (1) or off (0), cells grouped by their (transferred) label and ordered by pattern
    within it, a colour strip naming each group and the genes named in selection order: which genes switch on
    together in which cell type."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    bits = np.asarray(bits, dtype=np.uint8)
    labels = np.asarray(labels).astype(str)
    rng = np.random.default_rng(seed)
    if len(labels) > MAX_HEATMAP_CELLS:
        chosen = np.sort(rng.choice(len(labels), MAX_HEATMAP_CELLS, replace=False))
        bits, labels = bits[chosen], labels[chosen]
    codes = bits @ (1 << np.arange(bits.shape[1] - 1, -1, -1))
    order = np.lexsort((-codes, labels))
    bits, labels = bits[order], labels[order]
    colours = _colours(labels)
    figure = Figure(figsize=(max(5.0, 0.45 * len(genes) + 3.5), 6))
    strip, axes = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1, max(4, len(genes))], "wspace": 0.03})
    names = sorted(colours)
    strip.imshow(np.array([[names.index(label)] for label in labels]), aspect="auto", interpolation="nearest",
                 cmap=ListedColormap([colours[name] for name in names]), vmin=-0.5, vmax=len(names) - 0.5)
    strip.set(xticks=[], yticks=[], ylabel=f"{len(labels)} cells, grouped by label")
    axes.imshow(bits, aspect="auto", interpolation="nearest", cmap=ListedColormap(["#f0f0f0", colormaps["viridis"](0.85)]),
                vmin=0, vmax=1)
    axes.set_xticks(range(len(genes)), [str(g) for g in genes], rotation=60, ha="right", fontsize=9)
    axes.set_yticks([])
    axes.set_title("gene patterns: on (green) / off (grey) per cell", fontsize=11)
    bounds = np.flatnonzero(labels[1:] != labels[:-1]) + 0.5
    for y in bounds:
        axes.axhline(y, color="white", linewidth=1.0)
    figure.legend(handles=[Patch(color=colours[n], label=n) for n in names], loc="center left",
                  bbox_to_anchor=(0.92, 0.5), frameon=False, fontsize=8)
    return _save(figure, path)
