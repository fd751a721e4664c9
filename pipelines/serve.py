"""`scdgm serve`: the HTTP endpoint for a model (directory, registry alias/version or run), with uvicorn
(one process, or N worker processes) or as a Ray Serve deployment with R replicas.

SIGINT and SIGTERM shut the server down gracefully (requests in flight finish), then the command ends with
`Terminated` (exit 130 / 143): uvicorn raises the signal again after its shutdown, and its multi-worker
supervisor, which would return silently, is `Supervisor`, which remembers the signal.
"""
from __future__ import annotations

import os
import signal
import tempfile
import threading
from pathlib import Path
from typing import Annotated

import typer
import uvicorn
from uvicorn.supervisors import Multiprocess

from scdgm.errors import InputError, ScdgmError, Terminated
from scdgm.models.data import split_mask
from scdgm.pipelines.io import read_counts, write_h5ad_atomic
from scdgm.serving import ray_deployment
from scdgm.serving.app import create_app
from scdgm.serving.loadgen import free_port, wait_until_ready
from scdgm.serving.resolve import resolve_model
from scdgm.serving.service import ModelService
from scdgm.serving.settings import SETTINGS_ENV, ServeSettings

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class Supervisor(Multiprocess):
    """uvicorn's supervisor of worker processes, remembering the signal that stopped it."""

    stopped_by: int | None = None

    def handle_int(self) -> None:
        self.stopped_by = signal.SIGINT
        super().handle_int()

    def handle_term(self) -> None:
        self.stopped_by = signal.SIGTERM
        super().handle_term()


def serve_workers(settings: ServeSettings, options: dict[str, object]) -> None:
    """Serve with `settings.workers` uvicorn worker processes (as `uvicorn.run(..., workers=N)` does), each
    building the app from the settings in the environment; raise `Terminated` once a signal stopped them."""
    os.environ[SETTINGS_ENV] = settings.to_json()
    config = uvicorn.Config("scdgm.serving.app:app_from_environment", factory=True, workers=settings.workers, **options)
    supervisor = Supervisor(config, sockets=[config.bind_socket()])
    supervisor.run()
    if supervisor.stopped_by is not None:
        raise Terminated(supervisor.stopped_by)


CHECK_CELLS = 100
"""Cells `scdgm serve --check` sends (the test split's first ones when the file has a split)."""


def check_serving(settings: ServeSettings, service: ModelService, cells: Path) -> str:
    """Serve the model on a free loopback port in this process, POST up to CHECK_CELLS cells of `cells` (an
    .h5ad; its test split when it has one) to /v1/explain as a client would, stop the server, and return a
    one-line summary (with the share of transferred labels that match the cells' own, when they have them)."""
    import httpx

    adata = read_counts(cells)
    test = split_mask(adata, "test")
    chosen = adata[test] if test.any() else adata
    chosen = chosen[: min(CHECK_CELLS, chosen.n_obs)].copy()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings, service), host="127.0.0.1", port=port,
                                           access_log=False, log_level="warning"))
    thread = threading.Thread(target=server.run, name="scdgm-serve-check", daemon=True)
    thread.start()
    try:
        wait_until_ready("127.0.0.1", port, "/ready", timeout=120)
        with tempfile.TemporaryDirectory(prefix="scdgm-check-") as folder:
            upload = write_h5ad_atomic(chosen, Path(folder) / "cells.h5ad")
            with upload.open("rb") as handle, httpx.Client(timeout=300) as client:
                response = client.post(f"http://127.0.0.1:{port}/v1/explain", files={"file": ("cells.h5ad", handle)})
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    if response.status_code != 200:
        raise ScdgmError(f"serving check failed: POST /v1/explain answered {response.status_code}: {response.text[:500]}")
    answer = response.json()
    line = (f"served {answer['model']} on http://127.0.0.1:{port}: POST /v1/explain with {len(answer['explanations'])} "
            f"{'test ' if test.any() else ''}cells of {cells} answered 200")
    key = answer.get("label_key")
    if key and key in chosen.obs:
        labels = [e["label"] for e in answer["explanations"]]
        agree = sum(label == truth for label, truth in zip(labels, chosen.obs[key].astype(str), strict=True))
        line += f"; transferred labels match obs[{key!r}] for {agree} of {len(labels)}"
    return line


def serve_command(
    model_uri: Annotated[str, typer.Option(help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a model directory.")],
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 keeps the server private to this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes, each with its own copy of the model.")] = 1,
    token_file: Annotated[Path | None, typer.Option(help="File holding a bearer token that /v1/* then require.")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Run as a Ray Serve deployment instead of plain uvicorn.")] = False,
    replicas: Annotated[int, typer.Option(help="Ray Serve replicas (with --ray).")] = 1,
    replica_cpus: Annotated[float, typer.Option(help="CPUs per Ray Serve replica.")] = 1.0,
    replica_gpus: Annotated[float, typer.Option(help="GPUs per Ray Serve replica.")] = 0.0,
    max_cells: Annotated[int, typer.Option(help="Most cells in one request (more: HTTP 413).")] = 10_000,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body in MB (more: HTTP 413).")] = 64.0,
    max_missing_fraction: Annotated[float, typer.Option(help="Largest share of model genes a request may lack (more: 422).")] = 0.1,
    allow_non_integer: Annotated[bool, typer.Option(help="Accept non-integer counts.")] = False,
    cors_origin: Annotated[list[str] | None, typer.Option(help="Allow browser calls from this origin (repeatable); CORS is off without it.")] = None,
    torch_threads: Annotated[int, typer.Option(help="torch threads per process or replica.")] = 1,
    access_log: Annotated[bool, typer.Option(help="JSON-lines access log on stderr.")] = True,
    check: Annotated[Path | None, typer.Option("--check", help="Instead of serving on: start on a free local port, explain up to 100 (test) cells of this .h5ad over HTTP, print the outcome and stop.")] = None,
) -> None:
    """Serve latent embeddings and log-linear explanations of new cells over HTTP (docs at /docs)."""
    settings = ServeSettings(
        model_uri=model_uri, host=host, port=port, workers=workers,
        token_file=str(token_file.resolve()) if token_file else None,
        ray=ray, replicas=replicas, replica_cpus=replica_cpus, replica_gpus=replica_gpus,
        max_cells=max_cells, max_body_mb=max_body_mb, max_missing_fraction=max_missing_fraction,
        allow_non_integer=allow_non_integer, cors_origins=tuple(cors_origin or ()),
        torch_threads=torch_threads, access_log=access_log,
    ).validate()
    resolve_model(settings.model_uri)  # a bad URI fails here, before the model loads; fills the cache
    if host not in LOOPBACK and token_file is None:
        typer.echo(f"warning: listening on {host} without --token-file: anyone who reaches it can use the model", err=True)
    if check is not None and (ray or workers != 1):
        raise InputError("--check serves one in-process server: drop --ray and --workers")
    if check is not None and not check.is_file():
        raise InputError(f"--check: no such file {check}")
    service = ModelService.load(settings)  # loading errors are one line too, before anything listens
    if check is not None:
        typer.echo(check_serving(settings, service, check))
        return
    if ray:
        del service  # each replica loads its own copy
        typer.echo(f"scdgm: Ray Serve with {replicas} replica(s) on http://{host}:{port} (Ctrl-C stops)", err=True)
        raise Terminated(ray_deployment.serve_forever(settings))

    options = {"host": host, "port": port, "access_log": False, "log_level": "info", "timeout_graceful_shutdown": 10}
    if workers == 1:
        uvicorn.run(create_app(settings, service), **options)
        return
    del service  # each worker process loads its own copy
    serve_workers(settings, options)
