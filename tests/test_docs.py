"""The documentation runs as written: the Python quickstart in docs/python-api.md, executed verbatim."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
from docblocks import blocks
from repo import REPO_ROOT

API = REPO_ROOT / "docs" / "python-api.md"


@pytest.mark.slow
def test_python_quickstart_runs_verbatim(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    quickstart, = blocks(API, "## Quickstart", "python")
    previous = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace: dict = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exec(compile(quickstart, str(API), "exec"), namespace)  # noqa: S102 - the documentation is the test
    finally:
        os.chdir(previous)
    assert any("validation" in str(w.message) for w in caught), "the automatic split is announced"
    adata, explanation = namespace["adata"], namespace["explanation"]
    assert adata.obsm["X_scdgm"].shape == (adata.n_obs, 10)
    assert len(explanation.selected_genes) == 6 == len(adata.uns["scdgm_explanation"]["selected_genes"])
    assert namespace["labels"].shape == (100,)
    assert (tmp_path / "vae-model" / "config.json").is_file()
    assert (tmp_path / "vae-model" / "explanation" / "explanation.json").is_file()
    assert namespace["reloaded"].genes == namespace["model"].genes


def test_capability_example_runs(tmp_path: Path) -> None:
    """The declared-capability snippet runs against a fitted linear model."""
    example, = blocks(API, "## The models and what they declare", "python")
    from scdgm.models import LDVAE
    from scdgm.pipelines.simulate import simulate_programs

    model = LDVAE(n_latent=3, max_epochs=2, progress=False)
    model.fit(simulate_programs(200, 40, n_types=2, n_programs=3, genes_per_program=5, seed=0))
    exec(compile(example, str(API), "exec"), {"model": model})  # noqa: S102
