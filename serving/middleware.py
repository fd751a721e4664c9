"""The ASGI layer around every request: request id, body-size limit, JSON-lines access log, and a last-resort
handler that answers 500 with the request id and never a traceback.

Pure ASGI (no BaseHTTPMiddleware) so it adds microseconds, not a task per request.
"""
from __future__ import annotations

import logging
import re
import sys
import time
import uuid
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ACCESS_LOGGER = "scdgm.serving.access"
REQUEST_ID_HEADER = "x-request-id"
VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

logger = logging.getLogger("scdgm.serving")


class BodyTooLarge(Exception):
    """The request body grew past the limit while it was being read."""


def access_logger() -> logging.Logger:
    """The access logger, writing one JSON object per line to stderr (set up once, not propagated)."""
    log = logging.getLogger(ACCESS_LOGGER)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def error_body(detail: str, request_id: str) -> bytes:
    """The JSON body of every error response: {"detail": ..., "request_id": ...}."""
    return orjson.dumps({"detail": detail, "request_id": request_id})


def request_id_of(scope: Scope) -> str:
    """The id the middleware gave this request ('-' outside a request)."""
    return scope.get("state", {}).get("request_id", "-")


class RequestContextMiddleware:
    """Gives each HTTP request an id (the client's X-Request-ID when well-formed), enforces the body limit,
    echoes the id (unless a proxy in front does, as Ray Serve's), logs one JSON line per request and turns
    uncaught exceptions into a bare 500."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, log_access: bool = True, echo_request_id: bool = True) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.access = access_logger() if log_access else None
        self.echo_request_id = echo_request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        request_id = _request_id(headers.get(REQUEST_ID_HEADER.encode()))
        scope.setdefault("state", {})["request_id"] = request_id
        response: dict[str, Any] = {"status": 500, "started": False}
        id_header = (REQUEST_ID_HEADER.encode(), request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                response["started"] = True
                if self.echo_request_id:
                    message["headers"] = [*message.get("headers", []), id_header]
            await send(message)

        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge
            return message

        try:
            if _declared_length(headers) > self.max_body_bytes:
                raise BodyTooLarge
            await self.app(scope, receive_limited, send_with_id)
        except BodyTooLarge:
            limit = f"{self.max_body_bytes / 2**20:g} MB"
            await self._fail(send_with_id, response, 413, f"request body larger than this server's {limit}", request_id)
        except Exception:  # noqa: BLE001 - the one place that answers for every unexpected failure
            logger.exception("unhandled error in %s %s (request id %s)", scope["method"], scope["path"], request_id)
            await self._fail(send_with_id, response, 500, "internal server error", request_id)
        finally:
            if self.access is not None:
                self.access.info(_access_line(scope, response["status"], started, request_id))

    @staticmethod
    async def _fail(send: Send, response: dict[str, Any], status: int, detail: str, request_id: str) -> None:
        if response["started"]:  # too late for a new response; the client sees a cut-off body
            return
        body = error_body(detail, request_id)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 413:
            headers.append((b"connection", b"close"))  # the rest of the body is not read
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _request_id(given: bytes | None) -> str:
    if given:
        text = given.decode("latin-1")
        if VALID_REQUEST_ID.match(text):
            return text
    return uuid.uuid4().hex


def _declared_length(headers: dict[bytes, bytes]) -> int:
    try:
        return int(headers.get(b"content-length", b"0"))
    except ValueError:
        return 0


def _access_line(scope: Scope, status: int, started: float, request_id: str) -> str:
    return orjson.dumps(
        {
            "ts": round(time.time(), 3),
            "request_id": request_id,
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
            "client": (scope.get("client") or ("-",))[0],
        }
    ).decode()
