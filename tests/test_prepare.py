"""`scdgm prepare`: QC (MAD outliers by default, fixed limits on request) and its errors, HVG selection keeping
planted programs, seeded stratified split."""
import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

from scdgm.errors import InputError, ScdgmError
from scdgm.pipelines.cli import main
from scdgm.pipelines.prepare import DEFAULTS, SPLITS, prepare, split_cells
from scdgm.pipelines.simulate import simulate_binary, simulate_programs

LOOSE_QC = {"qc": "fixed", "min_genes": 10, "max_genes": None, "min_cells": 3}


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
    result = prepare(data, {**LOOSE_QC, "min_genes": 30, "n_top_genes": 40}, label_key="label")
    qc = result.uns["scdgm_prepare"]["qc"]
    assert qc["cells_in"] == 200 and qc["cells_dropped"] == 40 and qc["dropped_by"]["min_genes"] == 40
    assert qc["dropped_per_class"] == {"lymphoid": 0, "myeloid": 40}
    assert "QC drops 40 of 100 'myeloid' cells (40%" in caplog.text and "lymphoid" not in caplog.text


def test_too_few_cells_after_qc_for_a_split_is_a_clear_error():
    """7 of 1,500 cells passing (fixed limits on other data) fails, naming the limits, before anything is written."""
    data = simulate_programs(300, 200, seed=0)
    genes = int(np.sort(np.diff(data.X.tocsr().indptr))[-5])  # about five cells detect this many genes
    with pytest.raises(InputError, match=r"only \d of 300 cells pass QC, too few .* at least 20\); cells failing each "
                                         r"limit: min_genes \(n_genes < \d+\) 29\d"):
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
    params = {"qc": "fixed", "min_genes": 10, "max_genes": 39, "max_mito_fraction": 0.2, "n_top_genes": 40}
    result = prepare(data, params, label_key="label")
    assert result.n_obs == 45
    assert result.obs["mito_fraction"].max() <= 0.2
    assert result.obs["n_genes"].between(10, 39).all()


def with_mito_genes(data: ad.AnnData, fractions: np.ndarray, seed: int, n_mito: int = 5) -> ad.AnnData:
    """`data` with `n_mito` MT- genes appended, holding about `fractions` of each cell's counts (Poisson)."""
    rng = np.random.default_rng(seed)
    total = np.asarray(data.X.sum(axis=1)).ravel()
    mito = rng.poisson((total * fractions / (1 - fractions) / n_mito)[:, None], (data.n_obs, n_mito))
    genes = pd.DataFrame(index=[*map(str, data.var_names), *(f"MT-{i}" for i in range(n_mito))])
    return ad.AnnData(sp.hstack([data.X, sp.csr_matrix(mito, dtype=np.float32)]).tocsr(), obs=data.obs.copy(), var=genes)


def test_mad_qc_keeps_a_small_simulation_the_fixed_limits_empty():
    """Cells detecting ~130 genes are normal here: the MAD default keeps nearly all; min_genes 200 keeps 4 of 1500."""
    data = simulate_programs(1500, 300, seed=0)
    with pytest.raises(InputError, match=r"only 4 of 1500 cells pass QC.*n_genes < 200\) 1496"):
        prepare(data, {"qc": "fixed", "n_top_genes": 100}, label_key="cell_type")
    result = prepare(data, {"n_top_genes": 100}, label_key="cell_type")
    qc = result.uns["scdgm_prepare"]["qc"]
    assert qc["mode"] == "mad" and result.n_obs >= 1480
    assert qc["skipped"] == {"mito_fraction": "no MT- genes"}
    assert set(qc["thresholds"]) == {"total_counts_low", "total_counts_high", "n_genes_low", "n_genes_high"}
    genes = np.diff(data.X.tocsr().indptr)
    low, high = qc["thresholds"]["n_genes_low"], qc["thresholds"]["n_genes_high"]
    assert qc["dropped_by"]["n_genes_low"] == (genes < low).sum() and qc["dropped_by"]["n_genes_high"] == (genes > high).sum()
    assert low < np.median(genes) < high


def test_mad_qc_cuts_outliers_but_not_a_cell_type_with_more_mitochondrial_reads(caplog):
    """type_2 has 3x the MT- share of the others (6% vs 2%): fixed max 5% cuts it, the log-scale MADs do not;
    cells with 60% MT- reads or 10x the library are dropped by the limit meant for them."""
    rng = np.random.default_rng(3)
    data = simulate_programs(900, 300, n_types=3, n_programs=3, seed=2)
    dying, huge = np.arange(0, 900, 150), np.arange(1, 900, 150)
    data.X = sp.csr_matrix(data.X.multiply(np.where(np.isin(np.arange(900), huge), 10, 1)[:, None]), dtype=np.float32)
    third = (data.obs["cell_type"] == "type_2").to_numpy()
    fractions = np.exp(rng.normal(np.log(np.where(third, 0.06, 0.02)), 0.3))
    fractions[dying] = 0.6
    data = with_mito_genes(data, fractions, seed=4)
    result = prepare(data, {"n_top_genes": 100}, label_key="cell_type")
    qc = result.uns["scdgm_prepare"]["qc"]
    assert not set(map(str, data.obs_names[np.r_[dying, huge]])) & set(result.obs_names)
    assert qc["dropped_by"]["mito_fraction_high"] >= dying.size and qc["dropped_by"]["total_counts_high"] >= huge.size
    assert 0.06 < qc["thresholds"]["mito_fraction_high"] < 0.6 and qc["skipped"] == {}
    assert qc["cells_dropped"] <= 1.02 * (dying.size + huge.size) + 10
    assert qc["dropped_per_class"]["type_2"] <= 0.05 * third.sum() and "QC drops" not in caplog.text
    fixed = prepare(data, {"qc": "fixed", "min_genes": 10, "n_top_genes": 100}, label_key="cell_type")
    assert fixed.uns["scdgm_prepare"]["qc"]["dropped_per_class"]["type_2"] > 0.5 * third.sum()
    assert "'type_2' cells" in caplog.text
    ceiling = prepare(data, {"mito_ceiling": 0.04, "n_top_genes": 100}, label_key="cell_type")
    qc = ceiling.uns["scdgm_prepare"]["qc"]
    assert qc["thresholds"]["mito_ceiling"] == 0.04 and ceiling.obs["mito_fraction"].max() <= 0.04


def test_a_metric_without_spread_is_not_filtered():
    """MAD 0 (most cells share a value) gives no outlier limit: nothing is flagged by it, and the report says so."""
    counts = np.zeros((100, 40), dtype=np.float32)
    counts[:, :20] = 1  # 2 MT- genes and 18 others per cell: identical metrics...
    counts[90:, 2:20] = 0  # ...but for 10 cells with only the 2 MT- genes (MADs stay 0: 90 cells share the median)
    counts[90:, 20:30] = 5
    data = ad.AnnData(sp.csr_matrix(counts), var=pd.DataFrame(index=["MT-CO1", "MT-ND1", *(f"G{i}" for i in range(38))]))
    data.obs["label"] = "x"
    result = prepare(data, {"n_top_genes": 30}, label_key="label")
    qc = result.uns["scdgm_prepare"]["qc"]
    assert result.n_obs == 100 and qc["cells_dropped"] == 0 and qc["thresholds"] == {}
    assert set(qc["skipped"]) == {"total_counts", "n_genes", "mito_fraction"}
    assert all(why.startswith("MAD is 0") for why in qc["skipped"].values())


def test_fixed_qc_applies_exactly_the_packaged_fixed_limits():
    """qc: fixed keeps min_genes <= genes detected <= max_genes and MT- fraction <= max_mito_fraction (200, 2500, 5%)."""
    rng = np.random.default_rng(7)
    n_cells, n_genes = 120, 3000
    detected = rng.integers(150, 2700, n_cells)
    counts = sp.lil_matrix((n_cells, n_genes), dtype=np.float32)
    for cell, k in enumerate(detected):
        counts[cell, rng.choice(np.arange(2, n_genes), k, replace=False)] = rng.integers(1, 4, k)
    mito = rng.integers(0, 12, n_cells) * detected * 2 / 100  # about 0-11% of a cell's counts
    counts[:, 0] = np.ceil(mito)[:, None]
    counts[:, 1] = np.floor(mito)[:, None]
    data = ad.AnnData(counts.tocsr(), var=pd.DataFrame(index=["MT-CO1", "MT-ND1", *(f"G{i}" for i in range(n_genes - 2))]))
    data.obs["label"] = "x"
    csr = data.X.tocsr()
    genes = np.diff(csr.indptr)
    fraction = np.asarray(csr[:, :2].sum(axis=1)).ravel() / np.asarray(csr.sum(axis=1)).ravel()
    expected = (genes >= 200) & (genes <= 2500) & (fraction <= 0.05)
    assert 20 < expected.sum() < 100
    result = prepare(data, {"qc": "fixed", "n_top_genes": 50}, label_key="label")
    qc = result.uns["scdgm_prepare"]["qc"]
    assert list(result.obs_names) == list(data.obs_names[expected])
    assert qc["thresholds"] == {"min_genes": 200, "max_genes": 2500, "max_mito_fraction": 0.05}
    assert {k: DEFAULTS[k] for k in qc["thresholds"]} == qc["thresholds"]
    assert qc["dropped_by"] == {"min_genes": (genes < 200).sum(), "max_genes": (genes > 2500).sum(),
                                "max_mito_fraction": (fraction > 0.05).sum()}


@pytest.mark.parametrize(
    "setting, named",
    [
        ("prepare.qc=median", "prepare.qc must be one of mad, fixed, got 'median'"),
        ("prepare.nmads=-1", "prepare.nmads must be a positive number, got -1"),
        ("prepare.mito_nmads=0", "prepare.mito_nmads must be a positive number, got 0"),
        ("prepare.mito_ceiling=8", "prepare.mito_ceiling must be in [0, 1] or null, got 8"),
    ],
)
def test_bad_qc_settings_exit_2_with_one_line(setting, named, tmp_path, capsys):
    raw, out = tmp_path / "raw.h5ad", tmp_path / "prepared.h5ad"
    simulate_programs(120, 30, n_types=2, n_programs=2, genes_per_program=5, seed=1).write_h5ad(raw)
    with pytest.raises(SystemExit) as failure:
        main(["prepare", "--input", str(raw), "--out", str(out), "--label-key", "cell_type", "--set", setting])
    lines = capsys.readouterr().err.strip().splitlines()
    assert failure.value.code == 2 and len(lines) == 1 and named in lines[0]
    assert not out.exists()


@pytest.mark.parametrize(
    "params, message",
    [
        ({"min_genes": 10_000}, r"no cells left after QC.*qc=fixed limits \(a cell fails one when n_genes < 10000\)"),
        ({"qc": "mad", "nmads": 1e-9}, r"no cells left after QC.*qc=mad limits .*total_counts < \d+.*Raise prepare.nmads"),
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
        ({"mito_ceiling": 1.5}, r"mito_ceiling must be in \[0, 1\] or null, got 1.5"),
        ({"qc": "median"}, "prepare.qc must be one of mad, fixed, got 'median'"),
        ({"nmads": 0}, "prepare.nmads must be a positive number, got 0"),
        ({"mito_nmads": "3"}, "prepare.mito_nmads must be a positive number, got '3'"),
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


STREAM = ["--set", "scale.stream_above_mb=0", "--set", "scale.chunk_cells=97"]


@pytest.fixture(scope="module")
def raw_like(tmp_path_factory) -> tuple:
    """A raw-like .h5ad: simulated programs with MT- genes, 12 dying cells (most reads MT-), an explicit zero,
    labels in obs and a per-cell obsm; and a params file asking for 150 highly variable genes."""
    folder = tmp_path_factory.mktemp("stream")
    data = simulate_programs(700, 400, seed=1)
    fractions = np.random.default_rng(1).uniform(0.02, 0.06, data.n_obs)
    fractions[::60] = 0.7
    raw = with_mito_genes(data, fractions, seed=1)
    raw.obsm["program_activity"] = data.obsm["program_activity"]
    raw.uns["source"] = "simulated"
    raw.X.data[5] = 0  # stored zeros are not detected genes
    path, params = folder / "raw.h5ad", folder / "params.yaml"
    raw.write_h5ad(path)
    params.write_text(yaml.safe_dump({"prepare": {"n_top_genes": 150}}))
    return folder, path, params


def test_streaming_prepare_equals_the_in_memory_one(raw_like):
    folder, path, params = raw_like
    outputs = {}
    for name, extra in (("memory", []), ("stream", STREAM)):
        outputs[name] = folder / f"{name}.h5ad"
        main(["prepare", "--input", str(path), "--out", str(outputs[name]), "--label-key", "cell_type",
              "--params", str(params), *extra])
    memory, stream = (ad.read_h5ad(outputs[name]) for name in ("memory", "stream"))
    lineage = memory.uns["scdgm_prepare"]
    assert lineage["qc"]["cells_dropped"] >= 12 and lineage["n_genes_out"] == 150 < lineage["n_genes_after_qc"]
    assert list(stream.obs_names) == list(memory.obs_names) and list(stream.var_names) == list(memory.var_names)
    pd.testing.assert_frame_equal(stream.obs, memory.obs)  # n_genes, total_counts, mito_fraction, cell_type, split
    pd.testing.assert_frame_equal(stream.var, memory.var)  # highly_variable, its rank, means, variances...
    for layer in (stream.X, stream.layers["counts"]):
        assert sp.isspmatrix_csr(layer) and layer.dtype == np.float32 and (layer != memory.X).nnz == 0
    assert np.array_equal(stream.obsm["program_activity"], memory.obsm["program_activity"])
    assert sorted(stream.uns) == sorted(memory.uns) == ["hvg", "scdgm_prepare", "source"]
    assert stream.uns["scdgm_prepare"].keys() == lineage.keys()
    for key, value in lineage.items():
        assert str(stream.uns["scdgm_prepare"][key]) == str(value), key  # str: arrays read back inside dicts


def test_streaming_prepare_needs_labels_and_names_a_bad_count(raw_like, capsys):
    folder, path, params = raw_like
    with pytest.raises(SystemExit) as failure:
        main(["prepare", "--input", str(path), "--out", str(folder / "x.h5ad"), "--params", str(params), *STREAM])
    assert failure.value.code == 2
    assert "give --label-key (an obs column with the labels) or raise scale.stream_above_mb" in capsys.readouterr().err
    bad = ad.read_h5ad(path)
    bad.X.data[bad.X.indptr[500]] = 2.5  # in the sixth chunk of 97 cells
    bad.write_h5ad(folder / "bad.h5ad")
    with pytest.raises(SystemExit) as failure:
        main(["prepare", "--input", str(folder / "bad.h5ad"), "--out", str(folder / "x.h5ad"), "--label-key",
              "cell_type", "--params", str(params), *STREAM])
    assert failure.value.code == 2
    message = capsys.readouterr().err
    assert "bad.h5ad" in message and f"cell {bad.obs_names[500]!r}, gene {bad.var_names[bad.X.indices[bad.X.indptr[500]]]!r}" in message
    assert not (folder / "x.h5ad").exists()
