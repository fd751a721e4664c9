"""Ray for the jobs that run on it (`scdgm tune`, `scdgm train --workers`): join a running cluster by address,
checked to answer first, or start a private local Ray for the job."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray

from scdgm.errors import InputError, ScdgmError

RAY_ENVIRONMENT = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true"}
CONNECT_SECONDS = 5.0
"""How long the head's port may take to answer before an address counts as unreachable (ray.init itself
retries for minutes)."""


def check_reachable(address: str) -> None:
    """Refuse an address that is not HOST:PORT (optionally ray://) or whose port does not answer; 'auto' (the
    cluster started on this machine) is left to Ray."""
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--address must be HOST:PORT (or 'auto'), got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS):
            pass
    except OSError as error:
        raise ScdgmError(f"no Ray cluster answers at {address}: {error.strerror or error}") from None


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Join the Ray cluster at `address`, or start a private local Ray (own short temp dir, no dashboard);
    reuse Ray when the caller already started it. Shuts down only what it started (its temp dir too), also
    when a signal stops the job; a SIGTERM handler set before (the CLI's) stays in place, where ray.init
    would put its own (exit at once, no clean-up)."""
    for key, value in RAY_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        yield
        return
    if address:
        check_reachable(address)
    options: dict[str, Any] = {
        "runtime_env": {"env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true"}},
        "logging_level": logging.WARNING,
        "log_to_driver": False,
    }
    temp_dir = None
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        if address:
            try:
                ray.init(address=address, **options)
            except ConnectionError as error:
                raise ScdgmError(f"cannot join the Ray cluster at {address}: {error}") from None
        else:
            temp_dir = tempfile.mkdtemp(prefix="scdgm-ray-", dir="/tmp")  # unix socket paths must stay short
            ray.init(
                num_cpus=num_cpus or len(os.sched_getaffinity(0)), include_dashboard=False, _temp_dir=temp_dir,
                **options,
            )
        if sigterm not in (signal.SIG_DFL, signal.SIG_IGN, None) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)
        yield
    finally:
        ray.shutdown()
        if temp_dir:
            remove_folder(temp_dir)


def remove_folder(path: str, seconds: float = 10.0) -> None:
    """Remove folder `path`, trying again while Ray's exiting processes still write their last logs into it."""
    deadline = time.monotonic() + seconds
    while True:
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path) or time.monotonic() > deadline:
            return
        time.sleep(0.1)
