"""Data larger than memory: chunked .h5ad reading and writing (scdgm.chunked), batches drawn from disk
(models.data.StreamBatches), and `scdgm train/embed/sample/explain` on a streamed file (forced with
`--set scale.stream_above_mb=0`) against the same commands in memory."""
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from docblocks import blocks
from repo import REPO_ROOT
from tracking_helpers import isolated_tracking

from scdgm.chunked import H5adRows, H5adWriter
from scdgm.errors import ScdgmError
from scdgm.models import create_model, load_model
from scdgm.models.data import StreamBatches, StreamedCounts
from scdgm.pipelines.cli import main
from scdgm.pipelines.prepare import split_cells
from scdgm.pipelines.simulate import simulate_programs

FAST = ["--set", "max_epochs=3", "--set", "progress=false", "--set", "n_importance=5"]
STREAM = ["--set", "scale.stream_above_mb=0", "--set", "scale.chunk_cells=150"]


@pytest.fixture(scope="module", autouse=True)
def tracking_store(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        yield isolated_tracking(patch, tmp_path_factory.mktemp("mlflow"))


@pytest.fixture(scope="module")
def cells() -> ad.AnnData:
    adata = simulate_programs(700, 60, seed=3, genes_per_program=6)
    adata.obs["split"] = split_cells(adata.obs["cell_type"], {"train": 0.8, "validation": 0.1, "test": 0.1}, 3)
    return adata


@pytest.fixture(scope="module")
def data_file(cells, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "cells.h5ad"
    cells.write_h5ad(path)
    return path


class CountingRows:
    """A RowSource over an in-memory matrix that records the largest read: the bound streaming promises."""

    def __init__(self, matrix: sp.csr_matrix) -> None:
        self.matrix, self.largest, self.reads = matrix, 0, 0

    @property
    def n_cells(self) -> int:
        return self.matrix.shape[0]

    @property
    def n_genes(self) -> int:
        return self.matrix.shape[1]

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        self.largest, self.reads = max(self.largest, stop - start), self.reads + 1
        return self.matrix[start:stop]


def test_writer_appends_chunks_into_a_plain_h5ad_and_leaves_nothing_on_failure(cells, tmp_path):
    path = tmp_path / "out.h5ad"
    with H5adWriter(path, cells.n_vars, layers=("counts",)) as writer:
        for start in range(0, cells.n_obs, 256):
            writer.append(cells.X[start : start + 256])
        writer.finish(cells.obs, cells.var, {"X_test": np.ones((cells.n_obs, 2))}, {"note": "chunked"})
    back = ad.read_h5ad(path)
    assert (back.X != cells.X).nnz == 0 and (back.layers["counts"] != cells.X).nnz == 0
    assert back.obs.equals(cells.obs) and back.uns["note"] == "chunked" and back.obsm["X_test"].shape == (700, 2)
    with H5adRows(path) as rows:
        assert rows.shape == cells.shape and rows.nnz == cells.X.nnz
        assert (rows.read(100, 333) != cells.X[100:333]).nnz == 0
    with pytest.raises(ScdgmError, match="unfinished"), H5adWriter(tmp_path / "half.h5ad", cells.n_vars) as writer:
        writer.append(cells.X[:10])
    with pytest.raises(RuntimeError), H5adWriter(tmp_path / "broken.h5ad", cells.n_vars) as writer:
        writer.append(cells.X[:10])
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5ad"]


def test_shuffled_stream_batches_see_every_cell_once_per_epoch_in_a_new_order(cells):
    source = CountingRows(sp.csr_matrix(cells.X, dtype=np.float32))
    genes = list(cells.var_names)
    keep = np.flatnonzero(cells.obs["split"].to_numpy() == "train")
    counts = StreamedCounts(source, genes, rows=keep, chunk_cells=100)
    batches = StreamBatches(counts, batch_size=32, shuffle=True, seed=1)
    epochs = [[b.index.numpy() for b in batches] for _ in range(2)]
    for epoch in epochs:
        seen = np.concatenate(epoch)
        assert sorted(seen.tolist()) == list(range(keep.size))
        assert [len(i) for i in epoch[:-1]] == [32] * (len(epoch) - 1)
    assert not np.array_equal(np.concatenate(epochs[0]), np.concatenate(epochs[1]))
    assert source.largest <= 100
    again = StreamBatches(counts, batch_size=32, shuffle=True, seed=1)
    assert np.array_equal(np.concatenate([b.index.numpy() for b in again]), np.concatenate(epochs[0]))
    first = next(iter(StreamBatches(counts, batch_size=32, shuffle=True, seed=1)))
    expected = cells.X[keep[first.index.numpy()]].toarray()
    assert np.array_equal(first.x.numpy(), expected)
    assert len(StreamBatches(counts, batch_size=32, shuffle=True, drop_last=True)) == keep.size // 32


def test_fit_streamed_reads_at_most_chunk_cells_at_once_and_learns(cells):
    source = CountingRows(sp.csr_matrix(cells.X, dtype=np.float32))
    counts = StreamedCounts(source, list(cells.var_names), chunk_cells=64)
    model = create_model("vae", {"max_epochs": 15, "progress": False, "seed": 0})
    history = model.fit_streamed(counts, cells.obs)
    assert source.largest <= 64
    losses = [epoch["validation_loss"] for epoch in history.epochs]
    assert losses[-1] < 0.95 * losses[0]
    in_memory = create_model("vae", {"max_epochs": 15, "progress": False, "seed": 0})
    in_memory.fit(cells)
    reference = in_memory.history.epochs[-1]["validation_loss"]
    assert abs(losses[-1] - reference) / reference < 0.05
    embedding = model.embed_counts(counts)
    assert np.allclose(embedding.mean, model.embed(cells, key_added=None).mean)


def test_streamed_commands_match_in_memory_ones(data_file, cells, tmp_path, capsys):
    model = tmp_path / "vae"
    main(["train", "--model", "vae", "--data", str(data_file), "--out", str(model), *FAST, *STREAM])
    assert "(streamed from disk)" in capsys.readouterr().out
    assert load_model(model).metadata["metrics"]["knn_accuracy"] > 0.5
    outputs = {}
    for mode, extra in {"streamed": STREAM, "memory": []}.items():
        embedded, drawn = tmp_path / f"embedded-{mode}.h5ad", tmp_path / f"drawn-{mode}.h5ad"
        main(["embed", "--model", str(model), "--data", str(data_file), "--out", str(embedded), *extra])
        main(["sample", "--model", str(model), "--data", str(data_file), "--out", str(drawn), "--draws", "2", *extra])
        outputs[mode] = ad.read_h5ad(embedded), ad.read_h5ad(drawn)
    (embedded, drawn), (embedded_memory, drawn_memory) = outputs["streamed"], outputs["memory"]
    assert np.array_equal(embedded.obsm["X_scdgm"], embedded_memory.obsm["X_scdgm"])
    assert (embedded.X != cells.X).nnz == 0 and embedded.uns["scdgm_embed"]["kind"] == "vae"
    assert (drawn.X != drawn_memory.X).nnz == 0 and drawn.n_obs == 2 * cells.n_obs
    pd.testing.assert_frame_equal(drawn.obs, drawn_memory.obs)
    assert np.array_equal(drawn.obsm["X_scdgm"], drawn_memory.obsm["X_scdgm"])


def test_streamed_explanation_reads_only_max_cells(data_file, tmp_path, capsys):
    model = tmp_path / "vae"
    main(["train", "--model", "vae", "--data", str(data_file), "--out", str(model), *FAST])
    main(["explain", "--model", str(model), "--data", str(data_file), "--n-genes", "2", "--permutations", "0",
          "--draws", "1", *STREAM, "--set", "explain.max_cells=300", "--set", "explain.plots=false"])
    out = capsys.readouterr().out
    assert "explained on 300 cells (a seeded random subset of 700: explain.max_cells), 300 posterior draws" in out


def fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_streamed_bad_inputs_fail_in_one_line(cells, tmp_path, capsys):
    column_major = tmp_path / "csc.h5ad"
    ad.AnnData(X=sp.csc_matrix(cells.X), obs=cells.obs, var=cells.var).write_h5ad(column_major)
    out = tmp_path / "model"
    assert "stored column-major (CSC)" in fails(
        ["train", "--model", "vae", "--data", str(column_major), "--out", str(out), *FAST, *STREAM], capsys)
    normalised = tmp_path / "normalised.h5ad"
    ad.AnnData(X=sp.csr_matrix(cells.X * 0.5), obs=cells.obs, var=cells.var).write_h5ad(normalised)
    assert "non-integer values" in fails(
        ["train", "--model", "vae", "--data", str(normalised), "--out", str(out), *FAST, *STREAM], capsys)
    good = tmp_path / "good.h5ad"
    cells.write_h5ad(good)
    assert "scale.chunk_cells must be a whole number" in fails(
        ["embed", "--model", str(out), "--data", str(good), "--out", str(tmp_path / "e.h5ad"),
         "--set", "scale.chunk_cells=0"], capsys)
    assert not out.exists() and not (tmp_path / "e.h5ad").exists()


def test_scale_docs_run_as_written(tmp_path):
    """docs/scale.md's walk-through, verbatim, in a folder of its own with the scdgm of this environment."""
    (script,) = blocks(REPO_ROOT / "docs" / "scale.md", "## Streaming a file larger than memory", "bash")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SCDGM_")) and k != "VIRTUAL_ENV"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("(streamed from disk)") == 3
    project = tmp_path / "atlas-project"
    for output in ("atlas-vae/explanation/explanation.json", "atlas-embedded.h5ad", "atlas-draws.h5ad", "mlflow.db"):
        assert (project / output).exists(), output
    assert ad.read_h5ad(project / "atlas-embedded.h5ad").obsm["X_scdgm"].shape == (3000, 10)
