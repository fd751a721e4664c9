"""Every user error is one line on stderr and exit code 2, and leaves no output: damaged model folders (embed,
serve), out-of-range options and --set values, counts beyond what float32 holds exactly, and training into an
existing model folder without --overwrite. All through the real CLI entry point, in-process."""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from tracking_helpers import isolated_tracking

from scdgm.errors import InputError, ScdgmError
from scdgm.models import DBM, PCA, VAE, WGAN, create_model, load_model
from scdgm.models.base import GenerativeModel
from scdgm.models.data import MAX_COUNT, validate_counts
from scdgm.pipelines.cli import main
from scdgm.pipelines.prepare import split_cells
from scdgm.pipelines.simulate import simulate_programs
from scdgm.pipelines.train import save_model_dir, train_model
from scdgm.serving.loadgen import free_port

FAST = {"max_epochs": 2, "progress": False, "n_importance": 2, "n_hidden": 16}


@pytest.fixture(scope="module", autouse=True)
def tracking_store(tmp_path_factory):
    """`scdgm train` records an MLflow run: keep this module's runs in a store of its own."""
    with pytest.MonkeyPatch.context() as patch:
        yield isolated_tracking(patch, tmp_path_factory.mktemp("mlflow"))


@pytest.fixture(scope="module")
def cells() -> ad.AnnData:
    adata = simulate_programs(200, 40, n_types=3, n_programs=3, genes_per_program=5, seed=3)
    adata.obs["split"] = split_cells(adata.obs["cell_type"], {"train": 0.8, "validation": 0.1, "test": 0.1}, 3)
    return adata


@pytest.fixture(scope="module")
def data_file(cells, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "cells.h5ad"
    cells.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def models(cells, tmp_path_factory) -> dict[str, Path]:
    """A small VAE and PCA saved as model directories (the library path: no MLflow run)."""
    folder = tmp_path_factory.mktemp("models")
    saved = {}
    for kind, params in (("vae", FAST), ("pca", {"n_latent": 3})):
        model, metrics = train_model(kind, cells, params)
        saved[kind] = save_model_dir(model, metrics, folder / kind)
    return saved


def refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI; expect exit code 2 and exactly one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Names in `folder` (staging folders of the atomic writer included)."""
    return sorted(p.name for p in folder.iterdir())


# --- damaged model folders -------------------------------------------------------------------------------
def _edit_config(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        document = json.loads((directory / "config.json").read_text())
        change(document)
        (directory / "config.json").write_text(json.dumps(document))

    return damage


def _weights(content: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def damage(directory: Path) -> None:
        path = directory / "weights.safetensors"
        path.write_bytes(content(path.read_bytes()))

    return damage


def _short_genes(directory: Path) -> None:
    genes = (directory / "genes.txt").read_text().splitlines()
    (directory / "genes.txt").write_text("\n".join(genes[:-1]) + "\n")


DAMAGES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    # name: (damage, file named, problem named)
    "truncated weights": (_weights(lambda b: b[: len(b) // 2]), "weights.safetensors", "not a readable safetensors"),
    "empty weights": (_weights(lambda b: b""), "weights.safetensors", "not a readable safetensors"),
    "random weights": (_weights(lambda b: os.urandom(len(b))), "weights.safetensors", "not a readable safetensors"),
    "n_latent edited": (_edit_config(lambda d: d["config"].update(n_latent=7)), "weights.safetensors", "shape"),
    "short genes.txt": (_short_genes, "weights.safetensors", "shape"),
    "missing genes.txt": (lambda d: (d / "genes.txt").unlink(), "genes.txt", "missing"),
    "empty genes.txt": (lambda d: (d / "genes.txt").write_text(""), "genes.txt", "empty"),
    "config not JSON": (lambda d: (d / "config.json").write_text("{kind: vae"), "config.json", "not readable JSON"),
    "config without kind": (_edit_config(lambda d: d.pop("kind")), "config.json", "'kind'"),
    "config without config": (_edit_config(lambda d: d.pop("config")), "config.json", "'config'"),
    "config out of range": (_edit_config(lambda d: d["config"].update(n_latent=0)), "config.json", "n_latent"),
}


def damaged_copy(source: Path, target: Path, damage: Callable[[Path], None]) -> Path:
    shutil.copytree(source, target)
    damage(target)
    return target


@pytest.mark.parametrize("kind", ["vae", "pca"])
@pytest.mark.parametrize("name", list(DAMAGES))
def test_embed_with_a_damaged_model_folder_is_one_line(kind, name, models, data_file, tmp_path, capsys):
    damage, file_named, problem = DAMAGES[name]
    model = damaged_copy(models[kind], tmp_path / "model", damage)
    out = tmp_path / "embedded.h5ad"
    message = refused(["embed", "--model", str(model), "--data", str(data_file), "--out", str(out)], capsys)
    assert file_named in message and problem in message, message
    assert not out.exists() and leftovers(tmp_path) == ["model"]
    with pytest.raises(ScdgmError):
        GenerativeModel.load(model)  # the library refuses it the same way


@pytest.mark.parametrize("name", ["n_latent edited", "random weights", "config not JSON"])
def test_serve_refuses_a_damaged_model_before_listening(name, models, tmp_path, capsys):
    damage, file_named, _ = DAMAGES[name]
    model = damaged_copy(models["vae"], tmp_path / "model", damage)
    message = refused(["serve", "--model-uri", str(model), "--port", str(free_port()), "--no-access-log"], capsys)
    assert file_named in message


# --- out-of-range options and --set values --------------------------------------------------------------
@pytest.mark.parametrize(
    "model, setting, named",
    [
        ("vae", "max_epochs=0", "max_epochs must be at least 1"),
        ("pca", "n_latent=0", "n_latent must be at least 1"),
        ("vae", "n_latent=0", "n_latent must be at least 1"),
        ("vae", "batch_size=0", "batch_size must be at least 1"),
        ("ae", "batch_size=-5", "batch_size must be at least 1"),
        ("vae", "lr=0", "lr must be a positive number"),
        ("gan", "lr=-0.001", "lr must be a positive number"),
        ("vae", "dropout=1.0", "dropout must be in [0, 1)"),
        ("ae", "dropout=-0.1", "dropout must be in [0, 1)"),
        ("vae", "likelihood=gaussian", "likelihood: expected one of 'nb', 'zinb', 'poisson'"),
        ("vae", "patience=0", "patience must be at least 1"),
        ("dbm", "n_chains=0", "n_chains must be at least 1"),
        ("gan", "betas=[0.5]", "betas must be two numbers"),
        ("vae", "device=gpu7", "device must be"),
    ],
)
def test_out_of_range_hyperparameters_are_refused(model, setting, named, data_file, tmp_path, capsys):
    out = tmp_path / "model"
    message = refused(["train", "--model", model, "--data", str(data_file), "--out", str(out), "--set", setting], capsys)
    assert named in message
    assert not any(tmp_path.iterdir())


def test_the_library_refuses_the_same_values():
    for build in (
        lambda: VAE(max_epochs=0),
        lambda: VAE(dropout=1.5),
        lambda: create_model("pca", {"n_latent": 0}),
        lambda: PCA(method="svd"),
        lambda: WGAN(gp_weight=-1.0),
        lambda: DBM(n_hidden1=0),
        lambda: VAE({"lr": float("nan")}),
        lambda: VAE(max_epochs=2.5),
    ):
        with pytest.raises(ScdgmError):
            build()
    assert VAE(max_epochs=1).config.max_epochs == 1  # the edge of the domain is accepted
    assert VAE(max_epochs=1e3).config.max_epochs == 1000  # a whole float is an int (MLflow passes 400.0)


@pytest.fixture(scope="module")
def raw_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("raw") / "raw.h5ad"
    simulate_programs(120, 30, n_types=2, n_programs=2, genes_per_program=5, seed=1).write_h5ad(path)
    return path


@pytest.mark.parametrize(
    "options, named",
    [
        (["--n-top-genes", "0"], "n_top_genes (--n-top-genes) must be an integer >= 1, got 0"),
        (["--set", "prepare.n_top_genes=0"], "n_top_genes (--n-top-genes) must be an integer >= 1, got 0"),
        (["--n-top-genes", "100000"], "asks for 100000 highly variable genes but the input has only 30 genes"),
        (["--set", "prepare.min_cells=-1"], "prepare.min_cells must be an integer >= 0"),
        (["--set", "prepare.max_mito_fraction=2"], "prepare.max_mito_fraction must be in [0, 1]"),
    ],
)
def test_prepare_out_of_range_is_refused(options, named, raw_file, tmp_path, capsys):
    out = tmp_path / "prepared.h5ad"
    message = refused(["prepare", "--input", str(raw_file), "--out", str(out), "--label-key", "cell_type", *options], capsys)
    assert named in message
    assert not any(tmp_path.iterdir())


def test_explain_with_zero_genes_is_refused(models, data_file, tmp_path, capsys):
    out = tmp_path / "explanation"
    argv = ["explain", "--model", str(models["vae"]), "--data", str(data_file), "--out", str(out)]
    assert "n_genes" in refused([*argv, "--set", "explain.n_genes=0"], capsys)
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--n-genes", "0"])
    assert exit_info.value.code == 2
    assert not out.exists()


# --- counts beyond float32 --------------------------------------------------------------------------------
def test_counts_beyond_float32_are_refused_everywhere(cells, tmp_path, capsys):
    huge = cells.copy()
    huge.X = sp.csr_matrix(huge.X, dtype=np.float64)
    huge.X[3, 2] = 1e12
    path = tmp_path / "huge.h5ad"
    huge.write_h5ad(path)
    out = tmp_path / "model"
    message = refused(["train", "--model", "pca", "--data", str(path), "--out", str(out)], capsys)
    assert "1 counts above 2**24" in message and "gene 'gene_03'" in message
    prepared = tmp_path / "prepared.h5ad"
    assert "above 2**24" in refused(["prepare", "--input", str(path), "--out", str(prepared), "--label-key", "cell_type"], capsys)
    assert leftovers(tmp_path) == ["huge.h5ad"]
    with pytest.raises(InputError, match=r"above 2\*\*24"):
        VAE(**FAST).fit(huge)  # the notebook path: model.fit checks the same way
    at_limit = ad.AnnData(sp.csr_matrix(np.array([[MAX_COUNT, 0], [1, 2]], dtype=np.int64)))
    validate_counts(at_limit)  # 2**24 itself is exact in float32
    above = ad.AnnData(np.array([[MAX_COUNT + 1, 0], [1, 2]], dtype=np.int64))
    with pytest.raises(InputError, match=r"above 2\*\*24"):
        validate_counts(above)


# --- training into an existing model folder ---------------------------------------------------------------
def test_training_into_an_existing_model_needs_overwrite(data_file, tmp_path, capsys):
    out = tmp_path / "model"
    argv = ["train", "--model", "pca", "--data", str(data_file), "--out", str(out), "--set", "n_latent=3"]
    main(argv)
    (out / "explanation").mkdir()
    (out / "explanation" / "explanation.json").write_text("{}")
    config = (out / "config.json").read_text()
    message = refused([*argv[:-1], "n_latent=4"], capsys)
    assert "already holds a model" in message and "explanation" in message and "--overwrite" in message
    assert (out / "config.json").read_text() == config and (out / "explanation" / "explanation.json").is_file()
    main([*argv[:-1], "n_latent=4", "--overwrite"])
    assert load_model(str(out)).n_latent == 4 and not (out / "explanation").exists()
    assert leftovers(tmp_path) == ["model"]  # replaced in one rename: no staging folder left
    with pytest.raises(ScdgmError, match="--overwrite"):
        save_model_dir(load_model(str(out)), {}, out)  # the library refuses too, unless asked
