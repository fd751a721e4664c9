"""The WGAN-GP: synthetic cells are closer to held-out cells than gene-shuffled ones, the encoder inverts the
generator, counts keep each cell's library, every loss term is reported, and saving and seeding behave."""
import numpy as np
import pytest
import torch

from scdgm.errors import InputError
from scdgm.models import GenerativeModel
from scdgm.models.data import expression_to_counts
from scdgm.models.evaluation import PCASpace, knn_accuracy, mmd_rbf
from scdgm.models.gan import WGAN
from scdgm.pipelines.prepare import split_cells
from scdgm.pipelines.simulate import simulate_programs

SPLIT = {"train": 0.7, "validation": 0.15, "test": 0.15}
SMALL = {"n_hidden": 128, "batch_size": 32, "lr": 1e-3, "progress": False}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread avoids oversubscription on the shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def simulated(seed, **options):
    data = simulate_programs(600, 60, n_types=3, n_programs=4, genes_per_program=10, seed=seed, **options)
    data.obs["split"] = split_cells(data.obs["cell_type"], SPLIT, seed=seed)
    return data


@pytest.fixture(scope="module")
def adata():
    return simulated(7)


@pytest.fixture(scope="module")
def gan(adata):
    model = WGAN(max_epochs=100, **SMALL)
    model.fit(adata)
    return model


def split(adata, name):
    return adata[adata.obs["split"] == name]


def test_synthetic_cells_beat_gene_shuffled_cells(adata, gan):
    test = split(adata, "test")
    counts = test.X.toarray()
    rng = np.random.default_rng(0)
    shuffled = np.column_stack([rng.permutation(column) for column in counts.T])
    space = PCASpace(n_components=5).fit(counts)
    reference = space.transform(counts)
    baseline = mmd_rbf(space.transform(shuffled), reference)
    prior = gan.sample(n=test.n_obs, source="prior", seed=0)
    posterior = gan.sample(test, seed=0)
    # measured 0.31 (prior) and 0.39 (posterior) of the shuffled baseline: shuffling keeps every gene's marginal,
    # so beating it 2.5-3x means the generator learnt the joint structure. The checkpoint is picked by a noisy
    # per-batch validation MMD (epoch 26 of 57 here), which costs the GAN quality: see the model-selection issue.
    assert mmd_rbf(space.transform(prior.x), reference) < 0.35 * baseline
    assert mmd_rbf(space.transform(posterior.x), reference) < 0.45 * baseline


def test_history_reports_every_loss_term(gan):
    first, best = gan.history.epochs[0], gan.history.epochs[gan.history.best_epoch]
    terms = {"wasserstein", "gradient_penalty", "critic", "generator", "encoder_latent", "encoder_reconstruction"}
    assert {f"train_{t}" for t in terms} | {"validation_loss", "validation_wasserstein"} <= set(first)
    assert best["validation_loss"] < 0.5 * first["validation_loss"]


def test_encoder_inverts_the_generator_and_separates_cell_types(adata, gan):
    module = gan.module
    with torch.no_grad():
        z, log_library, _ = module.draw_prior(500)
        condition = module.condition(log_library, None)
        generated = module.generate_expression(z, condition)
        recovered = module.encode_expression(generated, condition)
        cycled = module.generate_expression(recovered, condition)

    def explained(estimate, truth):
        return (1 - ((estimate - truth) ** 2).sum() / ((truth - truth.mean(0)) ** 2).sum()).item()

    # the generator does not use every latent direction, so the inversion is partial
    assert explained(recovered, z) > 0.3
    assert explained(cycled, generated) > 0.45  # measured 0.49
    train, test = split(adata, "train"), split(adata, "test")
    embedding = gan.embed(test)
    assert np.all(embedding.var == 0)
    accuracy = knn_accuracy(gan.embed(train).mean, train.obs["cell_type"], embedding.mean, test.obs["cell_type"])
    assert accuracy > 0.85


def test_counts_keep_each_cells_library(adata, gan):
    cells = adata[:40]
    library = np.asarray(cells.X.sum(1)).ravel()
    draws = gan.sample(cells, draws=2, seed=3)
    assert draws.x.shape == (80, adata.n_vars) and np.array_equal(draws.cell_index, np.tile(np.arange(40), 2))
    assert np.all(draws.x >= 0) and np.array_equal(draws.x, np.round(draws.x))
    np.testing.assert_allclose(draws.x.sum(1), np.tile(library, 2), rtol=0.1)
    np.testing.assert_allclose(gan.reconstruct(cells).sum(1), library, rtol=1e-4)
    prior = gan.sample(n=300, source="prior", seed=3)
    assert prior.cell_index is None and prior.z.shape == (300, gan.n_latent)
    assert np.median(prior.x.sum(1)) == pytest.approx(np.median(library), rel=0.25)


def test_count_noise_options():
    log_expression = torch.log1p(torch.full((20000, 3), 2.5))  # 2.5 counts per gene at library 1e4
    log_library = torch.full((20000,), float(np.log(1e4)))
    torch.manual_seed(0)
    rounded = expression_to_counts(log_expression, log_library, noise="round")
    assert set(rounded.unique().tolist()) == {2.0, 3.0} and rounded.mean().item() == pytest.approx(2.5, abs=0.02)
    poisson = expression_to_counts(log_expression, log_library, noise="poisson")
    assert poisson.var().item() == pytest.approx(2.5, rel=0.05)
    with pytest.raises(InputError):
        WGAN(count_noise="gaussian")


def test_save_load_round_trip(adata, gan, tmp_path):
    gan.save(tmp_path / "gan")
    loaded = GenerativeModel.load(tmp_path / "gan")
    assert isinstance(loaded, WGAN)
    np.testing.assert_array_equal(loaded.embed(adata).mean, gan.embed(adata).mean)
    prior = loaded.sample(n=30, source="prior", seed=5).x
    np.testing.assert_array_equal(prior, gan.sample(n=30, source="prior", seed=5).x)


def test_training_is_seeded_and_handles_batches():
    data = simulated(11, n_batches=2, batch_effect=0.5)
    runs = [WGAN(max_epochs=2, seed=seed, batch_key="batch", **SMALL) for seed in (1, 1, 2)]
    for model in runs:
        model.fit(data)
    states = [model.state_tensors() for model in runs]
    assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])
    assert not all(torch.equal(states[0][name], states[2][name]) for name in states[0])
    prior = runs[0].sample(n=10, source="prior", seed=0)
    assert prior.x.shape == (10, data.n_vars)
    assert runs[0].module.condition(torch.zeros(2), torch.tensor([0, 1])).shape == (2, 3)  # library + one-hot
