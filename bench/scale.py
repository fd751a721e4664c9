"""Atlas scale through the installed CLI, printed as JSON: wall time and peak RSS of every stage.

For each --cells size N: `scdgm data simulate` (programs, N cells x 2,000 genes, split as prepare does) ->
`scdgm train --model vae --set max_epochs=1` -> `scdgm embed` of all cells -> `scdgm explain` on posterior draws
totalling --explain-draws synthetic cells (draws per cell x cells explained, explain.max_cells of them at most).
Then a raw-like set (--raw-cells x 30,000 genes, MT- genes, damaged cells) through `scdgm prepare --label-key
cell_type`. Every stage runs in a fresh wrapper process that starts the command and reports its
RUSAGE_CHILDREN peak RSS, so each stage's peak is its own. The stages run in a scratch project folder (--workdir,
else a temporary one; its data files are deleted unless --keep). For reference, in wrapped processes too: the
plain-torch VAE loop of bench/train_throughput.py and the step 1 and step 8 permutation timings of
bench/loglinear.py.

Checked against the issue's targets: at 10^6 cells train and embed peak under 4,096 MB; the time of 10^6 over
that of 10^5 cells within 15% of 10x for train and embed, the smallest size's time (a command's start-up, MLflow,
the evaluation on at most 2,000 cells: ~10-30 s) taken off both, and for train also on the fit alone; prepare of
the raw-like 10^6 set under 8,192 MB. Also one model trained by 1 and by 2 Ray Train workers (held-out ELBO within
1%). Explanations use --permutations 50 by default (params.yaml's 200 take about four times the selection time).

    python bench/scale.py                                          # the full run: about an hour on 2 cores
    python bench/scale.py --cells 2000,20000 --raw-cells 20000     # a quick check of the machinery
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/train_throughput.py: spinning threads on shared cores

GENES, RAW_GENES = 2000, 30000
TARGETS = {"train_embed_peak_rss_mb_at_1e6": 4096, "time_ratio_tolerance": 0.15, "prepare_raw_peak_rss_mb_at_1e6": 8192}
WRAPPER = """
import json, resource, subprocess, sys, time
out, err, command = sys.argv[1], sys.argv[2], sys.argv[3:]
start = time.perf_counter()
with open(out, "w") as stdout, open(err, "w") as stderr:
    code = subprocess.run(command, stdout=stdout, stderr=stderr).returncode
seconds = time.perf_counter() - start
print(json.dumps({"exit_code": code, "seconds": seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""
"""Runs a command (argv[3:]) with its output in files argv[1] and argv[2]; prints its exit code, wall seconds and
peak RSS (Linux reports ru_maxrss in KB). A fresh wrapper per stage: RUSAGE_CHILDREN is the largest child so far."""


def cli() -> list[str]:
    """The installed `scdgm` console script (pyproject.toml [project.scripts]) beside this Python, else the module."""
    script = Path(sys.executable).parent / "scdgm"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "scdgm.pipelines.cli"]


def run_stage(name: str, command: list[str], workdir: Path) -> dict[str, Any]:
    """Run `command` in `workdir` inside a fresh wrapper; its record: command, wall seconds, peak RSS, exit code,
    and the last lines of its output (stdout in 'stdout_tail', the error when it failed)."""
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    out, err = logs / f"{name}.out", logs / f"{name}.err"
    print(f"[scale] {name}: {' '.join(command)}", file=sys.stderr, flush=True)
    wrapper = subprocess.run([sys.executable, "-c", WRAPPER, str(out), str(err), *command], cwd=workdir,
                             capture_output=True, text=True, check=True)
    result = json.loads(wrapper.stdout)
    record: dict[str, Any] = {
        "command": " ".join(command),
        "seconds": round(result["seconds"], 2),
        "peak_rss_mb": round(result["peak_rss_mb"], 1),
        "exit_code": result["exit_code"],
    }
    if result["exit_code"] != 0:
        record["error"] = err.read_text()[-2000:].strip()
    print(f"[scale] {name}: {record['seconds']} s, {record['peak_rss_mb']} MB, exit {record['exit_code']}",
          file=sys.stderr, flush=True)
    return record


def stdout_of(name: str, workdir: Path) -> str:
    """What stage `name` printed."""
    return (workdir / "logs" / f"{name}.out").read_text()


def train_share() -> float:
    """The share of cells in the training split (params.yaml prepare.split.train; simulate splits as prepare)."""
    from scdgm.defaults import default_section

    return float(default_section("prepare")["split"]["train"])


def size_stages(n_cells: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """simulate -> train (1 epoch) -> embed -> explain for N cells x 2,000 genes, with cells/s."""
    scdgm = cli()
    data, model = f"data/programs-{n_cells}.h5ad", f"models/vae-{n_cells}"
    explained = min(n_cells, args.max_cells)
    draws = max(1, math.ceil(args.explain_draws / explained))
    explain = [*scdgm, "explain", "--model", model, "--data", data, "--draws", str(draws),
               "--set", f"explain.max_cells={args.max_cells}", "--out", f"explanations/vae-{n_cells}"]
    if args.permutations is not None:
        explain += ["--permutations", str(args.permutations)]
    commands = {
        "simulate": [*scdgm, "data", "simulate", "--kind", "programs", "--n-cells", str(n_cells), "--n-genes",
                     str(GENES), "--seed", "0", "--out", data],
        "train": [*scdgm, "train", "--model", "vae", "--data", data, "--out", model, "--set", "max_epochs=1"],
        "embed": [*scdgm, "embed", "--model", model, "--data", data, "--out", f"data/embedded-{n_cells}.h5ad"],
        "explain": explain,
    }
    if n_cells < args.explain_from:  # the fixed-cost size: explaining it would only repeat the same 10^5 draws
        del commands["explain"]
    stages: dict[str, Any] = {}
    for name, command in commands.items():
        stages[name] = run_stage(f"{name}-{n_cells}", command, workdir)
        if stages[name]["exit_code"] != 0:
            break
    result: dict[str, Any] = {"cells": n_cells, "genes": GENES, "stages": stages}
    if "simulate" in stages and stages["simulate"]["exit_code"] == 0:
        result["simulate_cells_per_s"] = round(n_cells / stages["simulate"]["seconds"])
    if stages.get("train", {}).get("exit_code") == 0:
        metrics = json.loads((workdir / model / "metrics.json").read_text())
        result["train_cells_per_s"] = round(n_cells / stages["train"]["seconds"])
        seconds = metrics.get("training_seconds")
        if seconds:  # the fit alone (one epoch over the training split), without start-up, reading and evaluation
            result["train_loop_seconds"] = round(seconds, 2)
            result["train_loop_cells_per_s"] = round(n_cells * train_share() / seconds)
    if stages.get("embed", {}).get("exit_code") == 0:
        result["embed_cells_per_s"] = round(n_cells / stages["embed"]["seconds"])
    if stages.get("explain", {}).get("exit_code") == 0:
        found = re.search(r"explained on (\d+) cells.*?, (\d+) posterior draws", stdout_of(f"explain-{n_cells}", workdir))
        result["explain_cells"], result["explain_draws_per_cell"] = explained, draws
        result["explain_posterior_draws"] = int(found.group(2)) if found else None
    if not args.keep:
        for path in (data, f"data/embedded-{n_cells}.h5ad"):
            (workdir / path).unlink(missing_ok=True)
    return result


def raw_stages(n_cells: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The raw-like set: simulate (streamed when large), then prepare with the simulated labels."""
    scdgm = cli()
    raw, prepared = f"data/raw-{n_cells}.h5ad", f"data/prepared-raw-{n_cells}.h5ad"
    stages = {"simulate_raw": run_stage(f"simulate_raw-{n_cells}", [
        *scdgm, "data", "simulate", "--kind", "raw", "--n-cells", str(n_cells), "--n-genes", str(RAW_GENES),
        "--seed", "0", "--out", raw], workdir)}
    if stages["simulate_raw"]["exit_code"] == 0:
        stages["prepare"] = run_stage(f"prepare-{n_cells}", [
            *scdgm, "prepare", "--input", raw, "--out", prepared, "--label-key", "cell_type"], workdir)
    result: dict[str, Any] = {"cells": n_cells, "genes": RAW_GENES, "stages": stages}
    if stages["simulate_raw"]["exit_code"] == 0:
        result["simulate_cells_per_s"] = round(n_cells / stages["simulate_raw"]["seconds"])
    if stages.get("prepare", {}).get("exit_code") == 0:
        result["prepare_cells_per_s"] = round(n_cells / stages["prepare"]["seconds"])
        result["prepare_summary"] = stdout_of(f"prepare-{n_cells}", workdir).strip().splitlines()[-1][-400:]
    if not args.keep:
        for path in (raw, prepared):
            (workdir / path).unlink(missing_ok=True)
    return result


def reference(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The plain-torch loop of bench/train_throughput.py (its --worker entry) and the permutation timings of
    bench/loglinear.py (steps 1 and 8), each in its own wrapped process."""
    plain = {"task": "plain", "n_cells": 10_000, "n_genes": GENES, "steps": 50, "threads": 2, "batch_size": 128}
    record = run_stage("plain_torch", [sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--worker",
                                       json.dumps(plain)], workdir)
    if record["exit_code"] == 0:
        record.update(json.loads(stdout_of("plain_torch", workdir)), settings=plain)
    loglinear = run_stage("loglinear", [
        sys.executable, str(ROOT / "bench" / "loglinear.py"), "--samples", str(args.loglinear_samples),
        "--genes", str(GENES), "--select", "8", "--permutations", str(args.loglinear_permutations),
        "--repeats", "1", "--reference-tables", "1"], workdir)
    if loglinear["exit_code"] == 0:
        report = json.loads(stdout_of("loglinear", workdir))
        loglinear.update(samples=report["samples"], select_seconds=report["select_seconds_sparse_input"]["median"],
                         permutations=report["permutations"])
    return {"plain_torch_loop": record, "loglinear": loglinear}


def linearity(sizes: list[dict[str, Any]]) -> dict[str, Any]:
    """Time of the two largest sizes per stage against the ratio of their work (cells; explain: posterior draws,
    the same total at every size by default), pass within the tolerance. With three sizes or more the smallest
    one's time is the fixed cost of a command (start-up, MLflow, evaluation on at most 2,000 cells) and is taken
    off both ('work_ratio'); 'wall_ratio' keeps it; the train stage is also judged on its fit alone
    (metrics.json training_seconds: the epoch and its validation pass)."""
    small, large = sizes[-2], sizes[-1]
    fixed = sizes[0] if len(sizes) >= 3 else None
    tolerance = TARGETS["time_ratio_tolerance"]
    result: dict[str, Any] = {"cells": [small["cells"], large["cells"]], "tolerance": tolerance, "stages": {},
                              "fixed_cost_from_cells": None if fixed is None else fixed["cells"]}
    for name, stage in large["stages"].items():
        before = small["stages"].get(name)
        if before is None or stage["exit_code"] or before["exit_code"]:
            continue
        work = "explain_posterior_draws" if name == "explain" else "cells"
        expected = (large.get(work) or 0) / (small.get(work) or 1)
        record = {"wall_ratio": round(stage["seconds"] / before["seconds"], 2), "expected_ratio": round(expected, 2)}
        ratio = record["wall_ratio"]
        if fixed is not None and fixed["stages"].get(name, {}).get("exit_code") == 0 and name != "explain":
            base = fixed["stages"][name]["seconds"]
            ratio = record["work_ratio"] = round((stage["seconds"] - base) / (before["seconds"] - base), 2)
        record["pass"] = abs(ratio / expected - 1) <= tolerance if expected else None
        result["stages"][name] = record
    if large.get("train_loop_seconds") and small.get("train_loop_seconds"):
        ratio = large["train_loop_seconds"] / small["train_loop_seconds"]
        expected = large["cells"] / small["cells"]
        result["stages"]["train_fit"] = {"ratio": round(ratio, 2), "expected_ratio": round(expected, 2),
                                         "pass": abs(ratio / expected - 1) <= tolerance}
    return result


def workers(n_cells: int, epochs: int, workdir: Path) -> dict[str, Any]:
    """One model trained by 1 and by 2 Ray Train workers (DDP over gloo, a private local Ray) on the same simulated
    cells: wall time and held-out (test split) ELBO side by side."""
    scdgm = cli()
    data = f"data/workers-{n_cells}.h5ad"
    result: dict[str, Any] = {"cells": n_cells, "epochs": epochs, "simulate": run_stage(f"simulate_workers-{n_cells}", [
        *scdgm, "data", "simulate", "--kind", "programs", "--n-cells", str(n_cells), "--n-genes", str(GENES),
        "--seed", "1", "--out", data], workdir)}
    for count in (1, 2):
        model = f"models/workers-{count}"
        stage = run_stage(f"train_workers_{count}", [*scdgm, "train", "--model", "vae", "--data", data, "--out", model,
                                                     "--workers", str(count), "--set", f"max_epochs={epochs}",
                                                     "--set", f"patience={epochs}", "--set", "progress=false"], workdir)
        if stage["exit_code"] == 0:
            metrics = json.loads((workdir / model / "metrics.json").read_text())
            stage.update(nll_elbo=metrics.get("nll_elbo"), training_seconds=metrics.get("training_seconds"))
        result[f"workers_{count}"] = stage
    one, two = result["workers_1"].get("nll_elbo"), result["workers_2"].get("nll_elbo")
    if one and two:
        result["heldout_elbo_relative_difference"] = round(abs(two - one) / abs(one), 4)
        result["within_1_percent"] = result["heldout_elbo_relative_difference"] <= 0.01
    return result


def checks(sizes: list[dict[str, Any]], raw: dict[str, Any] | None) -> dict[str, Any]:
    """The issue's thresholds, judged where the run has the size they name (10^6 cells), else null."""
    million = next((size for size in sizes if size["cells"] >= 1_000_000), None)
    result: dict[str, Any] = {}
    for name in ("train", "embed"):
        stage = (million or {}).get("stages", {}).get(name)
        result[f"{name}_peak_rss_under_4096_mb"] = (
            None if stage is None else stage["exit_code"] == 0 and stage["peak_rss_mb"] < 4096)
    prepare = (raw or {}).get("stages", {}).get("prepare") if (raw or {}).get("cells", 0) >= 1_000_000 else None
    result["prepare_raw_peak_rss_under_8192_mb"] = (
        None if prepare is None else prepare["exit_code"] == 0 and prepare["peak_rss_mb"] < 8192)
    if len(sizes) >= 2:
        ratios = linearity(sizes)["stages"]
        result["train_embed_time_linear"] = all(ratios.get(name, {}).get("pass", False) for name in ("train", "embed"))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default="2000,100000,1000000",
                        help="cell counts of the programs runs, in turn (the smallest: the fixed cost of a command)")
    parser.add_argument("--raw-cells", type=int, default=1_000_000, help="cells of the raw-like set (30,000 genes)")
    parser.add_argument("--skip-raw", action="store_true", help="no raw-like set")
    parser.add_argument("--skip-reference", action="store_true", help="no plain-torch loop or permutation timings")
    parser.add_argument("--explain-draws", type=int, default=100_000, help="posterior draws (synthetic cells) in all")
    parser.add_argument("--max-cells", type=int, default=100_000, help="explain.max_cells: cells explained at most")
    parser.add_argument("--permutations", type=int, default=50,
                        help="explain permutations per step (params.yaml: 200; 50 keeps the run to about an hour)")
    parser.add_argument("--explain-from", type=int, default=100_000, help="explain only sizes of this many cells up")
    parser.add_argument("--workers-cells", type=int, default=20_000, help="cells of the 1- vs 2-worker run (0: none)")
    parser.add_argument("--workers-epochs", type=int, default=10, help="epochs of the 1- vs 2-worker run")
    parser.add_argument("--loglinear-samples", type=int, default=7500, help="draws of bench/loglinear.py's run")
    parser.add_argument("--loglinear-permutations", type=int, default=1000)
    parser.add_argument("--workdir", type=Path, help="scratch project folder (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the data files (models and logs are kept)")
    args = parser.parse_args()
    sizes = sorted(int(value) for value in args.cells.split(",") if value.strip())  # "" runs no programs size
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="scdgm-scale-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["SCDGM_PROJECT"] = str(workdir)  # mlflow.db, mlartifacts/ land in the scratch project

    started = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "scale", "workdir": str(workdir), "cli": " ".join(cli()), "cpu_count": os.cpu_count(),
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"], "load_average_at_start": list(os.getloadavg()),
        "targets": TARGETS, "sizes": [size_stages(n, args, workdir) for n in sizes],
    }
    report["raw"] = None if args.skip_raw else raw_stages(args.raw_cells, args, workdir)
    if len(sizes) >= 2:
        report["linearity"] = linearity(report["sizes"])
    report["checks"] = checks(report["sizes"], report["raw"])
    if args.workers_cells:
        report["workers"] = workers(args.workers_cells, args.workers_epochs, workdir)
    if not args.skip_reference:
        report["reference"] = reference(args, workdir)
    report["load_average_at_end"] = list(os.getloadavg())
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    if not args.keep:
        shutil.rmtree(workdir / "data", ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
