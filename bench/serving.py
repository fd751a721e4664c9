"""Serving speed: `scdgm serve` against `mlflow models serve --env-manager local` of the same model, printed
as JSON.

Measures (a) the latency of a one-cell /v1/explain (one client, back to back; p50/p99) against a one-cell
/invocations of the pyfunc with the explanation attached (latents + pattern + label), and (b) embedding
throughput with 1,000-cell batches (cells/s; /v1/embed as sparse CSR and as dense JSON) against /invocations
of the pyfunc without the explanation (latents only, dense `dataframe_split`). Both servers run with the same
worker count (default 2, one per core of a 2-core machine) on the same machine; `--server-cpus 0,1` pins them
(and not the load generator) to those cores. Every figure also carries the server's CPU time per request
(all its processes), which stays meaningful when other jobs share the machine.

The model is an LDVAE on simulated cells × 2,000 genes (the size of PBMC 3k after HVG selection), explained
with the log-linear method, or any served model given by --model-uri.

    python bench/serving.py                          # ~2-3 minutes on 2 cores
    python bench/serving.py --model-uri models:/pbmc3k-ldvae@champion --seconds 20
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from scdgm.serving.loadgen import free_port, run_load, wait_until_ready

HOST = "127.0.0.1"
TARGETS = {"explain_p50_ms": 20.0, "explain_p99_ms": 100.0, "embed_cells_per_s": 20000.0}


def build_model(folder: Path, n_cells: int, n_genes: int) -> Path:
    """Train and explain a benchmark LDVAE (10 latents, 128 hidden) on simulated counts."""
    import torch

    from scdgm.interpret.explain import run_explanation
    from scdgm.pipelines.prepare import prepare
    from scdgm.pipelines.simulate import simulate_programs
    from scdgm.pipelines.train import save_model_dir, train_model

    torch.set_num_threads(2)
    raw = simulate_programs(n_cells, n_genes + 500, seed=0)
    data = prepare(raw, {"min_genes": 5, "max_genes": None, "min_cells": 3, "n_top_genes": n_genes}, label_key="cell_type")
    model, metrics = train_model("ldvae", data, {"max_epochs": 10, "progress": False, "device": "cpu", "n_importance": 5})
    directory = save_model_dir(model, metrics, folder / "ldvae")
    run_explanation(model, data, directory / "explanation", permutations=20, plots=False)
    data.write_h5ad(folder / "cells.h5ad")
    return directory


def log_pyfuncs(model_dir: Path, folder: Path) -> tuple[str, dict[str, str]]:
    """Log the model with and without its explanation as pyfuncs in a fresh SQLite store."""
    import mlflow

    from scdgm.pipelines.pyfunc import log_pyfunc

    store = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    mlflow.set_experiment("serving-bench")
    bare = folder / "bare"
    shutil.copytree(model_dir, bare, ignore=shutil.ignore_patterns("explanation"))
    with mlflow.start_run():
        uris = {"explained": log_pyfunc(model_dir, "explained"), "bare": log_pyfunc(bare, "bare")}
    return store, uris


def start(command: list[str], log: Path, env: dict[str, str], cpus: str | None) -> subprocess.Popen:
    prefix = ["taskset", "-c", cpus] if cpus else []
    return subprocess.Popen(prefix + command, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def server_cpu_seconds(process: subprocess.Popen) -> float:
    """User + system CPU seconds used so far by a server process and all its children (workers)."""
    import psutil

    root = psutil.Process(process.pid)
    total = 0.0
    for member in [root, *root.children(recursive=True)]:
        try:
            times = member.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def measure(process: subprocess.Popen, port: int, path: str, body: bytes, clients: int, seconds: float,
            items: int = 1) -> dict[str, float]:
    """Closed-loop load on one endpoint: latency, throughput, and the server's CPU time per request, which
    stays meaningful when other jobs share the machine (cells per server CPU-second)."""
    before = server_cpu_seconds(process)
    result = run_load(HOST, port, path, body, {"Content-Type": "application/json"}, clients, seconds)
    used = server_cpu_seconds(process) - before
    summary = result.summary(items)
    summary["server_cpu_ms_per_request"] = round(1000 * used / max(result.requests, 1), 2)
    summary["items_per_server_cpu_s"] = round(result.requests * items / used, 1) if used else float("nan")
    return summary


def requests_for(cells) -> dict[str, bytes]:  # noqa: ANN001 - AnnData, imported lazily
    """Request bodies: one cell and a batch, in our dense and sparse forms and MLflow's dataframe_split."""
    import numpy as np
    import scipy.sparse as sp

    genes = [str(g) for g in cells.var_names]
    counts = sp.csr_matrix(cells.layers.get("counts", cells.X))
    one = counts[:1].toarray().astype(np.int64).tolist()
    batch = counts.toarray().astype(np.int64).tolist()
    return {
        "ours_one": json.dumps({"genes": genes, "counts": one}).encode(),
        "ours_dense": json.dumps({"genes": genes, "counts": batch}).encode(),
        "ours_sparse": json.dumps({"genes": genes, "shape": list(counts.shape), "indices": counts.indices.tolist(),
                                   "indptr": counts.indptr.tolist(), "data": counts.data.astype(int).tolist()}).encode(),
        "mlflow_one": json.dumps({"dataframe_split": {"columns": genes, "data": one}}).encode(),
        "mlflow_batch": json.dumps({"dataframe_split": {"columns": genes, "data": batch}}).encode(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", help="Serve this model instead of training a benchmark LDVAE.")
    parser.add_argument("--data", help="Cells to send (.h5ad); the benchmark's simulated cells by default.")
    parser.add_argument("--batch", type=int, default=1000, help="Cells per embedding request.")
    parser.add_argument("--seconds", type=float, default=10.0, help="Duration of each measurement.")
    parser.add_argument("--workers", type=int, default=2, help="Worker processes of both servers.")
    parser.add_argument("--clients", type=int, default=2, help="Concurrent clients for the embedding batches.")
    parser.add_argument("--server-cpus", help="Pin both servers to these cores (taskset list, e.g. 0,1).")
    parser.add_argument("--skip-mlflow", action="store_true", help="Measure our server only.")
    args = parser.parse_args()
    if args.model_uri and not args.data:
        parser.error("--data is needed with --model-uri")

    import anndata as ad
    import scipy.sparse as sp

    from scdgm.models import load_model

    folder = Path(tempfile.mkdtemp(prefix="scdgm-bench-serving-"))
    venv_bin = str(Path(sys.executable).parent)  # `mlflow models serve` runs `uvicorn` from PATH
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    processes: list[subprocess.Popen] = []
    try:
        if args.model_uri:
            from scdgm.serving.resolve import resolve_model

            model_dir = resolve_model(args.model_uri).directory
        else:
            model_dir = build_model(folder, n_cells=3000, n_genes=2000)
        cells = ad.read_h5ad(args.data or folder / "cells.h5ad")
        cells = cells[:, [g for g in load_model(model_dir).genes if g in set(cells.var_names)]]
        cells = cells[: args.batch].copy()
        bodies = requests_for(cells)
        results: dict[str, object] = {
            "cpu_count": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
            "server_cpus": args.server_cpus, "workers": args.workers, "batch_cells": cells.n_obs,
            "genes": cells.n_vars, "stored_values_per_batch": int(sp.csr_matrix(cells.X).nnz),
            "seconds_per_measurement": args.seconds, "request_mb": {k: round(len(v) / 2**20, 2) for k, v in bodies.items()},
        }

        port = free_port()
        ours = start([sys.executable, "-c", "from scdgm.pipelines.cli import main; main()", "serve", "--model-uri",
                      str(model_dir), "--port", str(port), "--workers", str(args.workers), "--max-cells",
                      str(max(cells.n_obs, 10_000)), "--max-body-mb", "512"], folder / "scdgm.log", env, args.server_cpus)
        processes.append(ours)
        results["scdgm_ready_s"] = round(wait_until_ready(HOST, port, "/ready", ours), 1)
        measure(ours, port, "/v1/explain", bodies["ours_one"], 1, 1.0)  # warm-up
        scdgm = {
            "explain_one_cell": measure(ours, port, "/v1/explain", bodies["ours_one"], 1, args.seconds),
            "embed_sparse": measure(ours, port, "/v1/embed", bodies["ours_sparse"], args.clients, args.seconds, cells.n_obs),
            "embed_dense": measure(ours, port, "/v1/embed", bodies["ours_dense"], args.clients, args.seconds, cells.n_obs),
            "explain_one_cell_16_clients": measure(ours, port, "/v1/explain", bodies["ours_one"], 16, args.seconds),
        }
        results["scdgm"] = scdgm
        stop(ours)

        if not args.skip_mlflow:
            store, uris = log_pyfuncs(model_dir, folder)
            env["MLFLOW_TRACKING_URI"] = store
            mlflow_results: dict[str, object] = {}
            for variant, body_key, clients, name in (("explained", "mlflow_one", 1, "invocations_one_cell_explained"),
                                                     ("bare", "mlflow_batch", args.clients, "invocations_batch_latents")):
                port = free_port()
                server = start([str(Path(venv_bin) / "mlflow"), "models", "serve", "-m", uris[variant],
                                "--env-manager", "local", "-h", HOST, "-p", str(port), "-w", str(args.workers)],
                               folder / f"mlflow-{variant}.log", env, args.server_cpus)
                processes.append(server)
                mlflow_results[f"{variant}_ready_s"] = round(wait_until_ready(HOST, port, "/ping", server, 300), 1)
                measure(server, port, "/invocations", bodies[body_key], 1, 1.0)
                items = 1 if body_key == "mlflow_one" else cells.n_obs
                mlflow_results[name] = measure(server, port, "/invocations", bodies[body_key], clients, args.seconds, items)
                stop(server)
            results["mlflow"] = mlflow_results
            explain_mlflow = mlflow_results["invocations_one_cell_explained"]
            embed_mlflow = mlflow_results["invocations_batch_latents"]
            results["scdgm_vs_mlflow"] = {
                "explain_p50_speedup": round(explain_mlflow["p50_ms"] / scdgm["explain_one_cell"]["p50_ms"], 1),
                "embed_cells_per_s_ratio_sparse": round(scdgm["embed_sparse"]["items_per_s"] / embed_mlflow["items_per_s"], 1),
                "embed_cells_per_s_ratio_dense": round(scdgm["embed_dense"]["items_per_s"] / embed_mlflow["items_per_s"], 1),
            }
        results["targets"] = TARGETS
        results["meets_targets"] = {
            "explain_p50": scdgm["explain_one_cell"]["p50_ms"] < TARGETS["explain_p50_ms"],
            "explain_p99": scdgm["explain_one_cell"]["p99_ms"] < TARGETS["explain_p99_ms"],
            "embed_sparse": scdgm["embed_sparse"]["items_per_s"] >= TARGETS["embed_cells_per_s"],
        }
        print(json.dumps(results, indent=2))
    except (RuntimeError, TimeoutError):
        for log in sorted(folder.glob("*.log")):
            print(f"--- {log.name} (last lines)\n" + "\n".join(log.read_text().splitlines()[-15:]), file=sys.stderr)
        raise
    finally:
        for process in processes:
            if process.poll() is None:
                stop(process)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
