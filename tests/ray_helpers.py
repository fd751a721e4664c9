"""Ray clusters for tests: a local cluster of two nodes (a head and one worker node, one CPU each), as a
multi-machine cluster looks to Ray, in its own short temp dir; stopped (with its folder) on the way out."""
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import ray
from ray.cluster_utils import Cluster


def free_port() -> int:
    """A TCP port of 127.0.0.1 nothing listens on (at the time of asking)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def two_node_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """Start the cluster; RAY_TMPDIR (also where Ray notes the "current cluster" address) points into its
    temp dir while it runs. This process is not connected to it: join with its `address`."""
    temp_dir = tempfile.mkdtemp(prefix="ray_", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", temp_dir)
    os.makedirs(os.path.join(temp_dir, "ray"))
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "temp_dir": temp_dir, "include_dashboard": False})
    try:
        nodes.add_node(num_cpus=1, temp_dir=temp_dir)
        nodes.wait_for_nodes()
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
