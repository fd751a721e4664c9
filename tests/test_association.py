"""Association of latents with labels: the latent that carries a planted cell type is found."""
import numpy as np
import pandas as pd
import pytest

from scdgm.errors import InputError
from scdgm.interpret.association import label_latents, latent_association, standardized_mean_differences
from scdgm.pipelines.simulate import simulate_programs

N_TYPES = 4


@pytest.fixture(scope="module")
def planted():
    """Program activities as latents: latent k is the program of cell type k (the last one varies freely)."""
    adata = simulate_programs(1500, 120, n_types=N_TYPES, n_programs=N_TYPES + 1, genes_per_program=10, seed=2)
    return adata.obsm["program_activity"], adata.obs


def test_latent_of_a_cell_type_has_the_highest_mutual_information(planted):
    z, obs = planted
    indicators = pd.DataFrame({t: (obs["cell_type"] == t).astype(str) for t in obs["cell_type"].cat.categories})
    table = latent_association(z, indicators)
    for k, cell_type in enumerate(obs["cell_type"].cat.categories):
        rows = table[table["column"] == cell_type].set_index("latent")
        assert rows["mutual_information"].idxmax() == f"latent_{k}"
        assert rows["f_statistic"].idxmax() == f"latent_{k}"
    free = table[table["latent"] == f"latent_{N_TYPES}"]
    assert (free["mutual_information"] < 0.05).all()


def test_label_latents_names_each_type_latent_with_its_direction(planted):
    z, obs = planted
    table = label_latents(z, obs["cell_type"])
    assert table["latent"].tolist() == [f"latent_{k}" for k in range(N_TYPES)]
    assert (table["smd"] > 2).all()
    assert table["n_cells"].sum() == len(obs)
    smd = standardized_mean_differences(z, obs["cell_type"])
    assert smd.shape == (N_TYPES, N_TYPES + 1)


def test_numeric_covariates_and_errors(planted):
    z, obs = planted
    table = latent_association(z, obs, columns=["cell_type", "library_size", "batch"])
    assert set(table["column"]) == {"cell_type", "library_size"}  # a one-level batch column is skipped
    assert set(table.loc[table["column"] == "library_size", "kind"]) == {"numeric"}
    assert np.isfinite(table["mutual_information"]).all()
    with pytest.raises(InputError, match="no column"):
        latent_association(z, obs, columns=["nope"])
