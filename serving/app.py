"""The FastAPI app: health and readiness, model metadata, embeddings and log-linear explanations of new cells.

`create_app(settings)` builds it; the model is loaded once, by the lifespan (in a worker thread) or before by
`scdgm serve`. /health needs no model; /ready and /v1/* answer 503 while none is loaded. Parsing and inference
run in the thread pool; the event loop only moves bytes. /docs (Swagger UI) and /redoc load their scripts and
styles from the app itself (the fastapi-offline package ships them), so they work without internet; the request
examples in /openapi.json are built from the served model's genes, so "Try it out" sends a valid request.
"""
from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.responses import Response

from scdgm.errors import InputError, ScdgmError
from scdgm.serving.inputs import CellBatch, PayloadTooLarge, cells_from_h5ad, cells_from_json
from scdgm.serving.middleware import RequestContextMiddleware, error_body, request_id_of
from scdgm.serving.schemas import (
    EmbedResponse,
    ErrorResponse,
    ExplainResponse,
    Health,
    ModelInfo,
    Ready,
    cells_request_body,
    request_examples,
)
from scdgm.serving.service import ModelService, NoExplanation
from scdgm.serving.settings import ServeSettings, read_token

JSON = "application/json"


class NotReady(Exception):
    """The model is not loaded yet (HTTP 503)."""


class UnsupportedMediaType(ScdgmError):
    """A body that is neither JSON nor multipart/form-data (HTTP 415)."""


ERROR_STATUS: dict[type[Exception], int] = {
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    NoExplanation: 409,
    ScdgmError: 422,
    NotReady: 503,
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


def create_app(settings: ServeSettings, service: ModelService | None = None, echo_request_id: bool = True) -> FastAPI:
    """The scdgm HTTP API for the model named by `settings.model_uri`, loaded when the app starts unless an
    already loaded `service` is given (as `scdgm serve` does, to report loading errors before it listens).
    `echo_request_id=False` leaves the X-Request-ID response header to a proxy in front (Ray Serve's)."""
    token = read_token(settings.token_file) if settings.token_file else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.service = service or await run_in_threadpool(ModelService.load, settings)
        yield

    app = FastAPIOffline(
        title="scdgm",
        summary="Latent embeddings and log-linear explanations of single cells from a deep generative model.",
        version=_package_version(),
        lifespan=lifespan,
    )
    app.state.service = None
    _add_model_examples(app)
    _add_error_handlers(app)
    if settings.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID"],
        )
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.max_body_bytes,
        log_access=settings.access_log,
        echo_request_id=echo_request_id,
    )

    @app.get("/health", response_model=Health, tags=["status"])
    async def health() -> Response:
        """The process is alive (no model needed)."""
        return Response(b'{"status":"ok"}', media_type=JSON)

    @app.get("/ready", response_model=Ready, responses=_errors(503), tags=["status"])
    async def ready(request: Request) -> Response:
        """The model is loaded and requests will be answered; 503 until then."""
        service = _service(request)
        return Response(orjson.dumps({"status": "ready", "model": service.resolved.name}), media_type=JSON)

    secured = [Depends(_bearer_check(token))] if token is not None else []
    protected = _errors(401, 503) if token is not None else _errors(503)
    cells_errors = {**protected, **_errors(413, 415, 422, 500)}

    @app.get("/v1/model", response_model=ModelInfo, responses=protected, dependencies=secured, tags=["model"])
    async def model_info(request: Request) -> Response:
        """Name, version and kind of the model, the genes it expects, its latent size and explanation genes."""
        return Response(_service(request).model_info, media_type=JSON)

    @app.post(
        "/v1/embed",
        response_model=EmbedResponse,
        responses=cells_errors,
        dependencies=secured,
        openapi_extra={"requestBody": cells_request_body()},
        tags=["cells"],
    )
    async def embed(request: Request) -> Response:
        """Latent mean and variance of each cell (dense JSON, sparse CSR JSON, or an .h5ad upload)."""
        service = _service(request)
        return await _answer(request, service, service.embed)

    @app.post(
        "/v1/explain",
        response_model=ExplainResponse,
        responses={**cells_errors, **_errors(409)},
        dependencies=secured,
        openapi_extra={"requestBody": cells_request_body()},
        tags=["cells"],
    )
    async def explain(request: Request) -> Response:
        """The embedding plus each cell's pattern over the explanation genes, the matched reference pattern and
        its frequency, the transferred label and its support, and the genes driving its position."""
        service = _service(request)
        if service.explainer is None:
            raise NoExplanation(
                f"model {service.resolved.name!r} has no explanation; run `scdgm explain --model DIR --data H5AD` "
                "on its directory and restart the server"
            )
        return await _answer(request, service, service.explain)

    return app


def _add_model_examples(app: FastAPI) -> None:
    """Put request examples built from the loaded model's genes into the app's OpenAPI schema."""
    plain_schema = app.openapi

    def schema_with_examples() -> dict[str, Any]:
        schema = plain_schema()  # generated once and cached by FastAPI
        service = app.state.service
        if service is not None:
            examples = request_examples(service.genes)
            for path in ("/v1/embed", "/v1/explain"):
                schema["paths"][path]["post"]["requestBody"]["content"][JSON]["examples"] = examples
        return schema

    app.openapi = schema_with_examples


def app_from_environment() -> FastAPI:
    """Factory for uvicorn worker processes started by `scdgm serve --workers N`."""
    return create_app(ServeSettings.from_environment())


async def _answer(request: Request, service: ModelService, respond: Callable[[CellBatch], bytes]) -> Response:
    """Read the cells of the request and run `respond` on them in the thread pool."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == JSON or media_type.endswith("+json"):
        body = await request.body()
        content = await run_in_threadpool(lambda: respond(cells_from_json(body, service.genes, service.limits)))
    elif media_type == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=8)
        except HTTPException as exc:  # Starlette's answer to a malformed multipart body
            raise InputError(f"malformed multipart/form-data body ({exc.detail})") from None
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise InputError("multipart/form-data needs the .h5ad file in a field named 'file'")
            content = await run_in_threadpool(lambda: respond(cells_from_h5ad(upload.file, service.genes, service.limits)))
        finally:
            await form.close()  # removes spooled temporary files
    else:
        raise UnsupportedMediaType(
            f"unsupported content type {media_type or 'none'!r}; send application/json or multipart/form-data"
        )
    return Response(content, media_type=JSON)


def _service(request: Request) -> ModelService:
    service = request.app.state.service
    if service is None:
        raise NotReady("the model is still loading")
    return service


def _bearer_check(token: str) -> Callable[..., Any]:
    """A dependency that accepts only `Authorization: Bearer <token>` (compared in constant time)."""
    scheme = HTTPBearer(auto_error=False, description="The token in the server's --token-file.")
    expected = token.encode()

    async def check(credentials: HTTPAuthorizationCredentials | None = Depends(scheme)) -> None:
        given = credentials.credentials.encode() if credentials is not None else b""
        if not secrets.compare_digest(given, expected):
            detail = "missing bearer token" if credentials is None else "wrong bearer token"
            raise HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})

    return check


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answers {"detail": one line, "request_id": ...} with the right status."""

    def respond(request: Request, status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
        return Response(error_body(detail, request_id_of(request.scope)), status, headers, media_type=JSON)

    async def known(request: Request, exc: Exception) -> Response:
        status = next(code for cls, code in ERROR_STATUS.items() if isinstance(exc, cls))
        return respond(request, status, str(exc))

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return respond(request, exc.status_code, str(exc.detail), exc.headers)

    for cls in ERROR_STATUS:
        app.add_exception_handler(cls, known)
    app.add_exception_handler(HTTPException, http_error)


def _package_version() -> str:
    try:
        return version("scdgm")
    except PackageNotFoundError:
        return "0+unknown"
