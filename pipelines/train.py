"""`scdgm train`, `scdgm embed` and `scdgm sample`: fit a model and evaluate it, embed cells, draw synthetic cells.

Hyperparameters come from params.yaml (`train.common`, then `train.<model>`) and `--set key=value`; a model
directory is written whole or not at all (built in a hidden sibling folder, then renamed into place), and replaces
an earlier model only with `--overwrite`.
`train_model` is the library entry point the tuner and the tracker call.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from contextlib import nullcontext
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from scdgm.defaults import read_params_file
from scdgm.errors import InputError, ScdgmError
from scdgm.files import atomic_path, write_json_atomic
from scdgm.formats import CHAMPION, METRICS_FILE, MODEL_FILES, is_model_directory
from scdgm.models import MODEL_KINDS, create_model, load_model, model_class
from scdgm.models.base import EpochCallback, GenerativeModel, TrainingHistory
from scdgm.models.data import split_mask
from scdgm.models.torch_model import DataParallel
from scdgm.pipelines import distributed, tracking
from scdgm.pipelines.cluster import ray_session
from scdgm.pipelines.config import apply_overrides, load_params
from scdgm.pipelines.io import read_counts, write_h5ad_atomic
from scdgm.pipelines.streaming import (
    SCALE_SECTION,
    evaluation_cells,
    scale_settings,
    streamed_counts,
    streamed_input,
    write_embedded,
    write_posterior_samples,
)

if TYPE_CHECKING:
    import anndata as ad

    from scdgm.chunked import H5adRows

logger = logging.getLogger(__name__)


class SampleSource(StrEnum):
    """Where `scdgm sample` draws latents from."""

    posterior = "posterior"
    prior = "prior"


def model_params(kind: str, config: dict[str, Any], overrides: Sequence[str] | None = None) -> dict[str, Any]:
    """Hyperparameters of model `kind`: the top-level seed, `train.common` (keys this model has), `train.<kind>`,
    then `key=value` overrides. A common key no model knows, or a model key or override this model lacks, is an
    error naming the valid keys."""
    section = config.get("train") or {}
    known = {f.name for f in dataclasses.fields(model_class(kind).Config)}
    common = dict(section.get("common") or {})
    if "seed" in config:
        common.setdefault("seed", config["seed"])
    everywhere = set().union(*({f.name for f in dataclasses.fields(model_class(k).Config)} for k in MODEL_KINDS))
    stray = sorted(set(common) - everywhere)
    if stray:
        raise ScdgmError(f"train.common: {', '.join(stray)} is not a hyperparameter of any model")
    params = {key: value for key, value in common.items() if key in known}
    params.update(section.get(kind) or {})
    params = apply_overrides(params, list(overrides or []))
    model_class(kind).from_params(params)  # fail on unknown keys or bad values before any data is read
    return params


def train_model(
    kind: str,
    adata: ad.AnnData,
    params: dict[str, Any],
    callbacks: Sequence[EpochCallback] = (),
    parallel: DataParallel | None = None,
) -> tuple[GenerativeModel, dict[str, float]]:
    """Fit a `kind` model with hyperparameters `params` on `adata` (obs['split'] train/validation, all cells
    without it) and evaluate it on the test split (all cells when there is none); returns (model, metrics).
    With `parallel` (a torch model only) its workers run the training loop, each on a shard of the cells."""
    model = create_model(kind, params)
    if parallel is not None:
        distributed.check_parallel_kind(kind)  # a TorchModel from here on
        model.data_parallel = parallel
    history = model.fit(adata, callbacks)
    return model, evaluated(model, history, adata)


def train_model_streamed(
    kind: str,
    rows: H5adRows,
    config: dict[str, Any],
    params: dict[str, Any],
    callbacks: Sequence[EpochCallback] = (),
    parallel: DataParallel | None = None,
) -> tuple[GenerativeModel, dict[str, float]]:
    """`train_model` for a file larger than memory: trained on its counts streamed `scale.chunk_cells` cells at a
    time (with `parallel`, each worker reads its shard from the file), evaluated on a seeded subset of its test and
    training cells read alone (`evaluation_cells`)."""
    model = create_model(kind, params)
    if parallel is not None:
        distributed.check_parallel_kind(kind)
        model.data_parallel = parallel
    history = model.fit_streamed(streamed_counts(rows, config), rows.obs, callbacks)
    return model, evaluated(model, history, evaluation_cells(rows, config, int(params.get("seed", 0))))


def evaluated(model: GenerativeModel, history: TrainingHistory, adata: ad.AnnData) -> dict[str, float]:
    """The metrics of a fitted model: held-out ones on the test cells of `adata` (all cells without a test split),
    the best epoch's losses and how training went; kept in the model's metadata."""
    split = "test" if split_mask(adata, "test").any() else None
    if split is None and "split" in adata.obs:
        logger.warning("obs['split'] has no 'test' cells: evaluating on all cells")
    metrics = model.evaluate(adata, split)
    if history.epochs and history.best_epoch >= 0:
        best = history.epochs[history.best_epoch]
        metrics.update({k: float(v) for k, v in best.items() if k.startswith(("train_", "validation_"))})
    metrics.update(
        training_seconds=float(history.seconds),
        best_epoch=float(history.best_epoch),
        epochs=float(len(history.epochs)),
        stopped_early=float(history.stopped_early),
    )
    model.metadata["metrics"] = metrics
    return metrics


def check_model_dir_target(out: Path, overwrite: bool = False) -> None:
    """`out` may be written when absent or an empty folder; an earlier model directory only with `overwrite`
    (it is replaced whole, explanation and all); anything else never."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not is_model_directory(out):
        raise ScdgmError(f"{out} exists and is not a model directory; not overwriting it")
    if not overwrite:
        extra = sorted(p.name for p in out.iterdir() if p.name not in MODEL_FILES)
        holding = f" (with {', '.join(extra)})" if extra else ""
        raise ScdgmError(f"{out} already holds a model{holding}; pass --overwrite to replace it, or choose another --out")


def save_model_dir(
    model: GenerativeModel, metrics: dict[str, float], out: str | Path, *, overwrite: bool = False
) -> Path:
    """Write the model and metrics.json to `out` atomically: a hidden sibling folder renamed into place, so a
    failure leaves no `out` (and an earlier model there untouched). An earlier model directory is replaced
    whole only with `overwrite`; any other non-empty `out` is refused."""
    out = Path(out)
    check_model_dir_target(out, overwrite)
    with atomic_path(out, directory=True) as staging:
        model.save(staging)
        write_json_atomic(staging / METRICS_FILE, metrics)
    return out


def _load(model: Path) -> GenerativeModel:
    if not model.is_dir():
        raise InputError(f"model directory not found: {model}")
    return load_model(str(model))


TAG_WORKERS = "scdgm.workers"
"""Tag of a training run trained data-parallel (`--workers N`): the number of workers."""
TAG_NODES = "ray.node_ids"
"""Tag of such a run: the Ray node id of each worker, by rank, comma-separated."""
SWEEP_PARAMS = "best_params.yaml"
"""The file in a sweep's --out folder with each family's best hyperparameters, budget and the champion."""


def sweep_family(sweep: Path, model: str) -> tuple[str, Path]:
    """(model kind, params file) for training from the sweep folder `sweep`: `model` is a family it tuned or
    `champion`, the family its comparison picked."""
    path = sweep / SWEEP_PARAMS
    if not path.is_file():
        raise InputError(f"{sweep}: no {SWEEP_PARAMS}; run `scdgm tune --out {sweep}` first")
    document = read_params_file(path)
    swept = sorted(document.get("train") or {})
    kind = document.get("champion") if model == CHAMPION else model
    if kind is None:
        raise ScdgmError(f"{sweep}: the sweep picked no champion (its comparison.md says why); "
                         f"pass --model with one of the families it tuned: {', '.join(swept)}")
    if kind not in swept:
        raise ScdgmError(f"{sweep}: the sweep did not tune {kind}; it tuned {', '.join(swept) or 'nothing'}")
    return kind, path


def train_command(
    model: Annotated[str, typer.Option("--model", help="Model kind: ae, vae, ldvae, gan, dbm or pca; with --sweep also champion.")],
    data: Annotated[Path, typer.Option("--data", help="Prepared cells (.h5ad) with obs['split'].")],
    out: Annotated[Path, typer.Option("--out", help="Model directory to write (with metrics.json).")],
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a hyperparameter, e.g. --set n_latent=5; scale.KEY=VALUE sets params.yaml's scale section (streaming).")
    ] = None,
    params: Annotated[Path | None, typer.Option("--params", help="params.yaml to read (the project's by default).")] = None,
    sweep: Annotated[Path | None, typer.Option("--sweep", help="A `scdgm tune` output folder: train its best configuration of --model (or of its champion) with the sweep's epoch budget.")] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a model already in --out (with everything in its folder).")
    ] = False,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Train one model data-parallel on this many Ray Train workers (gloo on CPUs, NCCL on GPUs), each on its shard of the training cells; batch_size stays the cells of one update over all workers.")] = None,
    address: Annotated[str | None, typer.Option("--address", help="With --workers: the Ray cluster to train on (HOST:PORT, or 'auto'); default: a private Ray on this machine.")] = None,
    gpus_per_worker: Annotated[int, typer.Option("--gpus-per-worker", min=0, max=1, help="With --workers: 1 gives each worker a GPU of its own (NCCL); 0 trains on CPUs (gloo).")] = 0,
) -> None:
    """Train a model on prepared cells, evaluate it on the test split and save it with its metrics."""
    if workers is None and (address is not None or gpus_per_worker):
        raise InputError("--address and --gpus-per-worker go with --workers N (the number of data-parallel workers)")
    if params is not None and not params.is_file():
        raise ScdgmError(f"params file not found: {params}")
    if sweep is not None:
        if params is not None:
            raise InputError("--sweep and --params exclude each other: --sweep reads the sweep's best_params.yaml")
        model, params = sweep_family(sweep, model)
    elif model == CHAMPION:
        raise InputError("--model champion needs --sweep (the `scdgm tune` output folder whose champion to train)")
    scale = [o for o in overrides or [] if o.startswith(f"{SCALE_SECTION}.")]  # the params.yaml section, not the model's
    config = apply_overrides(load_params(params), scale)
    hyperparameters = model_params(model, config, [o for o in overrides or [] if o not in scale])
    parallel = None if workers is None else distributed.data_parallel(model, workers, address, gpus_per_worker)
    check_model_dir_target(out, overwrite)
    rows = streamed_input(data, config)
    adata = read_counts(data) if rows is None else None
    n_cells, n_genes = adata.shape if rows is None else rows.shape
    lineage = tracking.dataset_lineage(data, n_cells, n_genes)
    tags = {} if workers is None else {TAG_WORKERS: str(workers)}
    with ray_session(address) if parallel else nullcontext():
        if parallel is not None:
            parallel.check_resources()  # before the run opens: a request the cluster cannot place leaves no run
        with tracking.training_run(model, hyperparameters, lineage, tracking.experiment_name(config), out.name,
                                   tags=tags) as run:
            if rows is None:
                fitted, metrics = train_model(model, adata, hyperparameters, [run.epoch_callback], parallel)
            else:
                fitted, metrics = train_model_streamed(model, rows, config, hyperparameters, [run.epoch_callback],
                                                       parallel)
            if parallel is not None:
                run.client.set_tag(run.run_id, TAG_NODES, ",".join(parallel.nodes))
            save_model_dir(fitted, metrics, out, overwrite=overwrite)
            run.finish(out, metrics)
    shown = {k: metrics[k] for k in ("best_epoch", "training_seconds", "nll_elbo", "knn_accuracy") if k in metrics}
    placed = "" if parallel is None else f" by {workers} workers on {len(set(parallel.nodes))} node(s)"
    streamed = "" if rows is None else " (streamed from disk)"
    typer.echo(f"wrote {out}: {model} on {n_cells} cells{placed}{streamed}; " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))


def embed_command(
    model: Annotated[Path, typer.Option("--model", help="Model directory written by `scdgm train`.")],
    data: Annotated[Path, typer.Option("--data", help="Cells (.h5ad) with the model's genes.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the cells with obsm['X_scdgm'] (.h5ad).")],
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a parameter, e.g. --set scale.chunk_cells=20000.")
    ] = None,
) -> None:
    """Embed cells: latent means in obsm['X_scdgm'], their variances in obsm['X_scdgm_var']."""
    config = apply_overrides(load_params(None), overrides)
    scale_settings(config)  # bad settings before any work
    fitted = _load(model)
    rows = streamed_input(data, config)
    uns = {"model": str(model), "kind": fitted.kind, "n_latent": fitted.n_latent}
    if rows is not None:  # larger than memory: embedded chunk by chunk, written into a copy of the input
        counts = streamed_counts(rows, config, fitted.genes)
        counts.validate(rows.obs.index)
        embedding = fitted.embed_counts(counts, fitted.batch_labels(rows.obs))
        write_embedded(data, out, embedding, uns)
        typer.echo(f"wrote {out}: {rows.n_cells} cells embedded in {fitted.n_latent} dimensions by {fitted.kind} "
                   "(streamed from disk)")
        return
    adata = read_counts(data)
    embedding = fitted.embed(adata)
    adata.obsm["X_scdgm"] = embedding.mean
    adata.obsm["X_scdgm_var"] = embedding.var
    adata.uns["scdgm_embed"] = uns
    write_h5ad_atomic(adata, out)
    typer.echo(f"wrote {out}: {adata.n_obs} cells embedded in {fitted.n_latent} dimensions by {fitted.kind}")


def sample_command(
    model: Annotated[Path, typer.Option("--model", help="Model directory written by `scdgm train`.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the synthetic cells (.h5ad).")],
    source: Annotated[SampleSource, typer.Option(help="posterior: draws for the cells of --data; prior: new cells.")]
    = SampleSource.posterior,
    data: Annotated[Path | None, typer.Option("--data", help="Cells (.h5ad) to draw posterior samples for.")] = None,
    n: Annotated[int | None, typer.Option("--n", min=1, help="Prior samples to draw (default: cells of --data).")] = None,
    draws: Annotated[int, typer.Option(min=1, help="Posterior draws per cell.")] = 1,
    seed: Annotated[int | None, typer.Option(help="Random seed (default: the model's).")] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a parameter, e.g. --set scale.chunk_cells=20000.")
    ] = None,
) -> None:
    """Draw synthetic cells from a trained model (counts in .X, latents in obsm['X_scdgm'])."""
    if source is SampleSource.posterior and data is None:
        raise InputError("posterior sampling needs the cells to draw for: pass --data")
    if source is SampleSource.prior and n is None and data is None:
        raise InputError("prior sampling needs the number of cells: pass --n")
    config = apply_overrides(load_params(None), overrides)
    scale_settings(config)  # bad settings before any work
    fitted = _load(model)
    rows = streamed_input(data, config) if data is not None and source is SampleSource.posterior else None
    if rows is not None:  # larger than memory: drawn and written chunk by chunk
        counts = streamed_counts(rows, config, fitted.genes)
        counts.validate(rows.obs.index)
        uns = {"source": "posterior", "model": str(model), "kind": fitted.kind, **({} if seed is None else {"seed": seed})}
        written = write_posterior_samples(out, fitted, counts, rows.obs, draws, seed, uns)
        typer.echo(f"wrote {out}: {written} posterior samples from {fitted.kind} (streamed from disk)")
        return
    adata = read_counts(data) if data is not None else None
    if source is SampleSource.prior:
        samples = fitted.sample(n=n or adata.n_obs, source="prior", seed=seed)
    else:
        samples = fitted.sample(adata, source="posterior", draws=draws, seed=seed)
    synthetic = samples.to_anndata(fitted.genes, obs=adata.obs if source is SampleSource.posterior else None)
    synthetic.uns["scdgm_sample"].update({"model": str(model), "kind": fitted.kind})
    if seed is not None:
        synthetic.uns["scdgm_sample"]["seed"] = seed
    write_h5ad_atomic(synthetic, out)
    typer.echo(f"wrote {out}: {synthetic.n_obs} {source.value} samples from {fitted.kind}")
