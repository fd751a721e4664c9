"""Benchmark of the log-linear engine; prints JSON.

Selects 8 of 2,000 binary genes against 10 binary latents on 7,500 synthetic draws, compares the time with fitting
every table on its own (Poisson GLM and IPF, timed on a sample of tables at each step and extrapolated to all
candidates × latents), and times 1,000 max-statistic permutations of a step.
Run: python bench/loglinear.py [--samples 7500 --genes 2000 --latents 10 --select 8 --permutations 1000]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import numpy as np
import scipy.sparse as sp

from scdgm.interpret.loglinear import LogLinearProblem, step_test, stepwise_select
from scdgm.interpret.reference import contingency_table, glm_deviance, ipf_deviance


def synthetic_draws(n: int, p: int, q: int, factors: int = 5, seed: int = 0) -> tuple[sp.csr_matrix, np.ndarray]:
    """Sparse binary genes and binary latents driven by a few shared factors (like decoder draws of a VAE)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, factors))
    loadings = rng.normal(size=(factors, p)) * rng.binomial(1, 0.3, size=(factors, p))
    logits = rng.normal(-1.5, 0.8, size=p) + z @ loadings
    x = sp.csr_matrix((rng.random((n, p)) < 1 / (1 + np.exp(-logits))).astype(np.uint8))
    h = (z @ rng.normal(size=(factors, q)) + rng.normal(size=(n, q)) > 0).astype(np.uint8)
    return x, h


def per_table_seconds(x: Any, h: np.ndarray, selected: list[int], tables: int, rng: np.random.Generator,
                      problem: LogLinearProblem) -> dict[str, Any]:
    """Mean seconds per table for the GLM and IPF fits on random candidates × latents, and their largest
    relative difference from the closed form."""
    fast = problem.g2(selected)
    candidates = np.setdiff1d(np.arange(x.shape[1]), selected)
    pairs = [(int(rng.choice(candidates)), int(rng.integers(h.shape[1]))) for _ in range(tables)]
    result: dict[str, Any] = {}
    for name, deviance in (("glm", glm_deviance), ("ipf", ipf_deviance)):
        start = time.perf_counter()
        values = [deviance(contingency_table(x, h, selected, gene, latent), "conditional") for gene, latent in pairs]
        result[f"{name}_seconds_per_table"] = (time.perf_counter() - start) / tables
        expected = np.array([fast[gene, latent] for gene, latent in pairs])
        result[f"{name}_max_relative_difference"] = float(
            np.max(np.abs(np.array(values) - expected) / np.maximum(np.abs(expected), 1e-12)))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=7500)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--latents", type=int, default=10)
    parser.add_argument("--select", type=int, default=8)
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--last-step-permutations", type=int, default=50,
                        help="permutations timed at the last step, extrapolated to --permutations")
    parser.add_argument("--reference-tables", type=int, default=5, help="tables fitted per step by GLM and IPF")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    x, h = synthetic_draws(args.samples, args.genes, args.latents)
    report: dict[str, Any] = {
        "samples": args.samples, "genes": args.genes, "latents": args.latents, "selected": args.select,
        "gene_density": round(x.nnz / (x.shape[0] * x.shape[1]), 4), "device": args.device,
        "cpu_cores": os.cpu_count(), "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
    }
    for input_format, data in (("sparse", x), ("dense", x.toarray())):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            selection = stepwise_select(data, h, args.select, device=args.device)
            times.append(time.perf_counter() - start)
        report[f"select_seconds_{input_format}_input"] = {"median": statistics.median(times), "min": min(times)}
    report["selected_genes"] = selection.genes
    fast_seconds = report["select_seconds_sparse_input"]["median"]

    problem = LogLinearProblem(x, h, device=args.device)
    rng = np.random.default_rng(1)
    dense = x.toarray()  # tables are cut from dense columns, so the fits dominate the per-table time
    steps = [per_table_seconds(dense, h, selection.genes[:k], args.reference_tables, rng, problem)
             for k in range(args.select)]
    tables_per_step = [(args.genes - k) * args.latents for k in range(args.select)]
    for name in ("glm", "ipf"):
        per_table = [step[f"{name}_seconds_per_table"] for step in steps]
        total = sum(seconds * count for seconds, count in zip(per_table, tables_per_step, strict=True))
        report[name] = {
            "method": f"{args.reference_tables} random tables fitted per step, mean time per table extrapolated "
                      f"to all {sum(tables_per_step)} tables of the {args.select} steps",
            "seconds_per_table_by_step": [round(seconds, 5) for seconds in per_table],
            "extrapolated_seconds": round(total, 1),
            "ratio_to_closed_form": round(total / fast_seconds, 1),
            "max_relative_difference_to_closed_form": max(step[f"{name}_max_relative_difference"] for step in steps),
        }

    start = time.perf_counter()
    first = step_test(problem, [], args.permutations, seed=0, n_jobs=args.n_jobs)
    report["permutations_first_step"] = {
        "permutations": args.permutations, "n_jobs": args.n_jobs,
        "seconds": round(time.perf_counter() - start, 2), "pvalue": first.pvalue,
    }
    last = selection.genes[:-1]
    start = time.perf_counter()
    step_test(problem, last, args.last_step_permutations, seed=0, n_jobs=args.n_jobs)
    seconds = time.perf_counter() - start
    report["permutations_last_step"] = {
        "selected_before": len(last), "observed_strata": problem.n_strata(last),
        "permutations_timed": args.last_step_permutations, "seconds_timed": round(seconds, 2),
        "extrapolated_seconds_for": args.permutations,
        "extrapolated_seconds": round(seconds * args.permutations / args.last_step_permutations, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
