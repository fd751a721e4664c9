"""Sweep figures only where the completed trials support them: with too few, no file (an old one is removed)
and a one-line note instead; importances come from completed trials only."""
from __future__ import annotations

import warnings

import optuna
import pytest

from scdgm.pipelines.sweep import HISTORY_MIN_COMPLETED, IMPORTANCE_MIN_COMPLETED, SweepSettings, optuna_plots

DISTRIBUTIONS = {"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True),
                 "n_latent": optuna.distributions.IntDistribution(2, 8)}


def study_with(tmp_path, states: list[str]) -> SweepSettings:
    """A stored study of model ldvae with one trial per state (seeded parameters, per-epoch values)."""
    settings = SweepSettings(models=["ldvae"], data="unused.h5ad", name="figures", storage=f"sqlite:///{tmp_path / 'o.db'}")
    study = optuna.create_study(study_name="figures", storage=settings.storage, direction="minimize")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([settings.metric])
    for number, state in enumerate(states):
        params = {"lr": 10 ** (-3 + number * 0.3), "n_latent": 2 + number % 5}
        values = [100.0 - number - epoch for epoch in range(3)]
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions=DISTRIBUTIONS, intermediate_values=dict(enumerate(values)),
            value=min(values) if state == "COMPLETE" else None, state=optuna.trial.TrialState[state],
        ))
    return settings


def test_one_completed_trial_gives_curves_and_notes_only(tmp_path):
    settings = study_with(tmp_path, ["COMPLETE", "PRUNED", "PRUNED", "PRUNED", "PRUNED", "FAIL"])
    stale = tmp_path / "ldvae_importance.png"
    stale.write_bytes(b"an earlier sweep's figure")
    written, notes = optuna_plots(settings, "ldvae", tmp_path)
    assert [p.name for p in written] == ["ldvae_curves.png"]
    assert not stale.exists() and not (tmp_path / "ldvae_history.png").exists()
    assert notes == [
        f"ldvae: no history plot: 1 of 6 trials completed (the others were pruned or failed); it needs {HISTORY_MIN_COMPLETED}",
        f"ldvae: no importance plot: 1 of 6 trials completed (the others were pruned or failed); it needs {IMPORTANCE_MIN_COMPLETED}",
    ]


@pytest.mark.parametrize("completed", [IMPORTANCE_MIN_COMPLETED - 1, IMPORTANCE_MIN_COMPLETED])
def test_history_and_importance_at_their_thresholds(tmp_path, completed):
    settings = study_with(tmp_path, ["COMPLETE"] * completed + ["PRUNED"] * 3)
    written, notes = optuna_plots(settings, "ldvae", tmp_path)
    drawn = {p.name for p in written}
    assert {"ldvae_history.png", "ldvae_curves.png"} <= drawn and all(p.stat().st_size > 0 for p in written)
    assert ("ldvae_importance.png" in drawn) == (completed >= IMPORTANCE_MIN_COMPLETED)
    assert len(notes) == (0 if completed >= IMPORTANCE_MIN_COMPLETED else 1)
