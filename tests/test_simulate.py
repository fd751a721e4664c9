"""Simulators: seeded, sparse integer counts with the planted truth stored where it can be checked."""
import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from scdgm.errors import InputError
from scdgm.pipelines.cli import main
from scdgm.pipelines.config import load_params
from scdgm.pipelines.prepare import prepare
from scdgm.pipelines.simulate import BLOCK_CELLS, MT_GENES, simulate_binary, simulate_programs, simulate_raw


def assert_sparse_counts(adata: ad.AnnData) -> None:
    """CSR float32 holding non-negative integers."""
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32
    assert (adata.X.data >= 0).all() and np.array_equal(adata.X.data, np.rint(adata.X.data))


def same_data(a: ad.AnnData, b: ad.AnnData) -> bool:
    """Identical counts, labels and truth."""
    return (
        (a.X != b.X).nnz == 0
        and a.obs.equals(b.obs)
        and a.var.equals(b.var)
        and all(np.array_equal(a.obsm[k], b.obsm[k]) for k in a.obsm)
    )


@pytest.fixture(scope="module")
def programs() -> ad.AnnData:
    return simulate_programs(600, 400, n_types=4, n_programs=6, genes_per_program=20, seed=1)


def test_programs_are_seeded_sparse_counts(programs):
    assert programs.shape == (600, 400)
    assert_sparse_counts(programs)
    again = simulate_programs(600, 400, n_types=4, n_programs=6, genes_per_program=20, seed=1)
    other = simulate_programs(600, 400, n_types=4, n_programs=6, genes_per_program=20, seed=2)
    assert same_data(programs, again)
    assert not same_data(programs, other)
    assert 0.05 < programs.X.nnz / np.prod(programs.shape) < 0.5


def test_programs_truth(programs):
    var = programs.var
    sizes = var.loc[var["program"] >= 0, "program"].value_counts().sort_index()
    assert list(sizes.index) == list(range(6)) and (sizes == 20).all()
    assert (var.loc[var["program"] >= 0, "program_weight"] > 0).all()
    assert (var.loc[var["program"] < 0, "program_weight"] == 0).all()
    assert set(programs.obs["cell_type"].cat.categories) == {f"type_{t}" for t in range(4)}
    activity = programs.obsm["program_activity"]
    assert activity.shape == (600, 6) and (activity >= 0).all()
    codes = programs.obs["cell_type"].cat.codes.to_numpy()
    for t in range(4):  # each type's own program is on in that type and (nearly) off elsewhere
        assert activity[codes == t, t].mean() > 2.0 > 0.5 > activity[codes != t, t].mean()
    assert programs.uns["simulation"]["seed"] == 1
    assert np.asarray(programs.uns["simulation"]["type_program_mean"]).shape == (4, 6)
    # planted genes are visibly up in their type: mean normalised expression ratio per program
    normalised = programs.X.multiply(1.0 / programs.X.sum(axis=1)).tocsc()
    for t in range(4):
        genes = (var["program"] == t).to_numpy()
        inside = normalised[codes == t][:, genes].mean()
        outside = normalised[codes != t][:, genes].mean()
        assert inside > 4 * outside


def test_batches_and_zero_inflation():
    base = simulate_programs(300, 200, n_programs=5, genes_per_program=10, n_batches=3, batch_effect=0.5, seed=4)
    assert list(base.obs["batch"].cat.categories) == ["batch_0", "batch_1", "batch_2"]
    inflated = simulate_programs(
        300, 200, n_programs=5, genes_per_program=10, n_batches=3, batch_effect=0.5, zero_inflation=0.3, seed=4
    )
    assert_sparse_counts(inflated)
    kept = inflated.X.nnz / base.X.nnz
    assert 0.65 < kept < 0.75
    assert (inflated.X > base.X).nnz == 0  # zero inflation only removes counts


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_genes": 50}, "need at least"),
        ({"n_types": 6, "n_programs": 5}, "n_programs"),
        ({"zero_inflation": 1.0}, "zero_inflation"),
    ],
)
def test_programs_reject_impossible_designs(kwargs, message):
    settings = {"n_cells": 10, "n_genes": 300, "n_programs": 5, "genes_per_program": 20, **kwargs}
    with pytest.raises(InputError, match=message):
        simulate_programs(**settings)


def test_binary_benchmark():
    data = simulate_binary(1000, seed=3)
    assert data.shape == (1000, 30)
    assert_sparse_counts(data)
    assert set(np.unique(data.X.data)) == {1.0}
    assert same_data(data, simulate_binary(1000, seed=3))
    assert (data.obs["group"].value_counts() == 250).all()
    signal = data.var["signal_latent"].to_numpy()
    assert list(signal) == [0] * 5 + [1] * 5 + [-1] * 20
    x = data.X.toarray()
    latent = data.obsm["true_latent"]
    group_means = np.asarray(data.uns["simulation"]["group_means"])
    codes = data.obs["group"].cat.codes.to_numpy()
    assert np.allclose(latent.mean(axis=0), 0, atol=0.2)
    assert np.abs(latent - group_means[codes]).mean() < 1.0
    for j in range(10):  # a signal gene follows the sign of its latent; noise genes follow nothing
        agreement = ((x[:, j] > 0) == (latent[:, signal[j]] > 0)).mean()
        assert agreement > 0.75
    assert np.allclose(x[:, 10:].mean(axis=0), 0.5, atol=0.07)
    assert np.abs(np.corrcoef(x[:, 10:].T, latent.T)[-2:, :-2]).max() < 0.15


def test_cli_writes_h5ad(tmp_path):
    out = tmp_path / "binary.h5ad"
    main(["data", "simulate", "--kind", "binary", "--n-cells", "40", "--n-genes", "16", "--seed", "2",
          "--out", str(out)])
    written = ad.read_h5ad(out)
    assert written.shape == (40, 16)
    assert list(written.var["signal_latent"]).count(-1) == 6
    assert same_data(written, simulate_binary(40, n_noise=6, seed=2))
    main(["data", "simulate", "--kind", "binary", "--out", str(out)])  # the benchmark of docs/loglinear.md
    assert same_data(ad.read_h5ad(out), simulate_binary())
    assert ad.read_h5ad(out).shape == (1000, 30)
    out = tmp_path / "programs.h5ad"
    main(["data", "simulate", "--n-cells", "50", "--n-genes", "300", "--n-programs", "6", "--out", str(out)])
    written = ad.read_h5ad(out)
    assert written.var["program"].max() == 5
    assert written.obs["split"].value_counts().to_dict() == {"train": 40, "validation": 5, "test": 5}  # as prepare
    with pytest.raises(SystemExit) as failure:
        main(["data", "simulate", "--kind", "binary", "--n-genes", "4", "--out", str(tmp_path / "x.h5ad")])
    assert failure.value.code == 2
    assert not (tmp_path / "x.h5ad").exists()


def same_file(a: ad.AnnData, b: ad.AnnData) -> bool:
    """Identical counts, annotations, truth and simulation record."""
    record_a, record_b = a.uns["simulation"], b.uns["simulation"]
    return (
        same_data(a, b)
        and record_a.keys() == record_b.keys()
        and all(np.array_equal(record_a[key], record_b[key]) for key in record_a)
    )


@pytest.mark.parametrize(
    "kind, shape, options, chunk_cells",
    [
        ("programs", (700, 300), ["--zero-inflation", "0.2", "--n-batches", "2", "--batch-effect", "0.3"], 130),
        ("raw", (2 * BLOCK_CELLS + 300, 2000), [], BLOCK_CELLS),
    ],
)
def test_streamed_file_equals_in_memory(tmp_path, kind, shape, options, chunk_cells):
    """Forced streaming (any chunk size) writes the same data as the in-memory path."""
    command = ["data", "simulate", "--kind", kind, "--n-cells", str(shape[0]), "--n-genes", str(shape[1]),
               "--seed", "3", *options]
    main([*command, "--out", str(tmp_path / "memory.h5ad")])
    main([*command, "--out", str(tmp_path / "streamed.h5ad"), "--set", "scale.stream_above_mb=0",
          "--set", f"scale.chunk_cells={chunk_cells}"])
    memory, streamed = ad.read_h5ad(tmp_path / "memory.h5ad"), ad.read_h5ad(tmp_path / "streamed.h5ad")
    assert memory.shape == shape
    assert_sparse_counts(streamed)
    assert same_file(memory, streamed)
    assert not any(path.name.startswith(".") for path in tmp_path.iterdir())  # no staging file left


def test_simulate_set_takes_only_scale(tmp_path):
    with pytest.raises(SystemExit) as failure:
        main(["data", "simulate", "--out", str(tmp_path / "x.h5ad"), "--set", "prepare.min_genes=3"])
    assert failure.value.code == 2
    with pytest.raises(SystemExit):
        main(["data", "simulate", "--out", str(tmp_path / "x.h5ad"), "--set", "scale.chunk_cells=0"])
    assert not (tmp_path / "x.h5ad").exists()


@pytest.fixture(scope="module")
def raw() -> ad.AnnData:
    return simulate_raw(1500, 30000, seed=2)


def test_raw_looks_like_droplet_counts(raw):
    assert_sparse_counts(raw)
    assert list(raw.var_names[-len(MT_GENES):]) == list(MT_GENES)
    assert sum(name.startswith("MT-") for name in raw.var_names) == 13
    total = np.asarray(raw.X.sum(axis=1)).ravel()
    detected = np.diff(raw.X.indptr)
    mito = np.asarray(raw.X[:, -len(MT_GENES):].sum(axis=1)).ravel() / total
    damaged = raw.obs["low_quality"].to_numpy()
    assert 0.01 < damaged.mean() < 0.06
    assert 1700 < np.median(total[~damaged]) < 2300
    assert 750 < np.median(detected[~damaged]) < 950
    assert 0.02 < np.median(mito[~damaged]) < 0.04 and np.median(mito[damaged]) > 0.2
    assert np.median(detected[damaged]) < 0.3 * np.median(detected[~damaged])
    codes = raw.obs["cell_type"].cat.codes.to_numpy()
    normalised = raw.X.multiply(1.0 / total[:, None]).tocsc()
    for t in range(5):  # each type's program is up in that type
        genes = (raw.var["program"] == t).to_numpy()
        assert normalised[codes == t][:, genes].mean() > 4 * normalised[codes != t][:, genes].mean()


def test_raw_is_prepare_input(raw):
    """Default MAD QC drops the damaged cells and spares the others; the program genes are highly variable."""
    result = prepare(raw, dict(load_params()["prepare"]), label_key="cell_type", seed=0)
    kept = raw.obs_names.isin(result.obs_names)
    damaged = raw.obs["low_quality"].to_numpy()
    assert kept[damaged].mean() < 0.1 and kept[~damaged].mean() > 0.98
    assert result.n_vars == 2000 and (result.var["program"] >= 0).sum() > 0.9 * 175


def test_raw_rejects_impossible_designs():
    with pytest.raises(InputError, match="MT- genes need"):
        simulate_raw(10, 150, n_programs=5, genes_per_program=30)
