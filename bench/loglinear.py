"""Benchmark of the log-linear engine; prints JSON.

Selects 8 of 2,000 binary genes against 10 binary latents on 7,500 synthetic draws, compares the time with fitting
every table on its own (Poisson GLM and IPF, timed on a sample of tables at each step and extrapolated to all
candidates × latents), and times 1,000 max-statistic permutations at the first and the last step. With --baseline
(a copy of an earlier interpret/loglinear.py, kept outside the repository) the same permutations, same seed, are
timed with it too, side by side in the same run: time ratios, and whether p-values and null maxima agree.
Run: python bench/loglinear.py [--samples 7500 --genes 2000 --latents 10 --select 8 --permutations 1000]
     [--baseline /tmp/loglinear_before.py]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from types import ModuleType
from typing import Any

import numpy as np
import scipy.sparse as sp

from scdgm.interpret import loglinear
from scdgm.interpret.loglinear import LogLinearProblem, stepwise_select
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


def load_baseline(path: str) -> ModuleType:
    """An earlier copy of interpret/loglinear.py, imported from its file under its own module name."""
    spec = importlib.util.spec_from_file_location("loglinear_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def time_permutations(module: ModuleType, x: Any, h: np.ndarray, selected: list[int], permutations: int,
                      n_jobs: int, device: str) -> tuple[float, float, float, Any]:
    """Wall and CPU seconds (all threads: the work, whatever else runs on the machine) for one step's
    max-statistic permutation test (seed 0) with the given module, the 1-minute load average when it started,
    and its result."""
    problem = module.LogLinearProblem(x, h, device=device)
    problem.g2(selected)  # strata and observed G² outside the timing, as in a selection run
    load = round(os.getloadavg()[0], 2)
    start, cpu = time.perf_counter(), time.process_time()
    result = module.step_test(problem, selected, permutations, seed=0, n_jobs=n_jobs)
    return time.perf_counter() - start, time.process_time() - cpu, load, result


def compare_permutations(x: Any, h: np.ndarray, selected: list[int], args: argparse.Namespace,
                         baseline: ModuleType | None) -> dict[str, Any]:
    """Time the permutations of the step after `selected`, and with a baseline the same ones with it."""
    seconds, cpu, load, result = time_permutations(loglinear, x, h, selected, args.permutations, args.n_jobs,
                                                   args.device)
    entry: dict[str, Any] = {
        "step": len(selected) + 1, "selected_before": len(selected),
        "observed_strata": loglinear.LogLinearProblem(x, h).n_strata(selected),
        "permutations": args.permutations, "n_jobs": args.n_jobs, "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu, 2), "load_average": load, "pvalue": result.pvalue,
        "null_max": float(result.null.max()),
    }
    if baseline is not None:
        before, before_cpu, before_load, reference = time_permutations(baseline, x, h, selected, args.permutations,
                                                                       args.n_jobs, args.device)
        entry.update({
            "baseline_seconds": round(before, 2),
            "baseline_cpu_seconds": round(before_cpu, 2),
            "baseline_load_average": before_load,
            "speedup": round(before / seconds, 2),
            "cpu_speedup": round(before_cpu / cpu, 2),
            "baseline_pvalue": reference.pvalue,
            "pvalue_equal": result.pvalue == reference.pvalue,
            "null_max_relative_difference": float(np.max(np.abs(result.null - reference.null)
                                                         / np.abs(reference.null))),
            "null_bit_identical": bool(np.array_equal(result.null, reference.null)),
        })
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=7500)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--latents", type=int, default=10)
    parser.add_argument("--select", type=int, default=8)
    parser.add_argument("--permutations", type=int, default=1000)
    parser.add_argument("--baseline", help="copy of an earlier interpret/loglinear.py to time side by side")
    parser.add_argument("--reference-tables", type=int, default=5, help="tables fitted per step by GLM and IPF")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    x, h = synthetic_draws(args.samples, args.genes, args.latents)
    report: dict[str, Any] = {
        "benchmark": "loglinear", "baseline": args.baseline, "samples": args.samples, "genes": args.genes, "latents": args.latents, "selected": args.select,
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

    baseline = load_baseline(args.baseline) if args.baseline else None
    report["permutations"] = [compare_permutations(x, h, selected, args, baseline)
                              for selected in ([], selection.genes[:-1])]
    report["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
