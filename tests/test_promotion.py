"""Production moves only on purpose: registration makes a candidate, `@champion` moves when the promotion rule
passes on the same evaluation cells (or with --force), and explain/evaluate/register are runs of their own that
leave the finished training run as it was. A tiny tracked LDVAE in a SQLite store of its own."""
import hashlib
import json
from pathlib import Path

import mlflow
import pytest
from tracking_helpers import isolated_tracking, runs_by_role, write_tiny_prepared

from scdgm.defaults import default_section
from scdgm.errors import ScdgmError
from scdgm.pipelines import tracking
from scdgm.pipelines.cli import main
from scdgm.pipelines.evaluate import cells_fingerprint
from scdgm.pipelines.io import read_counts
from scdgm.pipelines.registry import PromotionRule, register

EXPLAIN = ["--permutations", "0", "--set", "explain.plots=false", "--set", "explain.prior_cells=0",
           "--set", "explain.attribution_cells=20", "--set", "explain.stability_boot=0"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """(uri, data, model dir, explanation, metrics.json) of a tracked tiny LDVAE, explained and evaluated."""
    folder = tmp_path_factory.mktemp("promotion")
    data = write_tiny_prepared(folder / "tiny.h5ad")
    with pytest.MonkeyPatch.context() as monkeypatch:
        uri = isolated_tracking(monkeypatch, folder)
        model, explanation, metrics = folder / "ldvae", folder / "explanation", folder / "metrics.json"
        main(["train", "--model", "ldvae", "--data", str(data), "--out", str(model),
              "--set", "max_epochs=3", "--set", "progress=false", "--set", "n_latent=3"])
        main(["explain", "--model", str(model), "--data", str(data), "--out", str(explanation), "--n-genes", "3", *EXPLAIN])
        main(["evaluate", "--model", str(model), "--data", str(data), "--explanation", str(explanation),
              "--out", str(metrics), "--history", str(folder / "history.csv"), "--figures", str(folder / "figures")])
    return uri, data, model, explanation, metrics


def with_figure(metrics: Path, out: Path, accuracy: float, cells: str | None = None) -> Path:
    """A copy of evaluate's metrics.json with test.label_accuracy (and the cells' fingerprint) replaced."""
    document = json.loads(metrics.read_text())
    document["test"]["label_accuracy"] = accuracy
    if cells is not None:
        document["evaluated_on"]["cells"] = cells
    out.write_text(json.dumps(document))
    return out


def register_cli(name: str, model: Path, explanation: Path, metrics: Path | None, out: Path, *extra: str) -> dict:
    main(["register", "--model", str(model), "--explanation", str(explanation), "--name", name, "--alias", "champion",
          "--out", str(out), *(["--metrics", str(metrics)] if metrics else []), *extra])
    return json.loads(out.read_text())


def aliases(uri: str, name: str) -> dict[str, str]:
    client = mlflow.MlflowClient(uri)
    return {alias: str(client.get_model_version_by_alias(name, alias).version) for alias in ("champion", "candidate")}


def test_champion_moves_only_when_the_rule_passes_or_when_forced(project, monkeypatch, tmp_path, capsys):
    uri, _, model, explanation, metrics = project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    name = "rule-ldvae"
    first = register_cli(name, model, explanation, with_figure(metrics, tmp_path / "m1.json", 0.637), tmp_path / "r1.json")
    assert first["promoted"] and first["version"] == "1" and "no champion yet" in first["decision"]["reason"]
    assert aliases(uri, name) == {"champion": "1", "candidate": "1"}

    capsys.readouterr()
    worse = register_cli(name, model, explanation, with_figure(metrics, tmp_path / "m2.json", 0.617), tmp_path / "r2.json")
    printed = capsys.readouterr().out
    assert not worse["promoted"] and worse["version"] == "2" and worse["champion_version"] == "1"
    assert aliases(uri, name) == {"champion": "1", "candidate": "2"}
    decision = worse["decision"]
    assert (decision["candidate_value"], decision["champion_value"], decision["champion_version"]) == (0.617, 0.637, "1")
    assert decision["rule"] == "test.label_accuracy max, min_delta 0" and "not better" in decision["reason"]
    assert "models:/rule-ldvae@champion stays on version 1" in printed and "0.617 vs champion version 1's 0.637" in printed
    tags = mlflow.MlflowClient(uri).get_model_version(name, "2").tags
    assert tags["scdgm.promotion.decision"] == "kept" and tags["scdgm.promotion.reason"] == decision["reason"]
    assert tags["scdgm.metric.test.label_accuracy"] == "0.617"
    logged = mlflow.MlflowClient(uri).get_run(worse["registration_run_id"]).data.params
    assert logged["promotion.promoted"] == "False" and logged["promotion.champion_value"] == "0.637"

    better = register_cli(name, model, explanation, with_figure(metrics, tmp_path / "m3.json", 0.7), tmp_path / "r3.json")
    assert better["promoted"] and aliases(uri, name) == {"champion": "3", "candidate": "3"}

    forced = register_cli(name, model, explanation, with_figure(metrics, tmp_path / "m4.json", 0.1), tmp_path / "r4.json",
                          "--force")
    assert forced["promoted"] and "--force" in forced["decision"]["reason"]
    assert aliases(uri, name) == {"champion": "4", "candidate": "4"}

    unmeasured = register_cli(name, model, explanation, None, tmp_path / "r5.json")
    assert not unmeasured["promoted"] and "no test.label_accuracy" in unmeasured["decision"]["reason"]
    assert aliases(uri, name) == {"champion": "4", "candidate": "5"}


def test_figures_on_other_cells_are_not_compared(project, monkeypatch, tmp_path):
    uri, data, model, explanation, metrics = project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    adata = read_counts(data)
    fingerprint = json.loads(metrics.read_text())["evaluated_on"]["cells"]
    assert cells_fingerprint(data, adata, "test") == fingerprint
    other = cells_fingerprint(data, adata, "validation")
    assert other != fingerprint
    register_cli("cells-ldvae", model, explanation, with_figure(metrics, tmp_path / "m1.json", 0.5), tmp_path / "r1.json")
    moved = register_cli("cells-ldvae", model, explanation, with_figure(metrics, tmp_path / "m2.json", 0.9, other),
                         tmp_path / "r2.json")
    assert not moved["promoted"] and aliases(uri, "cells-ldvae") == {"champion": "1", "candidate": "2"}
    assert "other cells" in moved["decision"]["reason"] and other in moved["decision"]["reason"]


def test_metrics_of_another_model_are_refused(project, monkeypatch, tmp_path):
    uri, _, model, explanation, metrics = project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    document = json.loads(metrics.read_text())
    document["evaluated_on"]["model_run_id"] = "0" * 32
    (tmp_path / "other.json").write_text(json.dumps(document))
    with pytest.raises(ScdgmError, match="evaluated the model of run 0+, not of run"):
        register("other-ldvae", model_dir=model, explanation=explanation, metrics=tmp_path / "other.json")


def snapshot(uri: str, run_id: str, folder: Path) -> dict[str, str]:
    """sha256 of every artifact file of `run_id`, by path."""
    local = Path(mlflow.MlflowClient(uri).download_artifacts(run_id, "", str(folder)))
    return {str(p.relative_to(local)): hashlib.sha256(p.read_bytes()).hexdigest() for p in local.rglob("*") if p.is_file()}


def test_later_stages_are_runs_of_their_own_and_leave_the_training_run_as_it_was(project, monkeypatch, tmp_path):
    uri, data, model, explanation, _ = project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(uri)
    train_id = tracking.RunRecord.read(model).run_id
    before, run_before = snapshot(uri, train_id, tmp_path / "before"), client.get_run(train_id)
    assert any(path.startswith("model_files/") for path in before)

    again = tmp_path / "explanation-2"
    main(["explain", "--model", str(model), "--data", str(data), "--out", str(again), "--n-genes", "2", *EXPLAIN])
    main(["evaluate", "--model", str(model), "--data", str(data), "--explanation", str(again),
          "--out", str(tmp_path / "metrics.json"), "--history", str(tmp_path / "h.csv"), "--figures", str(tmp_path / "f")])
    register("rerun-ldvae", model_dir=model, explanation=again, metrics=tmp_path / "metrics.json")

    assert snapshot(uri, train_id, tmp_path / "after") == before
    run_after = client.get_run(train_id)
    assert run_after.data.metrics == run_before.data.metrics and run_after.data.params == run_before.data.params
    assert run_after.info.status == "FINISHED"
    models = mlflow.search_logged_models(experiment_ids=[run_after.info.experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{train_id}'")
    assert len(models) == 1  # the training's own pyfunc; registration logs into its own run

    explains = {r.info.run_id: r for r in runs_by_role(uri, "explain")}
    first, second = tracking.RunRecord.read(explanation).run_id, tracking.RunRecord.read(again).run_id
    assert first != second and {first, second} <= set(explains)
    for run_id in (first, second):
        run = explains[run_id]
        assert run.data.tags["scdgm.model_run_id"] == train_id and run.data.tags["mlflow.parentRunId"] == train_id
        assert run.info.status == "FINISHED"
    assert (explains[first].data.params["explain.n_genes"], explains[second].data.params["explain.n_genes"]) == ("3", "2")
    assert "explanation/explanation.json" in {a.path for a in client.list_artifacts(second, "explanation")}
    evaluation = [r for r in runs_by_role(uri, "evaluate")
                  if r.data.params.get("evaluated_on.explanation_run_id") == second]
    assert len(evaluation) == 1 and evaluation[0].data.tags["scdgm.model_run_id"] == train_id
    assert "test_label_accuracy" in evaluation[0].data.metrics


def test_promotion_rule_defaults_and_checks():
    packaged = default_section("register")
    assert PromotionRule.from_params(packaged) == PromotionRule()
    assert {k: packaged[k] for k in ("promote_metric", "promote_mode", "min_delta")} == PromotionRule().__dict__
    lower = PromotionRule(promote_metric="test.nll_elbo", promote_mode="min", min_delta=0.5)
    assert lower.beats(10.0, 11.0) and not lower.beats(10.6, 11.0) and not PromotionRule().beats(0.5, 0.5)
    with pytest.raises(ScdgmError, match="max or min"):
        PromotionRule.from_params({"promote_mode": "best"})
    with pytest.raises(ScdgmError, match="min_delta"):
        PromotionRule.from_params({"min_delta": -1})
