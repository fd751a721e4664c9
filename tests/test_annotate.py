"""Marker-based PBMC annotation: the marker table, naming of planted types, `unknown` for weak or ambiguous
clusters, skipped types, FACS-sorted PBMC 68k (installed with scanpy) and the real PBMC 3k labels."""
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scdgm.defaults import default_section
from scdgm.errors import InputError, ScdgmError
from scdgm.pipelines.annotate import UNKNOWN, annotate_by_markers, load_markers
from scdgm.pipelines.prepare import prepare
from scdgm.pipelines.simulate import simulate_programs

DOCUMENTED = {  # docs/data.md: the PBMC markers
    "naive CD4 T": {"CCR7", "LEF1"},
    "memory CD4 T": {"IL7R", "S100A4"},
    "CD8 T": {"CD8A", "CD8B", "CD3E"},
    "B": {"MS4A1", "CD79A", "CD79B"},
    "CD14+ monocytes": {"CD14", "LYZ", "S100A8", "FCN1"},
    "FCGR3A+ monocytes": {"FCGR3A", "MS4A7", "CDKN1C", "HES4"},
    "NK": {"GNLY", "NKG7", "KLRD1"},
    "dendritic cells": {"FCER1A", "CST3", "CLEC10A"},
    "platelets": {"PPBP", "PF4"},
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
PREPARE = default_section("prepare")


def test_marker_table_is_the_documented_one():
    markers = load_markers()
    assert {t: set(genes) for t, genes in markers.items()} == DOCUMENTED
    assert all(2 <= len(genes) <= 4 for genes in markers.values())


def planted(plan: dict[int, list[str]], seed: int = 0) -> ad.AnnData:
    """Five simulated types; type t's program genes renamed to the marker genes plan[t] (type 4 keeps none)."""
    data = simulate_programs(800, 400, n_types=5, n_programs=5, genes_per_program=20, seed=seed)
    names = list(data.var_names)
    for t, genes in plan.items():
        members = np.flatnonzero(data.var["program"].to_numpy() == t)
        for position, gene in zip(members, genes, strict=False):
            names[position] = gene
    data.var_names = names
    return data


def test_planted_types_get_their_marker_names():
    types = {0: "CD8 T", 1: "B", 2: "NK", 3: "CD14+ monocytes", 4: "platelets"}
    markers = load_markers()
    data = planted({t: markers[name] for t, name in types.items()})
    truth = data.obs["cell_type"].astype(str).map({f"type_{t}": n for t, n in types.items()}).to_numpy()
    table = annotate_by_markers(data, n_pcs=20, seed=0)  # annotation overwrites obs['cell_type']
    assert (data.obs["cell_type"].astype(str).to_numpy() == truth).mean() > 0.97
    assert table["n_cells"].sum() == data.n_obs
    assert set(table.index) == set(data.obs["leiden"].cat.categories)
    assert (table["reason"] == "assigned").all() and (table["best_score"] > 0.9).all()
    evidence = data.uns["scdgm_annotation"]
    assert set(evidence["scores"].columns) == set(types.values())  # types without markers in the data are left out
    assert (evidence["scores"].idxmax(axis=1) == table["cell_type"]).all()
    thresholds = {"min_markers": "annotation_min_markers", "min_score": "annotation_min_score",
                  "min_margin": "annotation_min_margin", "n_neighbors": "n_neighbors",
                  "resolution": "leiden_resolution"}
    assert {k: evidence["params"][k] for k in thresholds} == {k: PREPARE[v] for k, v in thresholds.items()}


def test_unclear_clusters_are_unknown_and_skipped_types_reported(tmp_path, caplog):
    markers = load_markers()
    plan = {
        0: markers["B"],
        1: markers["NK"],
        2: ["FCGR3A"],  # FCGR3A+ monocytes with one marker: skipped; FCGR3A alone must not name type_2
        3: markers["CD14+ monocytes"] + markers["dendritic cells"],  # two types at full strength: ambiguous
    }  # type_4 has no marker at all: weak
    data = planted(plan)
    truth = data.obs["cell_type"].astype(str).to_numpy()
    with caplog.at_level(logging.WARNING, logger="scdgm.pipelines.annotate"):
        table = annotate_by_markers(data, n_pcs=20, seed=0)
    named = data.obs["cell_type"].astype(str).to_numpy()
    majority = pd.crosstab(truth, named).idxmax(axis=1).to_dict()
    assert majority == {"type_0": "B", "type_1": "NK", "type_2": UNKNOWN, "type_3": UNKNOWN, "type_4": UNKNOWN}
    assert (named[truth == "type_0"] == "B").mean() > 0.97 and (named[truth == "type_1"] == "NK").mean() > 0.97
    reasons = pd.crosstab(truth, data.obs["leiden"].astype(str).map(table["reason"])).idxmax(axis=1)
    assert reasons[["type_2", "type_3", "type_4"]].tolist() == ["weak", "ambiguous", "weak"]
    ambiguous = table[table["reason"] == "ambiguous"].iloc[0]
    assert {ambiguous["best"], ambiguous["second"]} == {"CD14+ monocytes", "dendritic cells"}
    assert ambiguous["margin"] < PREPARE["annotation_min_margin"] <= ambiguous["best_score"]
    evidence = data.uns["scdgm_annotation"]
    coverage = evidence["markers"]
    assert not coverage.loc["FCGR3A+ monocytes", "scored"]
    assert coverage.loc["FCGR3A+ monocytes", ["used", "missing"]].tolist() == ["FCGR3A", "MS4A7,CDKN1C,HES4"]
    assert "FCGR3A+ monocytes" not in evidence["scores"].columns and "FCGR3A+ monocytes" not in named
    assert coverage.loc["B", ["used", "missing", "scored"]].tolist() == ["MS4A1,CD79A,CD79B", "", True]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "skips" in warned and "FCGR3A+ monocytes (missing MS4A7,CDKN1C,HES4)" in warned
    unknown = table[table["cell_type"] == UNKNOWN]
    assert f"names {unknown['n_cells'].sum()} cells in {len(unknown)} cluster(s) '{UNKNOWN}'" in warned
    data.write_h5ad(tmp_path / "annotated.h5ad")  # the evidence stays h5ad-writable
    back = ad.read_h5ad(tmp_path / "annotated.h5ad").uns["scdgm_annotation"]
    pd.testing.assert_frame_equal(back["clusters"], table, check_dtype=False)
    assert back["markers"].loc["FCGR3A+ monocytes", "missing"] == "MS4A7,CDKN1C,HES4"


def test_one_high_marker_cannot_name_a_cluster():
    markers = load_markers()
    data = planted({0: markers["B"], 1: markers["NK"], 2: ["FCGR3A"], 3: ["MS4A7"]})  # MS4A7 present, elsewhere
    truth = data.obs["cell_type"].astype(str).to_numpy()
    table = annotate_by_markers(data, markers={**markers, "FCGR3A+ monocytes": ["FCGR3A", "MS4A7"]}, n_pcs=20)
    assert data.uns["scdgm_annotation"]["markers"].loc["FCGR3A+ monocytes", "scored"]
    levels = data.uns["scdgm_annotation"]["marker_levels"]
    fcgr3a_cluster = levels["FCGR3A"].idxmax()
    assert levels.loc[fcgr3a_cluster, "FCGR3A"] == 1.0 and levels.loc[fcgr3a_cluster, "MS4A7"] < 0.5
    assert table.loc[fcgr3a_cluster, "best_score"] < 0.1  # the mean alone (0.5) would have named it
    assert table.loc[fcgr3a_cluster, ["reason", "cell_type"]].tolist() == ["weak", UNKNOWN]
    assert (data.obs["cell_type"].astype(str).to_numpy()[truth == "type_2"] == UNKNOWN).mean() > 0.97


@pytest.mark.parametrize(
    "thresholds, message",
    [
        ({"min_markers": 0}, r"annotation_min_markers must be an integer >= 1, got 0"),
        ({"min_markers": 1.5}, r"annotation_min_markers must be an integer >= 1"),
        ({"min_score": 1.5}, r"annotation_min_score must be a number in \[0, 1\], got 1.5"),
        ({"min_margin": "0.1"}, r"annotation_min_margin must be a number in \[0, 1\], got '0.1'"),
    ],
)
def test_bad_thresholds_are_refused(thresholds, message):
    data = simulate_programs(50, 200, n_programs=5, genes_per_program=10, seed=0)
    with pytest.raises(ScdgmError, match=message):
        annotate_by_markers(data, **thresholds)


def test_bad_thresholds_are_refused_by_prepare():
    markers = load_markers()
    data = planted({t: markers[n] for t, n in enumerate(["B", "NK", "CD8 T", "platelets", "dendritic cells"])})
    loose = {"qc": "fixed", "min_genes": 0, "max_genes": None, "max_mito_fraction": None, "n_top_genes": 200}
    with pytest.raises(ScdgmError, match="prepare.annotation_min_score must be"):
        prepare(data, {**loose, "annotation_min_score": -0.1})


def pbmc68k_counts() -> ad.AnnData:
    """scanpy's FACS-labelled PBMC 68k subset (700 cells, 765 genes) back as counts, bulk_labels kept."""
    import scanpy as sc

    reduced = sc.datasets.pbmc68k_reduced()
    counts = np.rint(np.expm1(reduced.raw.X.toarray()) * reduced.obs["n_counts"].to_numpy()[:, None] / 1e4)
    var = pd.DataFrame(index=reduced.raw.var_names)
    return ad.AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=reduced.obs[["bulk_labels"]].copy(), var=var)


def test_sorted_nk_cells_are_not_named_monocytes(caplog):
    data = pbmc68k_counts()  # MS4A7, CDKN1C, CD14, KLRD1, LEF1 and the platelet markers are absent
    with caplog.at_level(logging.WARNING, logger="scdgm.pipelines.annotate"):
        annotate_by_markers(data)
    named = data.obs["cell_type"].astype(str)
    nk = named[data.obs["bulk_labels"] == "CD56+ NK"]
    assert nk.size == 31 and (nk == "NK").mean() > 0.9 and not nk.str.contains("monocytes").any()
    coverage = data.uns["scdgm_annotation"]["markers"]
    assert coverage.loc["FCGR3A+ monocytes", "used"] == "FCGR3A,HES4"  # scored: HES4 must agree with FCGR3A
    assert not coverage.loc["naive CD4 T", "scored"] and not coverage.loc["platelets", "scored"]
    assert "naive CD4 T (missing LEF1)" in caplog.text
    b_cells = named[data.obs["bulk_labels"] == "CD19+ B"]
    assert (b_cells.isin(["B", UNKNOWN])).mean() > 0.95
    # With the two-marker FCGR3A+ list of old (MS4A7 absent here) FCGR3A alone once named 178 cells; now it names none.
    old_table = {**load_markers(), "FCGR3A+ monocytes": ["FCGR3A", "MS4A7"]}
    annotate_by_markers(data, markers=old_table)
    assert "FCGR3A+ monocytes" not in set(data.obs["cell_type"].astype(str))
    assert not data.uns["scdgm_annotation"]["markers"].loc["FCGR3A+ monocytes", "scored"]


def test_data_without_markers_is_refused():
    data = simulate_programs(50, 200, n_programs=5, genes_per_program=10, seed=0)
    with pytest.raises(InputError, match="no cell type has 2 of its marker genes"):
        annotate_by_markers(data)


@pytest.mark.slow
def test_pbmc3k_annotation_finds_the_known_types():
    from scdgm.pipelines.fetch import load_pbmc3k

    result = prepare(load_pbmc3k(), {}, seed=0)  # default QC, 2000 HVGs, annotation by markers
    assert 2600 <= result.n_obs <= 2700 and result.n_vars == 2000
    sizes = result.obs["cell_type"].value_counts()
    plausible = [t for t, n in EXPECTED_PBMC3K.items() if n / 2 <= sizes.get(t, 0) <= n * 2]
    assert len(plausible) == len(EXPECTED_PBMC3K), sizes.to_dict()  # naive and memory CD4 T told apart
    assert sizes.get(UNKNOWN, 0) <= 0.02 * result.n_obs, sizes.to_dict()
    assert result.uns["scdgm_prepare"]["annotated"] is True
    for cell_type in ("B", "NK", "CD14+ monocytes"):  # HVG-level check that labels follow expression
        gene = {"B": "MS4A1", "NK": "GNLY", "CD14+ monocytes": "LYZ"}[cell_type]
        column = result[:, gene].X.toarray().ravel()
        inside = result.obs["cell_type"].to_numpy() == cell_type
        assert column[inside].mean() > 5 * column[~inside].mean()
