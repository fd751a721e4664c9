"""Test-wide settings: quiet, offline-friendly libraries and a small thread budget (CI has 2 cores); the
session's PBMC 3k pipeline project."""
import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from pbmc_project import PbmcProject, build  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def pbmc_project(tmp_path_factory: pytest.TempPathFactory) -> PbmcProject:
    """The DVC pipeline run once on PBMC 3k with a reduced budget (tests/pbmc_project.py): a registered champion,
    its explanation and metrics, and the data lineage DVC recorded."""
    return build(tmp_path_factory.mktemp("pbmc3k") / "project")
