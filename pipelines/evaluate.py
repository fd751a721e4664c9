"""`scdgm evaluate`: held-out metrics of a model directory, written where DVC looks for them.

- `--out` (<project>/reports/metrics.json): the test metrics, and the explanation's summary numbers when the model has
  one (label-transfer accuracy, its majority baseline, unseen pattern fraction) — for `dvc metrics show/diff`;
- `--history` (<project>/reports/history.csv): the per-epoch losses and learning rate — for `dvc plots show`;
- `--figures` (<project>/reports/figures/): loss curves and the test cells' latent space as PNG.

With an explanation, `<split>.label_accuracy` is the accuracy of the labels the served model returns (the
explanation's pattern → label transfer) on the held-out cells. `evaluated_on` fingerprints those cells (the data's
md5 and the split's cell names) and names the model's and the explanation's runs, so registration compares models
only on the same cells.

When the model was trained as an MLflow run (its mlflow_run.json), the evaluation is a run of its own (role
`evaluate`), nested under the training run: metrics (prefixed `<split>_`), the cells' fingerprint and the files.
The training run is left as it was.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from scdgm.errors import ScdgmError
from scdgm.files import write_json_atomic, write_text_atomic
from scdgm.formats import EXPLANATION_FILE, REFERENCE_FILE, RUN_RECORD, is_model_directory
from scdgm.interpret.explain import HELDOUT_FIGURES
from scdgm.interpret.label_transfer import LabelReference, transfer_accuracy
from scdgm.interpret.plots import latent_scatter
from scdgm.models import load_model
from scdgm.models.base import GenerativeModel
from scdgm.models.data import model_counts, split_mask
from scdgm.pipelines import tracking
from scdgm.pipelines.io import read_counts
from scdgm.pipelines.pyfunc import explanation_folder
from scdgm.project import REPORTS, project_path

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd

LOSS_PREFIXES = ("train_", "validation_")
SUMMARY_KEYS = {
    "accuracy": "label_transfer_accuracy",
    "majority_baseline": "label_transfer_majority_baseline",
    "unseen_pattern_fraction": "unseen_pattern_fraction",
}
"""explanation.json's label-transfer numbers (its label_transfer section, or top level) and their metric names."""


def explanation_summary(folder: Path | None) -> dict[str, float]:
    """The headline numbers of the explanation in `folder` (none without one)."""
    path = folder / EXPLANATION_FILE if folder is not None else None
    if path is None or not path.is_file():
        return {}
    report = json.loads(path.read_text())
    transfer = report.get("label_transfer") or {}
    summary = {"selected_genes": float(len(report.get("selection") or []))}
    for key, name in SUMMARY_KEYS.items():
        value = transfer.get(key, report.get(key))
        if isinstance(value, (int, float)) and math.isfinite(value):
            summary[name] = float(value)
    for key in HELDOUT_FIGURES:  # the held-out figures (test cells), beside the in-sample ones above
        value = (transfer.get("heldout") or {}).get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            summary[f"label_transfer_heldout_{key}"] = float(value)
    return summary


def label_accuracy(folder: Path | None, model: GenerativeModel, cells: ad.AnnData) -> dict[str, float]:
    """`label_accuracy`: share of `cells` whose label, transferred from their pattern as serving does, is their
    own (none without an explanation with labels, or without those labels in obs)."""
    path = folder / REFERENCE_FILE if folder is not None else None
    if path is None or not path.is_file():
        return {}
    reference = json.loads(path.read_text())
    key = reference.get("label_key")
    if not key or key not in cells.obs:
        return {}
    patterns = LabelReference.from_dict(reference["label_transfer"])
    predicted = patterns.transfer(patterns.pattern_bits(model_counts(cells, model.genes)))["label"]
    return {"label_accuracy": transfer_accuracy(predicted, cells.obs[key].astype(str)).overall}


def cells_fingerprint(data: Path, adata: ad.AnnData, split: str) -> str:
    """A short hash of the evaluated cells: the data file's md5 (DVC's when recorded) and the split's cell names."""
    md5 = tracking.dataset_lineage(data, *adata.shape).md5
    names = adata.obs_names[split_mask(adata, split)]
    return hashlib.sha256("\n".join([md5, split, *map(str, names)]).encode()).hexdigest()[:16]


def _run_id(folder: Path | None) -> str | None:
    """The run recorded in a model directory or explanation folder, if any."""
    return tracking.RunRecord.read(folder).run_id if folder is not None and (folder / RUN_RECORD).is_file() else None


def history_frame(model: GenerativeModel) -> pd.DataFrame:
    """Per-epoch metrics of the model's training (epoch, losses on train and validation, lr)."""
    import pandas as pd

    frame = pd.DataFrame(model.history.epochs)
    if frame.empty:
        return pd.DataFrame({"epoch": []})
    columns = ["epoch"] + sorted(c for c in frame.columns if c.startswith(LOSS_PREFIXES)) + ["lr"]
    return frame[[c for c in columns if c in frame.columns]]


def loss_figure(history: pd.DataFrame, path: Path, title: str) -> Path:
    """Training and validation loss per epoch (the total loss; other terms are in the history CSV)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for column in ("train_loss", "validation_loss"):
        if column in history:
            axes.plot(history["epoch"], history[column], label=column)
    axes.set(xlabel="epoch", ylabel="loss", title=title)
    axes.legend(frameon=False)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path


def evaluate(
    model_dir: Path,
    data: Path,
    split: str,
    out: Path,
    history: Path | None,
    figures: Path | None,
    explanation: Path | None = None,
) -> dict[str, Any]:
    """Evaluate `model_dir` on the cells of `split` and write the metrics, history and figures; `explanation`
    (default: the model's own explanation/) adds its summary."""
    if not is_model_directory(model_dir):
        raise ScdgmError(f"{model_dir}: not a model directory (no config.json)")
    model = load_model(str(model_dir))
    adata = read_counts(data)
    cells = split_mask(adata, split)
    if not cells.any():
        raise ScdgmError(f"{data}: no cells in split {split!r}")
    folder = explanation_folder(model_dir, explanation)
    metrics = model.evaluate(adata, split) | label_accuracy(folder, model, adata[cells])
    document: dict[str, Any] = {split: metrics, "n_cells": int(cells.sum())}
    summary = explanation_summary(folder)
    if summary:
        document["explanation"] = summary
    evaluated_on = {"split": split, "cells": cells_fingerprint(data, adata, split),
                    "model_run_id": _run_id(model_dir), "explanation_run_id": _run_id(folder)}
    document["evaluated_on"] = {k: v for k, v in evaluated_on.items() if v is not None}
    write_json_atomic(out, document)
    written = [out]
    frame = history_frame(model)
    if history is not None:
        written.append(write_text_atomic(history, frame.to_csv(index=False)))
    if figures is not None:
        figures.mkdir(parents=True, exist_ok=True)
        written.append(loss_figure(frame, figures / "loss.png", f"{model.kind} training"))
        heldout = adata[cells]
        labels = heldout.obs["cell_type"].astype(str).to_numpy() if "cell_type" in heldout.obs else ["cells"] * heldout.n_obs
        written.append(
            latent_scatter(model.embed(heldout, key_added=None).mean, labels, figures / "latent_test.png", title=f"{model.kind}: {split} cells")
        )
    if (model_dir / RUN_RECORD).is_file():
        record = tracking.RunRecord.read(model_dir)
        with tracking.linked_run(record, "evaluate", {tracking.TAG_KIND: model.kind}) as (client, run_id):
            tracking.log_params(client, run_id, {"evaluated_on": document["evaluated_on"]})
            tracking.log_metrics(client, run_id, {f"{split}_{k}": v for k, v in metrics.items()} | summary)
            for path in written:
                client.log_artifact(run_id, str(path), artifact_path="evaluation")
    return document


def evaluate_command(
    model: Annotated[Path, typer.Option("--model", help="Model directory written by `scdgm train`.")],
    data: Annotated[Path, typer.Option("--data", help="Prepared cells (.h5ad) with obs['split'].")],
    split: Annotated[str, typer.Option(help="Cells to evaluate on (obs['split']).")] = "test",
    out: Annotated[Path | None, typer.Option(help="Metrics JSON (for `dvc metrics show`) [default: <project>/reports/metrics.json].")] = None,
    history: Annotated[Path | None, typer.Option(help="Per-epoch history CSV (for `dvc plots show`) [default: <project>/reports/history.csv].")] = None,
    figures: Annotated[Path | None, typer.Option(help="Folder for the loss and latent-space figures [default: <project>/reports/figures].")] = None,
    explanation: Annotated[Path | None, typer.Option(help="Explanation folder (default: MODEL/explanation when present).")] = None,
) -> None:
    """Evaluate a trained model on held-out cells; write metrics, history and figures for DVC and MLflow."""
    out = out or project_path(REPORTS, "metrics.json")
    history = history or project_path(REPORTS, "history.csv")
    figures = figures or project_path(REPORTS, "figures")
    document = evaluate(model, data, split, out, history, figures, explanation)
    shown = {k: v for k, v in document[split].items()
             if k in ("nll_elbo", "knn_accuracy", "silhouette", "mmd_prior", "label_accuracy")}
    shown |= {k: v for k, v in document.get("explanation", {}).items() if k == "label_transfer_accuracy"}
    typer.echo(f"wrote {out}: {document['n_cells']} {split} cells; " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
