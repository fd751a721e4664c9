"""The same FastAPI app as a Ray Serve deployment: R replicas, each with its own CPUs/GPUs and its own copy
of the model (loaded by the app's lifespan when the replica starts).

The app is built on the replica (late-bound ingress), so only the settings travel to it, never a model. Errors
that Ray Serve's HTTP proxy answers itself (a replica that died with the request, Ray's own 408/429/503) get
the app's JSON error shape through `ServeErrorsAsJson`, which `running` installs on the proxy.
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
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scdgm.serving.app import create_app
from scdgm.serving.middleware import REQUEST_ID_HEADER, error_body
from scdgm.serving.settings import ServeSettings

APP_NAME = "scdgm"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
"""Ray Serve's hook for middlewares on its HTTP proxy: the import path of a function returning them."""
RETRY_AFTER_S = 5
"""The Retry-After of a 503 for a lost replica: about the time Serve takes to start one and load the model."""
REPLICA_LOST = "the model replica handling this request stopped; Ray Serve is restarting it, retry shortly"


@serve.ingress()
class ScdgmDeployment:
    """One replica: holds the settings; Ray Serve calls `__serve_build_asgi_app__` and runs its lifespan."""

    def __init__(self, settings_json: str) -> None:
        self.settings = ServeSettings.from_json(settings_json)

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(self.settings, echo_request_id=False)  # Serve's proxy echoes X-Request-ID itself


class ServeErrorsAsJson:
    """ASGI middleware on Ray Serve's HTTP proxy. When a replica dies with a request, the proxy answers nothing
    (uvicorn then sends a plain-text 500), and its own 408/429/503 are plain text: this answers the first with
    503, Retry-After and the app's JSON error body, and rewrites the others into that body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        held: Message | None = None  # the start of a plain-text error, answered again once its body is complete
        text = b""

        async def rewrite(message: Message) -> None:
            nonlocal started, held, text
            if message["type"] == "http.response.start":
                started = True
                content_type = _header(message["headers"], b"content-type")
                if message["status"] >= 400 and not content_type.startswith(b"application/json"):
                    held = message
                    return
            elif held is not None and message["type"] == "http.response.body":
                text += message.get("body", b"")
                if not message.get("more_body", False):
                    detail = text.decode("utf-8", "replace").strip().replace("\n", " ") or "error in Ray Serve"
                    await _send_error(send, held["status"], detail, held["headers"])
                return
            await send(message)

        await self.app(scope, receive, rewrite)
        if not started:  # the request's headers now carry the id the proxy gave it
            request_id = _header(scope["headers"], REQUEST_ID_HEADER.encode())
            await _send_error(send, 503, REPLICA_LOST, [(REQUEST_ID_HEADER.encode(), request_id)])


def proxy_middlewares() -> list[Middleware]:
    """The middlewares of Ray Serve's HTTP proxy (named by PROXY_CALLBACK_ENV when `running` starts Ray)."""
    return [Middleware(ServeErrorsAsJson)]


def _header(headers: Any, name: bytes) -> bytes:
    """The first value of header `name` (lower case) in ASGI `headers`, b"" when absent."""
    return next((value for key, value in headers if key.lower() == name), b"")


async def _send_error(send: Send, status: int, detail: str, headers: Any) -> None:
    """Answer `status` with the app's JSON error body, keeping `headers` except the content ones; a 503 says when
    to retry."""
    request_id = _header(headers, REQUEST_ID_HEADER.encode()).decode("latin-1") or "-"
    body = error_body(detail, request_id)
    kept = [(key, value) for key, value in headers if key.lower() not in (b"content-type", b"content-length")]
    kept += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 503 and not _header(kept, b"retry-after"):
        kept.append((b"retry-after", str(RETRY_AFTER_S).encode()))
    await send({"type": "http.response.start", "status": status, "headers": kept})
    await send({"type": "http.response.body", "body": body})


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
    Serve's HTTP proxy on settings.host:port with `proxy_middlewares` and the application, every replica up;
    all stopped on exit.

    Replica logs (the access log) reach this process's stderr, unlike pipelines.cluster.ray_session's quiet Ray.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ[PROXY_CALLBACK_ENV] = f"{__name__}:{proxy_middlewares.__name__}"  # Ray's processes inherit it
    # Ray's C++ failure handler turns SIGTERM into an abort (exit 134) before Python sees it
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    temp_dir = tempfile.mkdtemp(prefix="scdgm-ray-", dir="/tmp")  # unix socket paths must stay short
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        ray.init(
            num_cpus=num_cpus or max(1, math.ceil(settings.replicas * settings.replica_cpus)),
            include_dashboard=False,
            _temp_dir=temp_dir,
        )
        for signum, handler in handlers.items():  # ray.init makes SIGTERM a bare exit(15): keep the caller's
            if handler is not None:
                signal.signal(signum, handler)
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(application(settings), name=APP_NAME, route_prefix="/")
        yield
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def serve_forever(settings: ServeSettings) -> int:
    """`scdgm serve --ray`: serve until Ctrl-C or SIGTERM, then stop Serve and Ray in the normal flow (a
    handler that only records the signal, installed after Ray's own); returns the signal's number."""
    stopping = threading.Event()
    received: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        received.append(signum)
        stopping.set()

    with running(settings):
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, stop)
        stopping.wait()
    return received[0]
