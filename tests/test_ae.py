"""Autoencoder: NB and MSE losses, MC-dropout embedding variance, the Gaussian prior over training codes,
persistence and seeded determinism."""
import anndata as ad
import numpy as np
import pytest
import torch

from scdgm.errors import ScdgmError
from scdgm.models import create_model, load_model
from scdgm.models.ae import Autoencoder
from scdgm.models.data import split_mask
from scdgm.models.evaluation import knn_accuracy
from scdgm.pipelines.prepare import split_cells
from scdgm.pipelines.simulate import simulate_programs

QUIET = {"progress": False}


@pytest.fixture(scope="module")
def cells() -> ad.AnnData:
    adata = simulate_programs(1200, 200, seed=2)
    adata.obs["split"] = split_cells(adata.obs["cell_type"], {"train": 0.8, "validation": 0.1, "test": 0.1}, 2)
    return adata


@pytest.fixture(scope="module")
def nb_ae(cells) -> Autoencoder:
    model = create_model("ae", {"max_epochs": 25, **QUIET})
    model.fit(cells)
    return model


def split_of(adata: ad.AnnData, name: str) -> ad.AnnData:
    return adata[split_mask(adata, name)]


def test_nb_autoencoder_codes_separate_cell_types(cells, nb_ae):
    train, test = split_of(cells, "train"), split_of(cells, "test")
    z_train, z_test = nb_ae.embed(train).mean, nb_ae.embed(test).mean
    accuracy = knn_accuracy(z_train, train.obs["cell_type"], z_test, test.obs["cell_type"])
    assert accuracy >= 0.9
    assert nb_ae.history.epochs[-1]["validation_loss"] < nb_ae.history.epochs[0]["validation_loss"]


def test_mc_dropout_variance_and_deterministic_embedding(cells, nb_ae):
    test = split_of(cells, "test")
    first, second = nb_ae.embed(test), nb_ae.embed(test)
    assert np.array_equal(first.mean, second.mean) and np.array_equal(first.var, second.var)
    assert (first.var > 0).all()
    module = nb_ae.module
    assert not any(m.training for m in module.modules())  # MC dropout leaves every layer in inference mode
    plain = create_model("ae", {"max_epochs": 1, "dropout": 0.0, **QUIET})
    plain.fit(cells)
    assert np.array_equal(plain.embed(test).var, np.zeros((test.n_obs, 10), dtype=np.float32))


def test_prior_is_a_gaussian_fitted_to_training_codes(cells, nb_ae):
    codes = nb_ae.embed(split_of(cells, "train")).mean
    samples = nb_ae.sample(n=4000, source="prior", seed=1)
    np.testing.assert_allclose(samples.z.mean(0), codes.mean(0), atol=0.15 * codes.std(0).max())
    np.testing.assert_allclose(np.cov(samples.z.T), np.cov(codes.T), atol=0.2 * np.cov(codes.T).diagonal().max())
    library = np.log(np.asarray(cells.X.sum(1)).ravel()).mean()
    assert np.log(samples.x.sum(1)).mean() == pytest.approx(library, abs=0.15)


def test_posterior_draws_are_row_aligned(cells, nb_ae):
    test = split_of(cells, "test")
    samples = nb_ae.sample(test, draws=3)
    assert np.array_equal(samples.cell_index, np.tile(np.arange(test.n_obs), 3))
    code = nb_ae.embed(test).mean
    spread = np.linalg.norm(samples.z[: test.n_obs] - code, axis=1).mean()
    assert spread < 0.5 * np.linalg.norm(code - code.mean(0), axis=1).mean()


def test_mse_denoising_autoencoder_reconstructs_on_the_count_scale(cells):
    model = create_model("ae", {"max_epochs": 10, "loss": "mse", "input_dropout": 0.2, "dropout": 0.0, **QUIET})
    model.fit(cells)
    test = split_of(cells, "test")
    expected = model.reconstruct(test)
    np.testing.assert_allclose(expected.sum(1), np.asarray(test.X.sum(1)).ravel(), rtol=1e-4)
    assert (model.embed(test).var > 0).all()  # input dropout alone drives MC dropout
    samples = model.sample(test)
    assert np.array_equal(samples.x, np.round(samples.x)) and samples.x.min() >= 0
    assert model.heldout_nll(test) == {}


def test_save_load_and_seeded_training(cells, nb_ae, tmp_path):
    nb_ae.save(tmp_path / "ae")
    loaded = load_model(str(tmp_path / "ae"))
    test = split_of(cells, "test")
    a, b = nb_ae.embed(test), loaded.embed(test)
    assert np.array_equal(a.mean, b.mean) and np.array_equal(a.var, b.var)
    assert np.array_equal(nb_ae.sample(n=20, source="prior").x, loaded.sample(n=20, source="prior").x)
    unsplit = test.copy()
    del unsplit.obs["split"]  # no split column: every cell trains
    runs = [create_model("ae", {"max_epochs": 2, **QUIET}) for _ in range(2)]
    for run in runs:
        run.fit(unsplit)
    for name, tensor in runs[0].state_tensors().items():
        assert torch.equal(tensor, runs[1].state_tensors()[name]), name


def test_bad_options_are_user_errors():
    with pytest.raises(ScdgmError, match="loss: expected one of 'nb', 'mse'"):
        create_model("ae", {"loss": "bce"})
    with pytest.raises(ScdgmError, match="input_dropout"):
        create_model("ae", {"input_dropout": 1.0})
    with pytest.raises(ScdgmError, match="not been fitted"):
        create_model("ae").embed(ad.AnnData(np.ones((2, 3), dtype=np.float32)))
