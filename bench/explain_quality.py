"""How good the log-linear explanation is, as JSON: held-out label transfer on PBMC 3k, signal before noise on the
binary benchmark, and recovery of planted gene programs.

- PBMC 3k (packaged prepare defaults, 8 genes): the default VAE and LDVAE (packaged train defaults) over several
  seeds; the pattern table from the training-split cells, scored on posterior draws of the test-split cells, for
  the fine cell types and for coarse ones (T, B, NK, monocytes, dendritic cells, platelets): accuracy with every
  cell labelled, and coverage / accuracy of a transfer that abstains on unseen patterns; mean and sd. For the VAE
  also the same figures under other gene cuts (DISCRETISATIONS), the evidence for the default `explain.gene_cut`.
- Binary benchmark through the default CLI flow (`scdgm data simulate --kind binary` → `scdgm train --model vae`
  → `scdgm explain --n-genes 12`, no split): how many of the 10 signal genes come before the first noise gene.
- Planted programs (`simulate_programs`, 4 programs): share of 8 selected genes that belong to a program.

    python bench/explain_quality.py                  # 3 seeds (tens of minutes on 2 cores)
    python bench/explain_quality.py --seeds 0 --skip-binary
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

COARSE = {
    "naive CD4 T": "T", "memory CD4 T": "T", "CD8 T": "T", "B": "B", "NK": "NK",
    "CD14+ monocytes": "monocytes", "FCGR3A+ monocytes": "monocytes", "dendritic cells": "dendritic cells",
    "platelets": "platelets",
}
"""PBMC 3k's marker-annotated types, grouped as the review's coarse labels."""


DISCRETISATIONS = {
    "synthetic median (quantile 0.5)": {"gene_cut": "quantile", "quantile": 0.5},
    "non-zero (quantile 0, > 0)": {"gene_cut": "quantile", "quantile": 0.0},
    "upper quartile (quantile 0.75)": {"gene_cut": "quantile", "quantile": 0.75},
    "two-group (Otsu on log1p)": {"gene_cut": "two-group"},
    "two-group, one draw per cell": {"gene_cut": "two-group", "draws": 1},
}
"""Gene cuts compared on the default VAE's held-out transfer (docs/loglinear.md reports the table)."""


def pbmc_transfer(seeds: list[int], n_genes: int) -> dict:
    """Held-out fine and coarse label transfer of the default VAE and LDVAE on PBMC 3k, per seed and summarised."""
    import torch

    from scdgm.defaults import default_params
    from scdgm.interpret.explain import ExplainSettings, heldout_label_transfer
    from scdgm.models import create_model
    from scdgm.pipelines.fetch import load_pbmc3k
    from scdgm.pipelines.prepare import prepare
    from scdgm.pipelines.train import model_params

    torch.set_num_threads(1)
    params = default_params()
    cells = prepare(load_pbmc3k(), params["prepare"], seed=params["seed"])
    cells.obs["coarse_type"] = cells.obs["cell_type"].astype(str).map(COARSE).fillna("other")
    train, test = cells[cells.obs["split"] == "train"], cells[cells.obs["split"] == "test"]
    def transfer(model: object, seed: int, **options: object) -> dict:
        """Fine and coarse held-out figures of one model under explain options (the defaults plus `options`)."""
        figures = {}
        for level, key in (("fine", "cell_type"), ("coarse", "coarse_type")):
            settings = ExplainSettings(n_genes=n_genes, permutations=0, plots=False, label_key=key, seed=seed)
            heldout = heldout_label_transfer(model, train, test, settings, **options)
            figures[level] = {k: heldout[k] for k in ("accuracy", "coverage", "covered_accuracy", "majority_baseline")}
        return figures

    def summarise(runs: list[dict]) -> dict:
        return {
            f"{level}_{metric}": {"mean": float(np.mean([r[level][metric] for r in runs])),
                                  "sd": float(np.std([r[level][metric] for r in runs], ddof=1)) if len(runs) > 1 else 0.0}
            for level in ("fine", "coarse") for metric in ("accuracy", "coverage", "covered_accuracy")
        }

    results: dict = {}
    cut_runs: dict[str, list[dict]] = {name: [] for name in DISCRETISATIONS}
    for kind in ("vae", "ldvae"):
        runs = []
        for seed in seeds:
            model = create_model(kind, model_params(kind, params) | {"seed": seed, "progress": False})
            model.fit(cells)
            run = {"seed": seed, "epochs": len(model.history.epochs), **transfer(model, seed)}
            runs.append(run)
            print(json.dumps({kind: run}), file=sys.stderr, flush=True)
            if kind == "vae":
                for name, options in DISCRETISATIONS.items():
                    cut_runs[name].append(transfer(model, seed, **options))
        results[kind] = {"summary": summarise(runs), "runs": runs}
    results["vae_discretisations"] = {name: {"options": DISCRETISATIONS[name], **summarise(runs)}
                                      for name, runs in cut_runs.items()}
    results["test_cells"] = int(test.n_obs)
    results["draws_per_test_cell"] = ExplainSettings().draws_per_cell(train.n_obs)
    return results


def binary_flow() -> dict:
    """The binary benchmark through the default CLI flow; signal genes before the first noise gene."""
    import anndata

    scdgm = [sys.executable, "-c", "from scdgm.pipelines.cli import main; main()"]
    with tempfile.TemporaryDirectory(prefix="scdgm-bench-") as folder:
        env = {**os.environ, "SCDGM_PROJECT": folder, "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db"}

        def run(*args: str) -> None:
            subprocess.run([*scdgm, *args], cwd=folder, env=env, check=True, capture_output=True, text=True)

        run("data", "simulate", "--kind", "binary", "--seed", "0", "--out", "binary.h5ad")
        run("train", "--model", "vae", "--data", "binary.h5ad", "--out", "model")
        run("explain", "--model", "model", "--data", "binary.h5ad", "--n-genes", "12", "--permutations", "0",
            "--set", "explain.plots=false")
        report = json.loads((Path(folder) / "model" / "explanation" / "explanation.json").read_text())
        data = anndata.read_h5ad(Path(folder) / "binary.h5ad")
    genes = [step["gene"] for step in report["selection"]]
    signal = set(data.var_names[data.var["signal_latent"].to_numpy() >= 0])
    first_noise = next((i for i, gene in enumerate(genes) if gene not in signal), len(genes))
    return {"selected": genes, "signal_before_first_noise": first_noise, "signal_genes": len(signal),
            "n_draws": report["data"]["n_draws"], "shape": list(data.shape)}


def planted_programs(seeds: list[int]) -> dict:
    """Share of 8 selected genes inside one of 4 planted programs (VAE, 600 cells x 200 genes), per seed."""
    from scdgm.interpret.explain import compute_explanation
    from scdgm.models import create_model
    from scdgm.pipelines.simulate import simulate_programs

    shares = []
    for seed in seeds:
        adata = simulate_programs(600, 200, n_types=3, n_programs=4, genes_per_program=15, seed=seed)
        model = create_model("vae", {"n_latent": 4, "n_hidden": 64, "max_epochs": 25, "progress": False, "seed": 0})
        model.fit(adata)
        report = compute_explanation(model, adata, n_genes=8, permutations=0, prior_cells=0, plots=False).report
        chosen = [step["gene_index"] for step in report["selection"]]
        shares.append(float(np.mean(adata.var["program"].to_numpy()[chosen] >= 0)))
    return {"share_in_programs": shares, "mean": float(np.mean(shares))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--n-genes", type=int, default=8)
    parser.add_argument("--skip-binary", action="store_true")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    result = {"benchmark": "explain_quality", "n_genes": args.n_genes, "seeds": seeds,
              "pbmc3k_heldout_transfer": pbmc_transfer(seeds, args.n_genes),
              "planted_programs": planted_programs(seeds)}
    if not args.skip_binary:
        result["binary_default_flow"] = binary_flow()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
