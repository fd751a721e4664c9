"""Which LDVAE loadings group known co-expressed PBMC markers: varimax-rotated or unrotated (scVI's), as JSON.

The ELBO does not change when the latent basis rotates, so the factors an LDVAE fit lands on mix the biological
programs arbitrarily. This trains the pipeline's LDVAE (packaged defaults, the sweep's 60 epochs) on prepared
PBMC 3k for several seeds and counts, for each basis, how many of three marker pairs that mark one cell type
each (S100A8/S100A9 monocytes, CD79A/CD79B B cells, GNLY/NKG7 NK cells) share one factor's top-20 genes by
absolute loading. docs/python-api.md quotes the committed result (bench/results/).

    python bench/ldvae_rotation.py                 # 3 seeds, a few minutes on 2 cores
    python bench/ldvae_rotation.py --seeds 0,1 --epochs 30
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PAIRS = (("S100A8", "S100A9"), ("CD79A", "CD79B"), ("GNLY", "NKG7"))
TOP = 20


def pairs_sharing_a_factor(loadings: np.ndarray, genes: np.ndarray) -> list[str]:
    """The marker pairs whose two genes are both among one factor's TOP genes by absolute loading."""
    tops = [set(genes[np.argsort(-np.abs(loadings[:, k]))[:TOP]]) for k in range(loadings.shape[1])]
    return [f"{a}/{b}" for a, b in PAIRS if any(a in top and b in top for top in tops)]


def main() -> None:
    import torch

    from scdgm.defaults import default_params
    from scdgm.models import create_model
    from scdgm.pipelines.fetch import load_pbmc3k
    from scdgm.pipelines.prepare import prepare
    from scdgm.pipelines.train import model_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=default_params()["tune"]["max_epochs"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    params = default_params()
    cells = prepare(load_pbmc3k(), params["prepare"], seed=params["seed"])
    runs = []
    for seed in (int(s) for s in args.seeds.split(",")):
        model = create_model("ldvae", model_params("ldvae", params) | {"max_epochs": args.epochs, "progress": False,
                                                                        "seed": seed, "rotation": "varimax"})
        model.fit(cells)
        rotated = model.loadings()
        unrotated = rotated.to_numpy() @ model.module.rotation.numpy().T  # loadings = W @ R, R orthogonal
        genes = rotated.index.to_numpy()
        runs.append({"seed": seed, "varimax": pairs_sharing_a_factor(rotated.to_numpy(), genes),
                     "none": pairs_sharing_a_factor(unrotated, genes)})
    summary = {basis: float(np.mean([len(run[basis]) for run in runs])) for basis in ("varimax", "none")}
    print(json.dumps({"benchmark": "ldvae_rotation", "data": "PBMC 3k, packaged prepare defaults",
                      "epochs": args.epochs, "pairs": [f"{a}/{b}" for a, b in PAIRS], "top": TOP,
                      "mean_pairs_sharing_a_factor": summary, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
