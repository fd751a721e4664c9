"""The deep Boltzmann machine: its pseudo-likelihood is the exact formula, training beats the independent-gene
model, Gibbs samples reproduce the data's gene frequencies and are closer to held-out cells than shuffled ones,
and embedding, sampling, saving and seeding behave."""
import numpy as np
import pytest
import torch

from scdgm.errors import InputError
from scdgm.models import GenerativeModel
from scdgm.models.dbm import DBM, DBMModule
from scdgm.models.evaluation import PCASpace, mmd_rbf
from scdgm.pipelines.prepare import split_cells
from scdgm.pipelines.simulate import simulate_programs

SPLIT = {"train": 0.7, "validation": 0.15, "test": 0.15}
SMALL = {"n_hidden1": 48, "n_hidden2": 12, "n_chains": 200, "mean_field_steps": 5, "burn_in": 200, "progress": False}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread avoids oversubscription on the shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adata():
    data = simulate_programs(600, 50, n_types=3, n_programs=4, genes_per_program=10, library_size=150, seed=5)
    data.obs["split"] = split_cells(data.obs["cell_type"], SPLIT, seed=5)
    return data


@pytest.fixture(scope="module")
def dbm(adata):
    model = DBM(max_epochs=80, lr=1e-3, **SMALL)
    model.fit(adata)
    return model


def split(adata, name):
    return adata[adata.obs["split"] == name]


def test_pseudo_likelihood_matches_brute_force():
    torch.manual_seed(0)
    config = DBM.Config(n_hidden1=5, n_hidden2=3, n_chains=2, init_scale=1.0)
    module = DBMModule(7, config, torch.full((7,), 0.3))
    v = torch.bernoulli(torch.full((4, 7), 0.5))
    _, mu2 = module.mean_field(v)

    def free_energy(visible):  # h1 summed out, h2 at its mean-field value
        pre = visible @ module.w1 + mu2 @ module.w2.T + module.c1
        return -(visible @ module.b) - torch.nn.functional.softplus(pre).sum(1)

    expected = torch.zeros(4)
    for gene in range(7):
        flipped = v.clone()
        flipped[:, gene] = 1 - flipped[:, gene]
        expected += torch.nn.functional.softplus(free_energy(v) - free_energy(flipped))
    with torch.no_grad():
        exact = module.pseudo_nll(v).numpy()
        stochastic = module.pseudo_nll(v.repeat(4000, 1), exact=False).reshape(4000, 4).mean(0).numpy()
    np.testing.assert_allclose(exact, expected.detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(stochastic, expected.detach().numpy(), rtol=0.05)


def test_training_beats_independent_genes_and_reports_its_terms(adata, dbm):
    test = split(adata, "test")
    frequencies = dbm.binarise(split(adata, "train")).mean(0).clip(1e-3, 1 - 1e-3)
    v = dbm.binarise(test)
    independent = -(v * np.log(frequencies) + (1 - v) * np.log(1 - frequencies)).sum(1).mean()
    assert dbm.heldout_nll(test)["pseudo_nll"] < independent - 2.0
    epoch = dbm.history.epochs[-1]
    assert {"train_loss", "train_energy_gap", "train_reconstruction", "validation_loss"} <= set(epoch)


def test_gibbs_samples_match_gene_frequencies_and_beat_shuffled_cells(adata, dbm):
    test = dbm.binarise(split(adata, "test"))
    frequencies = dbm.binarise(split(adata, "train")).mean(0)
    prior = dbm.sample(n=600, source="prior", seed=0)
    assert set(np.unique(prior.x)) <= {0.0, 1.0} and prior.z.shape == (600, 60)
    assert np.abs(prior.x.mean(0) - frequencies).mean() < 0.05
    rng = np.random.default_rng(0)
    shuffled = np.column_stack([rng.permutation(column) for column in test.T])
    space = PCASpace(n_components=5, binary=True).fit(test)
    reference = space.transform(test)
    baseline = mmd_rbf(space.transform(shuffled), reference)
    assert mmd_rbf(space.transform(prior.x[: len(test)]), reference) < 0.6 * baseline
    posterior = dbm.sample(split(adata, "test"), seed=0)
    assert mmd_rbf(space.transform(posterior.x), reference) < 0.6 * baseline


def test_embedding_and_posterior_draws_are_per_cell(adata, dbm):
    cells = adata[:25]
    embedding = dbm.embed(cells)
    assert embedding.mean.shape == (25, dbm.n_latent) == (25, 60)
    assert np.all((embedding.mean >= 0) & (embedding.mean <= 1))
    np.testing.assert_allclose(embedding.var, embedding.mean * (1 - embedding.mean), rtol=1e-6)
    draws = dbm.sample(cells, draws=3, seed=2)
    assert draws.x.shape == (75, adata.n_vars) and np.array_equal(draws.cell_index, np.tile(np.arange(25), 3))
    # a cell's draws agree with the cell more than with the other cells
    v = dbm.binarise(cells)
    agreement = (draws.x[:, None, :] == v[None, :, :]).mean(2).reshape(3, 25, 25).mean(0)
    others = (agreement.sum(1) - agreement.diagonal()) / 24
    assert np.mean(agreement.diagonal() > others) > 0.9
    probabilities = dbm.reconstruct(cells)
    assert probabilities.shape == v.shape and np.all((probabilities > 0) & (probabilities < 1))
    assert ((probabilities > 0.5) == v).mean() > 0.7


def test_save_load_round_trip(adata, dbm, tmp_path):
    dbm.save(tmp_path / "dbm")
    loaded = GenerativeModel.load(tmp_path / "dbm")
    assert isinstance(loaded, DBM) and loaded.output == "binary"
    np.testing.assert_array_equal(loaded.embed(adata).mean, dbm.embed(adata).mean)
    prior = loaded.sample(n=20, source="prior", seed=1).x
    np.testing.assert_array_equal(prior, dbm.sample(n=20, source="prior", seed=1).x)
    assert loaded.heldout_nll(adata) == dbm.heldout_nll(adata)


def test_training_is_seeded_and_pretraining_runs_first(adata):
    runs = [DBM(max_epochs=3, pretrain_epochs=1, seed=7, **SMALL) for _ in range(2)]
    for model in runs:
        model.fit(adata)
    first, second = (model.state_tensors() for model in runs)
    assert all(torch.equal(first[name], second[name]) for name in first)
    epochs = runs[0].history.epochs
    assert "train_pretrain_gap" in epochs[0] and "train_pretrain_gap" in epochs[1]
    assert "train_energy_gap" in epochs[2]


def test_options_are_checked():
    with pytest.raises(InputError, match="batch"):
        DBM(batch_key="batch")
    with pytest.raises(InputError):
        DBM(gibbs_steps=0)


def test_binarise_uses_the_threshold(adata):
    model = DBM(threshold=2.0, max_epochs=1, **SMALL)
    model.fit(adata)
    expected = (adata.X.toarray() > 2).astype(np.float32)
    np.testing.assert_array_equal(model.binarise(adata), expected)
