"""`scdgm prepare`: QC limits and their errors, HVG selection keeping planted programs, seeded stratified split."""
import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

from scdgm.errors import InputError, ScdgmError
from scdgm.pipelines.cli import main
from scdgm.pipelines.prepare import SPLITS, prepare, split_cells
from scdgm.pipelines.simulate import simulate_binary, simulate_programs

LOOSE_QC = {"min_genes": 10, "max_genes": None, "min_cells": 3}


@pytest.fixture(scope="module")
def simulated() -> ad.AnnData:
    return simulate_programs(1500, 1000, seed=0)


@pytest.fixture(scope="module")
def prepared(simulated) -> ad.AnnData:
    return prepare(simulated, {**LOOSE_QC, "n_top_genes": 300}, label_key="cell_type", seed=0)


def test_planted_program_genes_are_highly_variable(simulated, prepared):
    assert prepared.n_vars == 300
    program = prepared.var["program"]
    planted = simulated.var["program"].value_counts().drop(-1)
    kept = program[program >= 0].value_counts()
    assert kept.sum() >= 0.9 * planted.sum()
    assert (kept.reindex(planted.index, fill_value=0) >= 0.6 * planted).all()


def test_prepared_counts_labels_and_lineage(simulated, prepared):
    assert sp.isspmatrix_csr(prepared.X) and prepared.X.dtype == np.float32
    assert np.array_equal(prepared.X.data, np.rint(prepared.X.data))
    assert (prepared.layers["counts"] != prepared.X).nnz == 0
    source = simulated[prepared.obs_names, prepared.var_names].X
    assert (source != prepared.X).nnz == 0  # raw counts, untouched
    assert (prepared.obs["cell_type"] == simulated.obs.loc[prepared.obs_names, "cell_type"].astype(str)).all()
    lineage = prepared.uns["scdgm_prepare"]
    assert lineage["n_cells_in"] == 1500 and lineage["n_genes_in"] == 1000
    assert lineage["n_cells_after_qc"] == prepared.n_obs and lineage["n_genes_out"] == 300
    assert lineage["params"]["label_key"] == "cell_type" and lineage["annotated"] is False
    assert "program_activity" in prepared.obsm  # the simulation's truth travels with the cells


def test_split_is_stratified_with_the_requested_fractions(prepared):
    split = prepared.obs["split"]
    assert list(split.cat.categories) == list(SPLITS)
    table = pd.crosstab(prepared.obs["cell_type"], split)
    sizes = table.sum(axis=1)
    for name, fraction in zip(SPLITS, (0.8, 0.1, 0.1), strict=True):
        assert (np.abs(table[name] - fraction * sizes) <= 1).all()


def test_split_is_seeded():
    labels = pd.Series(np.repeat(["a", "b", "c"], [50, 30, 7]))
    fractions = {"train": 0.6, "validation": 0.2, "test": 0.2}
    first = split_cells(labels, fractions, seed=5)
    assert np.array_equal(first, split_cells(labels, fractions, seed=5))
    assert not np.array_equal(first, split_cells(labels, fractions, seed=6))
    single = pd.Series(split_cells(pd.Series(["x"] * 1000), fractions, seed=0)).value_counts()
    assert single.to_dict() == {"train": 600, "validation": 200, "test": 200}


def test_all_genes_kept_when_qc_leaves_fewer_than_requested(caplog):
    data = simulate_binary(400, seed=0)
    result = prepare(data, {**LOOSE_QC, "min_genes": 1, "n_top_genes": 30}, label_key="group")
    assert result.n_vars == 30 and result.var["highly_variable"].all() and "pass QC" not in caplog.text
    data = data[:, :29].copy()  # all 29 genes pass QC; one fewer than asked for: kept, with a warning
    result = prepare(data, {**LOOSE_QC, "min_genes": 1, "n_top_genes": 29}, label_key="group")
    assert result.n_vars == 29
    counts = data.X.toarray()
    counts[:, 0] = 0  # QC drops an undetected gene
    data.X = sp.csr_matrix(counts)
    result = prepare(data, {**LOOSE_QC, "min_genes": 1, "n_top_genes": 29}, label_key="group")
    assert result.n_vars == 28 and "only 28 genes pass QC" in caplog.text


def test_more_variable_genes_than_the_input_has_are_refused():
    data = simulate_binary(400, seed=0)
    with pytest.raises(InputError, match="asks for 2000 highly variable genes but the input has only 30 genes"):
        prepare(data, {**LOOSE_QC, "min_genes": 1, "n_top_genes": 2000}, label_key="group")


def test_qc_reports_drops_per_limit_and_class_and_warns_when_a_class_loses_a_fifth(caplog):
    """A class QC cuts by more than 20% is named in a warning; the counts per limit and per class are kept."""
    rng = np.random.default_rng(1)
    counts = rng.poisson(2.0, (200, 60)).astype(np.float32)
    counts[:40, 20:] = 0  # 40 of the 100 'myeloid' cells detect too few genes for min_genes
    data = ad.AnnData(sp.csr_matrix(counts), var=pd.DataFrame(index=[f"G{i}" for i in range(60)]))
    data.obs["label"] = np.repeat(["myeloid", "lymphoid"], 100)
    result = prepare(data, {"min_genes": 30, "max_genes": None, "min_cells": 3, "n_top_genes": 40}, label_key="label")
    qc = result.uns["scdgm_prepare"]["qc"]
    assert qc["cells_in"] == 200 and qc["cells_dropped"] == 40 and qc["dropped_by"]["min_genes"] == 40
    assert qc["dropped_per_class"] == {"lymphoid": 0, "myeloid": 40}
    assert "QC drops 40 of 100 'myeloid' cells (40%" in caplog.text and "lymphoid" not in caplog.text


def test_too_few_cells_after_qc_for_a_split_is_a_clear_error():
    """7 of 1,500 cells passing (fixed limits on other data) fails, naming the limits, before anything is written."""
    data = simulate_programs(300, 200, seed=0)
    genes = int(np.sort(np.diff(data.X.tocsr().indptr))[-5])  # about five cells detect this many genes
    with pytest.raises(InputError, match=r"only \d of 300 cells pass QC, too few .* at least 20\); cells failing each "
                                         r"limit: min_genes 29\d"):
        prepare(data, {**LOOSE_QC, "min_genes": genes, "n_top_genes": 40}, label_key="cell_type")


def test_mitochondrial_and_gene_count_limits():
    rng = np.random.default_rng(0)
    counts = rng.poisson(1.0, (60, 40)).astype(np.float32)
    counts[:10, :2] = 50  # 10 cells dominated by mitochondrial counts
    counts[10:15] = 0
    counts[10:15, :5] = 1  # 5 cells with too few genes
    names = ["MT-CO1", "mt-Nd1"] + [f"G{i}" for i in range(38)]
    data = ad.AnnData(sp.csr_matrix(counts), var=pd.DataFrame(index=names))
    data.obs["label"] = "x"
    params = {"min_genes": 10, "max_genes": 39, "max_mito_fraction": 0.2, "n_top_genes": 40}
    result = prepare(data, params, label_key="label")
    assert result.n_obs == 45
    assert result.obs["mito_fraction"].max() <= 0.2
    assert result.obs["n_genes"].between(10, 39).all()


@pytest.mark.parametrize(
    "params, message",
    [
        ({"min_genes": 10_000}, r"no cells left after QC.*min_genes=10000"),
        ({"max_mito_fraction": 0.0, "min_genes": 10_000}, r"no cells left after QC.*max_mito_fraction=0.0"),
        ({"min_cells": 10_000}, r"no genes left after QC.*min_cells=10000"),
    ],
)
def test_qc_errors_name_the_threshold(simulated, params, message):
    with pytest.raises(InputError, match=message):
        prepare(simulated, {**LOOSE_QC, "n_top_genes": 300, **params}, label_key="cell_type")


@pytest.mark.parametrize(
    "params, message",
    [
        ({"min_gene": 3}, "unknown prepare parameter"),
        ({"split": {"train": 0.9, "validation": 0.2, "test": 0.1}}, "sum to 1"),
        ({"split": {"training": 1.0}}, "must map train, validation, test"),
        ({"split": {"train": "most", "validation": 0.1, "test": 0.1}}, "fractions must be numbers"),
        ({"n_top_genes": 0}, r"n_top_genes \(--n-top-genes\) must be an integer >= 1, got 0"),
        ({"n_top_genes": 2.5}, "n_top_genes .* must be an integer"),
        ({"min_genes": -1}, "min_genes must be an integer >= 0"),
        ({"max_genes": 0}, "max_genes must be an integer >= 1 or null"),
        ({"max_mito_fraction": -1.0}, r"max_mito_fraction must be in \[0, 1\]"),
        ({"n_neighbors": 1}, "n_neighbors must be an integer >= 2"),
        ({"leiden_resolution": 0}, "leiden_resolution must be a positive number"),
        ({"label_key": 5}, "label_key must be an obs column name"),
    ],
)
def test_bad_parameters(simulated, params, message):
    with pytest.raises(ScdgmError, match=message):
        prepare(simulated, params, label_key="cell_type")


def test_missing_label_column(simulated):
    with pytest.raises(InputError, match="'tissue' not in obs"):
        prepare(simulated, LOOSE_QC, label_key="tissue")


def test_without_labels_non_pbmc_data_is_refused(simulated):
    with pytest.raises(InputError, match="marker genes"):
        prepare(simulated, {**LOOSE_QC, "n_top_genes": 300})


def test_cli_end_to_end(tmp_path):
    raw, out, params = tmp_path / "raw.h5ad", tmp_path / "prepared.h5ad", tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"seed": 3, "prepare": {**LOOSE_QC, "min_genes": 1, "n_top_genes": 30}}))
    main(["data", "simulate", "--kind", "binary", "--n-cells", "200", "--n-genes", "30", "--out", str(raw)])
    main(["prepare", "--input", str(raw), "--out", str(out), "--label-key", "group", "--params", str(params),
          "--set", "prepare.split.test=0.2", "--set", "prepare.split.train=0.7"])
    result = ad.read_h5ad(out)
    assert result.shape == (200, 30)
    lineage = result.uns["scdgm_prepare"]
    assert lineage["input"] == str(raw) and lineage["seed"] == 3
    assert lineage["split_sizes"] == {"train": 140, "validation": 20, "test": 40}
    with pytest.raises(SystemExit) as failure:
        main(["prepare", "--input", str(raw), "--out", str(tmp_path / "x.h5ad"), "--label-key", "nope",
              "--params", str(params)])
    assert failure.value.code == 2
    assert not (tmp_path / "x.h5ad").exists()
