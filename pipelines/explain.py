"""`scdgm explain`: the log-linear explanation of a trained model on prepared cells, written next to the model
(or where --out says) and summarised on the terminal.

When the model was trained as an MLflow run, the explanation becomes a run of its own (role `explain`), nested
under the training run and tagged with its id: its settings, data lineage, headline numbers and files. The
folder keeps a record of that run (mlflow_run.json), so evaluation and registration link to it; explaining
again with other settings makes another run and leaves the training run as it was."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from scdgm.errors import ScdgmError
from scdgm.formats import EXPLANATION_DIR, RUN_RECORD
from scdgm.interpret.explain import ExplainSettings, compute_explanation
from scdgm.models import load_model
from scdgm.pipelines import tracking
from scdgm.pipelines.config import apply_overrides, load_params
from scdgm.pipelines.evaluate import explanation_summary
from scdgm.pipelines.io import read_counts, validate_counts
from scdgm.pipelines.streaming import read_cells, streamed_input
from scdgm.project import project_path


def explain_command(
    model: Annotated[Path, typer.Option("--model", help="Model directory written by `scdgm train`.")],
    data: Annotated[Path, typer.Option("--data", help="Prepared cells (.h5ad) with the model's genes.")],
    n_genes: Annotated[int | None, typer.Option(min=1, help="Genes to select (default: params.yaml explain.n_genes).")] = None,
    draws: Annotated[int | None, typer.Option(min=1, help="Posterior draws per cell (default: explain.draws).")] = None,
    permutations: Annotated[int | None, typer.Option(min=0, help="Permutations per step for p-values (default: explain.permutations).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default: MODEL/explanation).")] = None,
    params: Annotated[Path | None, typer.Option("--params", help="params.yaml to read (the project's by default).")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Override a parameter, e.g. --set explain.alpha=0.05.")] = None,
) -> None:
    """Explain a trained model: genes that form patterns with its latents, p-values, label transfer, plots."""
    if params is not None and not params.is_file():
        raise ScdgmError(f"params file not found: {params}")
    config = apply_overrides(load_params(params), overrides)
    section: dict[str, Any] = dict(config.get("explain") or {})
    section.setdefault("seed", int(config.get("seed", 0)))
    for key, value in {"n_genes": n_genes, "draws": draws, "permutations": permutations}.items():
        if value is not None:
            section[key] = value
    if section.get("gene_sets"):  # a path in params.yaml: taken from the project folder
        section["gene_sets"] = str(project_path(section["gene_sets"]))
    settings = ExplainSettings.from_params(section)
    if not model.is_dir():
        raise ScdgmError(f"model directory not found: {model}")
    fitted = load_model(str(model))
    rows = streamed_input(data, config)
    if rows is None:
        adata = read_counts(data)
        shape = adata.shape
    else:  # larger than memory: only the cells explained are read (explain.max_cells of them)
        chosen = settings.explained_cells(rows.n_cells)
        adata = read_cells(rows, config, np.arange(rows.n_cells) if chosen is None else chosen)
        validate_counts(adata)
        shape = rows.shape
    explanation = compute_explanation(fitted, adata, settings)
    explanation.report["data"]["n_cells_in"] = shape[0]
    report = explanation.save(out or model / EXPLANATION_DIR)
    typer.echo(summary(report))
    if (model / RUN_RECORD).is_file():
        run_id = log_explanation(tracking.RunRecord.read(model), report, data, shape)
        typer.echo(f"logged as MLflow run {run_id}, linked to the model's run")


def log_explanation(model_record: tracking.RunRecord, report: dict[str, Any], data: Path, shape: tuple[int, int]) -> str:
    """Log the explanation `report` (as written, with its folder under 'directory') as its own run linked to
    the model's run: settings as params, data lineage, headline numbers as metrics, the files as artifacts under
    explanation/. Records that run in the folder and returns its id."""
    folder = Path(report["directory"])
    with tracking.linked_run(model_record, "explain", {tracking.TAG_KIND: report["model"]["kind"]}) as (client, run_id):
        tracking.log_params(client, run_id, {"explain": report["settings"]})
        tracking.log_params(client, run_id, tracking.dataset_lineage(data, *shape).params())
        tracking.log_metrics(client, run_id, explanation_summary(folder))
        tracking.log_folder_files(client, run_id, folder, EXPLANATION_DIR)
        tracking.RunRecord(model_record.tracking_uri, client.get_run(run_id).info.experiment_id, run_id).write(folder)
    return run_id


def summary(report: dict[str, Any]) -> str:
    """A few lines: the selected genes with G² and p-values, and label-transfer accuracy."""
    data = report["data"]
    of = f" (a seeded random subset of {data['n_cells_in']}: explain.max_cells)" if data["n_cells_in"] > data["n_cells"] else ""
    lines = [f"wrote {report['directory']}: {report['model']['kind']} explained on {data['n_cells']} cells{of}, "
             f"{data['n_draws']} posterior draws"]
    for step in report["selection"]:
        pvalue = "" if step["pvalue"] is None else (
            f"  p<={step['pvalue']:.3g} (floor; G2 {step['g2_over_null_max']:.1f}x the permutations' largest)"
            if step.get("at_floor") else f"  p={step['pvalue']:.3g}")
        lines.append(f"  {step['step']:>2}. {step['gene']:<14} latent {step['latent']}  G2={step['g2']:.1f}{pvalue}")
    transfer = report["label_transfer"]
    heldout = transfer.get("heldout")
    if heldout:
        lines.append(
            f"held-out label transfer ({heldout['n_test_cells']} test cells; table from {heldout['n_train_cells']} "
            f"training cells): accuracy {heldout['accuracy']:.3f} with every cell labelled; abstaining ("
            f"{heldout['abstains_on']}), coverage {heldout['coverage']:.3f} and accuracy {heldout['covered_accuracy']:.3f}; "
            f"majority baseline {heldout['majority_baseline']:.3f}"
        )
    if "accuracy" in transfer:
        per_class = ", ".join(f"{name} {value:.2f}" for name, value in transfer["per_class"].items())
        lines.append(f"in-sample label transfer accuracy {transfer['accuracy']:.3f} ({per_class})")
    return "\n".join(lines)
