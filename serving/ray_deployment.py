"""The same FastAPI app as a Ray Serve deployment: R replicas, each with its own CPUs/GPUs and its own copy
of the model (loaded by the app's lifespan when the replica starts).

The app is built on the replica (late-bound ingress), so only the settings travel to it, never a model.
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray
from ray import serve

from scdgm.serving.app import create_app
from scdgm.serving.settings import ServeSettings

APP_NAME = "scdgm"


@serve.ingress()
class ScdgmDeployment:
    """One replica: holds the settings; Ray Serve calls `__serve_build_asgi_app__` and runs its lifespan."""

    def __init__(self, settings_json: str) -> None:
        self.settings = ServeSettings.from_json(settings_json)

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.settings, echo_request_id=False)  # Serve's proxy echoes X-Request-ID itself


def application(settings: ServeSettings) -> Any:
    """The bound Ray Serve application: `settings.replicas` replicas with their CPUs and GPUs."""
    deployment = serve.deployment(
        ScdgmDeployment,
        name=APP_NAME,
        num_replicas=settings.replicas,
        ray_actor_options={"num_cpus": settings.replica_cpus, "num_gpus": settings.replica_gpus},
    )
    return deployment.bind(settings.to_json())


@contextmanager
def running(settings: ServeSettings, num_cpus: int | None = None) -> Iterator[None]:
    """A private Ray (by default as many CPUs as the replicas ask for; no dashboard; its own short temp dir),
    Serve's HTTP proxy on settings.host:port and the application, every replica up; all stopped on exit.

    Replica logs (the access log) reach this process's stderr, unlike pipelines.sweep.ray_session's quiet Ray.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    temp_dir = tempfile.mkdtemp(prefix="scdgm-ray-", dir="/tmp")  # unix socket paths must stay short
    try:
        ray.init(
            num_cpus=num_cpus or max(1, math.ceil(settings.replicas * settings.replica_cpus)),
            include_dashboard=False,
            _temp_dir=temp_dir,
        )
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(application(settings), name=APP_NAME, route_prefix="/")
        yield
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def serve_forever(settings: ServeSettings) -> None:
    """`scdgm serve --ray`: serve until Ctrl-C or SIGTERM, then stop Serve and Ray in the normal flow (a
    handler that only sets an event, installed after Ray's own)."""
    stopping = threading.Event()
    with running(settings):
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stopping.set())
        stopping.wait()
