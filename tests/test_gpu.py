"""Training on a GPU whenever this machine has one: a VAE fits, embeds, samples and scores on CUDA; `scdgm train
--workers 1 --gpus-per-worker 1` trains through Ray Train on the GPU (NCCL) into the same model format. Without a
CUDA GPU (CI, most laptops) these skip: no fixture can stand in for the device."""
import numpy as np
import pytest
import torch
from tracking_helpers import isolated_tracking

from scdgm.models import create_model, load_model
from scdgm.pipelines.cli import main
from scdgm.pipelines.prepare import split_cells
from scdgm.pipelines.simulate import simulate_programs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PARAMS = {"max_epochs": 20, "batch_size": 64, "progress": False, "n_importance": 5}


@pytest.fixture(scope="module")
def cells():
    adata = simulate_programs(600, 80, seed=3, genes_per_program=8)
    adata.obs["split"] = split_cells(adata.obs["cell_type"], {"train": 0.8, "validation": 0.1, "test": 0.1}, 3)
    return adata


def test_a_vae_trains_embeds_samples_and_scores_on_the_gpu(cells):
    """The module, its batches and its draws live on the GPU; its held-out ELBO is that of CPU training within the
    seed-to-seed spread (other random streams)."""
    gpu = create_model("vae", {**PARAMS, "device": "cuda"})
    gpu.fit(cells)
    assert gpu.device.type == "cuda" and all(p.is_cuda for p in gpu.module.parameters())
    cpu = create_model("vae", {**PARAMS, "device": "cpu"})
    cpu.fit(cells)
    test = cells[cells.obs["split"] == "test"]
    embedding = gpu.embed(test, key_added=None)
    assert embedding.mean.shape == (test.n_obs, gpu.n_latent) and np.isfinite(embedding.mean).all()
    prior = gpu.sample(n=30, source="prior")
    assert prior.x.shape == (30, cells.n_vars) and (prior.x >= 0).all()
    on_gpu, on_cpu = gpu.heldout_nll(test)["nll_elbo"], cpu.heldout_nll(test)["nll_elbo"]
    assert abs(on_gpu - on_cpu) / abs(on_cpu) < 0.03, (on_gpu, on_cpu)


def test_the_cli_trains_one_gpu_worker_through_ray_train(cells, tmp_path, capsys):
    with pytest.MonkeyPatch.context() as patch:
        isolated_tracking(patch, tmp_path)
        data = tmp_path / "cells.h5ad"
        cells.write_h5ad(data)
        settings = [arg for key, value in PARAMS.items() for arg in ("--set", f"{key}={str(value).lower()}")]
        main(["train", "--model", "vae", "--data", str(data), "--out", str(tmp_path / "vae"), "--workers", "1",
              "--gpus-per-worker", "1", *settings])
    assert "by 1 workers on 1 node(s)" in capsys.readouterr().out
    model = load_model(str(tmp_path / "vae"))
    assert np.isfinite(model.metadata["metrics"]["nll_elbo"])
    embedding = model.embed(cells, key_added=None)
    assert np.isfinite(embedding.mean).all()
