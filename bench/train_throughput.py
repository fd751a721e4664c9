"""Training and embedding throughput of the VAE and LDVAE, printed as JSON.

Measures training cells/s (n_hidden 128, n_latent 10, one hidden layer, NB, batch 128) on simulated 10k cells
x 2,000 genes with 2 CPU threads, over a few epochs after a warm-up epoch, through the real `fit` loop; the
time per epoch and peak RSS at 1k, 10k and 100k cells (each size in its own process, so RSS is its own);
embedding cells/s; and, when a GPU is present, training cells/s on CUDA at batch 128 and 1024.

With `--baseline DIR` (a folder holding the `models` package of other code, e.g. the last commit's:
`mkdir -p /tmp/base && git archive HEAD models | tar -x -C /tmp/base`; for the first round's code, which issue 13
measured, `git archive 9bd3a00 models pipelines/__init__.py pipelines/errors.py`), it also compares that code with this
checkout side by side on the PBMC 3k shape, 2,638 cells x 2,000 genes (the PBMC 3k counts by default, downloaded
once and cached; or simulated ones), runs alternating: training cells/s (per second, and per CPU second, which
other load on a shared machine disturbs less), the first epoch (the first optimizer step included), whether
torch._dynamo got imported, and the held-out ELBO of a few seeded fits on simulated cells with a test split. A
plain-torch loop of the same shape (nn.Linear layers, NB log-likelihood from lgamma, torch.optim.Adam) is timed
for reference.

    python bench/train_throughput.py            # everything (a few minutes on 2 cores)
    python bench/train_throughput.py --sizes 1000,10000 --epochs 2
    python bench/train_throughput.py --baseline /tmp/base --only-compare
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import anndata as ad

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Idle OpenMP threads sleep instead of spinning (read when torch loads, so set before it is imported): on a
# machine whose cores other processes share, spinning made 2-thread training up to 50 times slower here.
# Set OMP_WAIT_POLICY=ACTIVE to measure the spinning default on a dedicated machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TARGETS = {"train_cells_per_s": 5000, "embed_cells_per_s": 50000}
ARCHITECTURE = {"n_hidden": 128, "n_latent": 10, "n_layers": 1, "likelihood": "nb", "progress": False}
PBMC_SHAPE = (2638, 2000)
"""Cells x genes of PBMC 3k after quality control and the 2,000 most variable genes."""


def first_round(baseline: str | None) -> bool:
    """Whether `baseline` holds the first round's layout (9bd3a00): a top-level `models` package."""
    return baseline is not None and "from models." in (Path(baseline) / "models" / "__init__.py").read_text()


def use_models(baseline: str | None) -> None:
    """Import `scdgm.models` from `baseline` (a folder holding a `models` package) instead of this checkout. The
    first round's layout (a top-level `models` package importing `pipelines.errors`) is imported from the folder
    as it was and stands in for `scdgm.models`: it shares no module with this checkout, so it is swapped in after
    the data are made (by this checkout's simulators); a later layout is swapped in before anything is imported."""
    if baseline is None:
        return
    import scdgm

    folder = Path(baseline) / "models"
    if first_round(baseline):
        sys.path.insert(0, str(Path(baseline)))
        models = importlib.import_module("models")  # the baseline's own top-level package (and pipelines.errors)
        sys.modules["scdgm.models"] = models
        scdgm.models = models
        return
    spec = importlib.util.spec_from_file_location(
        "scdgm.models", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["scdgm.models"] = module
    scdgm.models = module
    spec.loader.exec_module(module)


def cells(data: str, n_cells: int, n_genes: int) -> ad.AnnData:
    """Simulated counts, or the PBMC 3k counts (downloaded once, then cached): its first `n_cells` cells and the
    `n_genes` genes of highest variance-to-mean ratio among those seen in 3 or more cells."""
    from scdgm.pipelines.fetch import load_pbmc3k
    from scdgm.pipelines.simulate import simulate_programs

    if data == "simulated":
        return simulate_programs(n_cells, n_genes, seed=0)
    adata = load_pbmc3k()[:n_cells]
    counts = adata.X.tocsc()
    seen = np.diff(counts.indptr) >= 3
    mean = np.asarray(counts.mean(axis=0)).ravel()
    variance = np.asarray(counts.multiply(counts).mean(axis=0)).ravel() - mean**2
    ratio = np.where(seen, variance / np.maximum(mean, 1e-12), -np.inf)
    return adata[:, np.sort(np.argsort(-ratio, kind="stable")[:n_genes])].copy()


def measure(
    kind: str,
    n_cells: int,
    n_genes: int,
    epochs: int,
    threads: int,
    device: str,
    batch_size: int,
    baseline: str | None = None,
    data: str = "simulated",
) -> dict:
    """Train `kind` for 1 warm-up + `epochs` epochs on `data` cells; time the epochs after the warm-up."""
    if not first_round(baseline):
        use_models(baseline)
    import torch

    torch.set_num_threads(threads)
    adata = cells(data, n_cells, n_genes)
    if first_round(baseline):
        use_models(baseline)
    from scdgm.models import create_model

    adata.obs["split"] = "train"  # every cell trains, no validation pass (as measured before)
    stamps: list[tuple[float, float]] = []
    params = {**ARCHITECTURE, "batch_size": batch_size, "max_epochs": epochs + 1, "patience": epochs + 1}
    model = create_model(kind, {**params, "device": device})
    started = time.perf_counter()
    model.fit(adata, callbacks=[lambda epoch, metrics: stamps.append((time.perf_counter(), time.process_time()))])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    trained = len(model.history.epochs) - 1
    steps = n_cells // batch_size  # the training batches drop the last partial batch
    seconds = (stamps[-1][0] - stamps[0][0]) / trained
    cpu_seconds = (stamps[-1][1] - stamps[0][1]) / trained
    embed_started = time.perf_counter()
    model.embed(adata)
    embed_seconds = time.perf_counter() - embed_started
    return {
        "model": kind,
        "code": "baseline" if baseline else "this checkout",
        "data": data,
        "device": device,
        "cells": n_cells,
        "genes": n_genes,
        "batch_size": batch_size,
        "threads": threads,
        "seconds_per_epoch": round(seconds, 4),
        "cpu_seconds_per_epoch": round(cpu_seconds, 4),
        "train_cells_per_s": round(steps * batch_size / seconds),
        "first_epoch_seconds": round(stamps[0][0] - started, 3),
        "dynamo_imported": "torch._dynamo" in sys.modules,
        "embed_cells_per_s": round(n_cells / embed_seconds),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def measure_quality(kind: str, seeds: list[int], epochs: int, threads: int, baseline: str | None = None) -> dict:
    """Held-out negative ELBO and marginal NLL (per cell) of seeded fits on simulated cells with a test split."""
    if not first_round(baseline):
        use_models(baseline)
    import numpy as np
    import torch

    from scdgm.pipelines.simulate import simulate_programs

    torch.set_num_threads(threads)
    adata = simulate_programs(2000, 500, seed=7)
    if first_round(baseline):
        use_models(baseline)
    from scdgm.models import create_model

    adata.obs["split"] = np.random.default_rng(7).choice(["train", "validation", "test"], 2000, p=[0.8, 0.1, 0.1])
    test = adata[adata.obs["split"] == "test"]
    elbo, marginal = [], []
    for seed in seeds:
        model = create_model(kind, {**ARCHITECTURE, "max_epochs": epochs, "seed": seed, "n_importance": 20})
        model.fit(adata)
        nll = model.heldout_nll(test)
        elbo.append(nll["nll_elbo"])
        marginal.append(nll["nll_marginal"])
    return {"code": "baseline" if baseline else "this checkout", "nll_elbo": elbo, "nll_marginal": marginal}


def measure_plain(n_cells: int, n_genes: int, steps: int, threads: int, batch_size: int) -> dict:
    """A plain-torch VAE loop of the same shape (no scdgm code): seconds per step after a warm-up."""
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    counts = torch.poisson(torch.rand(n_cells, n_genes) * 2.0)
    log_library = counts.sum(1).clamp_min(1.0).log()
    encoder = nn.Sequential(
        nn.Linear(n_genes, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 20)
    )
    decoder = nn.Sequential(nn.Linear(10, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, n_genes))
    log_theta = nn.Parameter(torch.zeros(n_genes))
    parameters = [*encoder.parameters(), *decoder.parameters(), log_theta]
    started = time.perf_counter()
    optimizer = torch.optim.Adam(parameters, lr=1e-3, eps=0.01, fused=True)  # imports torch._dynamo

    def step(index: torch.Tensor) -> None:
        x = counts[index]
        mean, raw = encoder(torch.log1p(x)).chunk(2, dim=-1)
        var = raw.exp() + 1e-4
        z = mean + var.sqrt() * torch.randn_like(mean)
        log_mu = torch.log_softmax(decoder(z), -1) + log_library[index, None]
        theta = log_theta.exp()
        log_theta_mu = torch.logaddexp(log_theta, log_mu)
        log_px = (
            theta * (log_theta - log_theta_mu)
            + x * (log_mu - log_theta_mu)
            + torch.lgamma(x + theta)
            - torch.lgamma(theta)
            - torch.lgamma(x + 1.0)
        ).sum(-1)
        kl = 0.5 * (var + mean**2 - 1.0 - var.log()).sum(-1)
        loss = (kl - log_px).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 10.0)
        optimizer.step()

    batches = torch.randperm(n_cells)[: steps * batch_size].view(steps, batch_size)
    step(batches[0])
    first = time.perf_counter() - started  # building the optimizer and the first step
    for index in batches:  # warm-up
        step(index)
    started = time.perf_counter()
    for index in batches:
        step(index)
    seconds = (time.perf_counter() - started) / steps
    return {
        "seconds_per_step": round(seconds, 5),
        "train_cells_per_s": round(batch_size / seconds),
        "first_step_seconds": round(first, 3),
        "dynamo_imported": "torch._dynamo" in sys.modules,
    }


def run_isolated(task: str = "measure", **settings: object) -> dict:
    """A measurement in a fresh interpreter, so peak RSS, imports and thread settings belong to it alone."""
    command = [sys.executable, __file__, "--worker", json.dumps({"task": task, **settings})]
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark worker failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout)


def compare(baseline: str, data: str, threads: int, epochs: int, repeats: int, quality_epochs: int) -> dict:
    """This checkout against `baseline` on the PBMC 3k shape: runs alternate, so both see the same load."""
    n_cells, n_genes = PBMC_SHAPE
    common = {"n_cells": n_cells, "n_genes": n_genes, "epochs": epochs, "threads": threads, "device": "cpu",
              "batch_size": 128, "data": data}
    result: dict = {"data": data, "cells": n_cells, "genes": n_genes, "threads": threads, "timed_epochs": epochs,
                    "repeats": repeats}
    for kind in ("vae", "ldvae"):
        runs: dict[str, list[dict]] = {"baseline": [], "this checkout": []}
        for _ in range(repeats):
            runs["baseline"].append(run_isolated(kind=kind, baseline=baseline, **common))
            runs["this checkout"].append(run_isolated(kind=kind, **common))
        rates = {code: [r["train_cells_per_s"] for r in rs] for code, rs in runs.items()}
        ratios = [new / old for old, new in zip(rates["baseline"], rates["this checkout"], strict=True)]
        steps = n_cells // 128 * 128
        cpu_rates = {code: [round(steps / r["cpu_seconds_per_epoch"]) for r in rs] for code, rs in runs.items()}
        result[kind] = {
            "train_cells_per_s": rates,
            "median_train_cells_per_s": {code: statistics.median(values) for code, values in rates.items()},
            "speedup_per_pair": [round(r, 3) for r in ratios],
            "median_speedup": round(statistics.median(ratios), 3),
            "train_cells_per_cpu_second": cpu_rates,
            "median_cpu_speedup": round(
                statistics.median(new / old for old, new in zip(*cpu_rates.values(), strict=True)), 3
            ),
            "first_epoch_seconds": {code: [r["first_epoch_seconds"] for r in rs] for code, rs in runs.items()},
            "dynamo_imported": {code: any(r["dynamo_imported"] for r in rs) for code, rs in runs.items()},
        }
    plain = run_isolated("plain", n_cells=n_cells, n_genes=n_genes, steps=n_cells // 128, threads=threads,
                         batch_size=128)
    result["plain_torch_loop"] = plain
    result["vae"]["seconds_per_step"] = {
        code: round(128 / value, 5) for code, value in result["vae"]["median_train_cells_per_s"].items()
    }
    seeds = [0, 1, 2]
    quality = {
        "data": "simulate_programs(2000 cells, 500 genes, seed 7), seeded 80/10/10 split, the test cells",
        "epochs": quality_epochs,
        "baseline": run_isolated("quality", kind="vae", seeds=seeds, epochs=quality_epochs, threads=threads,
                                 baseline=baseline),
        "this checkout": run_isolated("quality", kind="vae", seeds=seeds, epochs=quality_epochs, threads=threads),
    }
    for code in ("baseline", "this checkout"):
        values = quality[code]["nll_elbo"]
        quality[code]["mean_nll_elbo"] = round(statistics.mean(values), 3)
        quality[code]["sd_nll_elbo"] = round(statistics.stdev(values), 3)
    result["heldout_quality"] = quality
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000", help="cell counts of the scaling runs")
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after the warm-up epoch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline", help="folder holding the models package to compare with (see above)")
    parser.add_argument(
        "--compare-data", choices=["pbmc3k", "simulated"], default="pbmc3k",
        help="counts of the comparison: PBMC 3k (its 2,000 most variable genes) or simulated",
    )
    parser.add_argument("--compare-epochs", type=int, default=8, help="timed epochs of each comparison run")
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs per code in the comparison")
    parser.add_argument("--quality-epochs", type=int, default=60, help="epochs of the held-out ELBO fits")
    parser.add_argument("--only-compare", action="store_true", help="skip the headline, scaling and CUDA runs")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        settings = json.loads(args.worker)
        task = {"measure": measure, "quality": measure_quality, "plain": measure_plain}[settings.pop("task")]
        print(json.dumps(task(**settings)))
        return

    import torch

    report: dict = {}
    if not args.only_compare:
        common = {"n_genes": args.genes, "threads": args.threads}
        headline = {
            kind: run_isolated(kind=kind, n_cells=10_000, epochs=args.epochs, device="cpu", batch_size=128, **common)
            for kind in ("vae", "ldvae")
        }
        scaling = [
            run_isolated(kind=kind, n_cells=int(n), epochs=1, device="cpu", batch_size=128, **common)
            for n in args.sizes.split(",")
            for kind in ("vae", "ldvae")
        ]
        cuda = None
        if torch.cuda.is_available():
            cuda = [
                run_isolated(kind=kind, n_cells=10_000, epochs=args.epochs, device="cuda", batch_size=size, **common)
                for kind in ("vae", "ldvae")
                for size in (128, 1024)
            ]
        report = {
            "targets": TARGETS,
            "train_cells_per_s": {kind: r["train_cells_per_s"] for kind, r in headline.items()},
            "embed_cells_per_s": {kind: r["embed_cells_per_s"] for kind, r in headline.items()},
            "meets_targets": all(
                r["train_cells_per_s"] >= TARGETS["train_cells_per_s"]
                and r["embed_cells_per_s"] >= TARGETS["embed_cells_per_s"]
                for r in headline.values()
            ),
            "headline": headline,
            "scaling": scaling,
            "cuda": cuda,
        }
    if args.baseline:
        report["pbmc3k_shape_against_baseline"] = compare(
            args.baseline, args.compare_data, args.threads, args.compare_epochs, args.repeats, args.quality_epochs
        )
    report.update({
        "torch": torch.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
    })
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
