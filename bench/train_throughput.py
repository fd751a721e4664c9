"""Training and embedding throughput of the VAE and LDVAE, printed as JSON.

Measures training cells/s (n_hidden 128, n_latent 10, one hidden layer, NB, batch 128) on simulated 10k cells
x 2,000 genes with 2 CPU threads, over a few epochs after a warm-up epoch, through the real `fit` loop; the
time per epoch and peak RSS at 1k, 10k and 100k cells (each size in its own process, so RSS is its own);
embedding cells/s; and, when a GPU is present, training cells/s on CUDA at batch 128 and 1024.

    python bench/train_throughput.py            # everything (a few minutes on 2 cores)
    python bench/train_throughput.py --sizes 1000,10000 --epochs 2
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Idle OpenMP threads sleep instead of spinning (read when torch loads, so set before it is imported): on a
# machine whose cores other processes share, spinning made 2-thread training up to 50 times slower here.
# Set OMP_WAIT_POLICY=ACTIVE to measure the spinning default on a dedicated machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TARGETS = {"train_cells_per_s": 5000, "embed_cells_per_s": 50000}
ARCHITECTURE = {"n_hidden": 128, "n_latent": 10, "n_layers": 1, "likelihood": "nb", "progress": False}


def measure(kind: str, n_cells: int, n_genes: int, epochs: int, threads: int, device: str, batch_size: int) -> dict:
    """Train `kind` for 1 warm-up + `epochs` epochs on simulated cells; time the epochs after the warm-up."""
    import torch

    from scdgm.models import create_model
    from scdgm.pipelines.simulate import simulate_programs

    torch.set_num_threads(threads)
    adata = simulate_programs(n_cells, n_genes, seed=0)
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
        "device": device,
        "cells": n_cells,
        "genes": n_genes,
        "batch_size": batch_size,
        "threads": threads,
        "seconds_per_epoch": round(seconds, 3),
        "cpu_seconds_per_epoch": round(cpu_seconds, 3),
        "train_cells_per_s": round(steps * batch_size / seconds),
        "first_epoch_seconds": round(stamps[0][0] - started, 3),
        "embed_cells_per_s": round(n_cells / embed_seconds),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def run_isolated(**settings: object) -> dict:
    """`measure` in a fresh interpreter, so peak RSS and thread settings belong to this measurement alone."""
    command = [sys.executable, __file__, "--worker", json.dumps(settings)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"benchmark worker failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000", help="cell counts of the scaling runs")
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after the warm-up epoch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(**json.loads(args.worker))))
        return

    import torch

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
        "torch": torch.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
