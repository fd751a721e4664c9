"""Marker-based PBMC annotation: the marker table, naming of planted types, and the real PBMC 3k labels."""
import numpy as np
import pytest

from scdgm.errors import InputError
from scdgm.pipelines.annotate import annotate_by_markers, load_markers
from scdgm.pipelines.prepare import prepare
from scdgm.pipelines.simulate import simulate_programs

DOCUMENTED = {  # docs/data.md: the standard PBMC 3k markers
    "naive CD4 T": {"CCR7"},
    "memory CD4 T": {"S100A4"},
    "CD8 T": {"CD8A"},
    "B": {"MS4A1", "CD79A"},
    "CD14+ monocytes": {"CD14", "LYZ"},
    "FCGR3A+ monocytes": {"FCGR3A", "MS4A7"},
    "NK": {"GNLY", "NKG7"},
    "dendritic cells": {"FCER1A", "CST3"},
    "platelets": {"PPBP"},
}
EXPECTED_PBMC3K = {  # approximate sizes from the Seurat/scanpy PBMC 3k tutorials
    "naive CD4 T": 700,
    "memory CD4 T": 480,
    "CD14+ monocytes": 480,
    "B": 340,
    "CD8 T": 270,
    "FCGR3A+ monocytes": 160,
    "NK": 155,
    "dendritic cells": 30,
    "platelets": 14,
}


def test_marker_table_holds_the_documented_markers():
    markers = load_markers()
    assert set(markers) == set(DOCUMENTED)
    for cell_type, genes in DOCUMENTED.items():
        assert genes <= set(markers[cell_type])
    assert all(len(genes) <= 4 for genes in markers.values())


def test_planted_types_get_their_marker_names():
    data = simulate_programs(800, 400, n_types=5, n_programs=5, genes_per_program=20, seed=0)
    planted = {"type_0": "CD8 T", "type_1": "B", "type_2": "NK", "type_3": "CD14+ monocytes", "type_4": "platelets"}
    markers = load_markers()
    names = list(data.var_names)
    for t, cell_type in enumerate(planted.values()):  # rename some of program t's genes to the type's markers
        members = np.flatnonzero(data.var["program"].to_numpy() == t)
        for position, gene in zip(members, markers[cell_type], strict=False):
            names[position] = gene
    data.var_names = names
    truth = data.obs["cell_type"].astype(str).map(planted).to_numpy()  # annotation overwrites obs['cell_type']
    table = annotate_by_markers(data, n_pcs=20, seed=0)
    assert (data.obs["cell_type"].astype(str).to_numpy() == truth).mean() > 0.97
    assert table["n_cells"].sum() == data.n_obs
    assert set(table.index) == set(data.obs["leiden"].cat.categories)
    evidence = data.uns["scdgm_annotation"]
    assert set(evidence["scores"].columns) == set(planted.values())  # types without markers in the data are left out
    assert evidence["params"]["seed"] == 0
    assert (evidence["scores"].idxmax(axis=1) == table["cell_type"]).all()


def test_data_without_markers_is_refused():
    data = simulate_programs(50, 200, n_programs=5, genes_per_program=10, seed=0)
    with pytest.raises(InputError, match="none of the marker genes"):
        annotate_by_markers(data)


@pytest.mark.slow
def test_pbmc3k_annotation_finds_the_known_types():
    from scdgm.pipelines.fetch import load_pbmc3k

    result = prepare(load_pbmc3k(), {}, seed=0)  # default QC, 2000 HVGs, annotation by markers
    assert 2600 <= result.n_obs <= 2700 and result.n_vars == 2000
    sizes = result.obs["cell_type"].value_counts()
    plausible = [t for t, n in EXPECTED_PBMC3K.items() if n / 2 <= sizes.get(t, 0) <= n * 2]
    assert len(plausible) >= 7, sizes.to_dict()
    assert result.uns["scdgm_prepare"]["annotated"] is True
    for cell_type in ("B", "NK", "CD14+ monocytes"):  # HVG-level check that labels follow expression
        gene = {"B": "MS4A1", "NK": "GNLY", "CD14+ monocytes": "LYZ"}[cell_type]
        column = result[:, gene].X.toarray().ravel()
        inside = result.obs["cell_type"].to_numpy() == cell_type
        assert column[inside].mean() > 5 * column[~inside].mean()
