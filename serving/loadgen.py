"""A bounded closed-loop load generator for the HTTP API: C clients, each on its own keep-alive connection,
send the same request back to back for a fixed time; latencies and errors are recorded per request.

Used by the load test and bench/serving.py. Plain http.client in threads: a few microseconds of client
overhead per request, so on a small machine the server, not the client, is what gets measured.
"""
from __future__ import annotations

import http.client
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field

import numpy as np


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for test and benchmark servers)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until_ready(host: str, port: int, path: str, process: subprocess.Popen | None = None,
                     timeout: float = 120.0) -> float:
    """Poll GET path until it answers 200; returns the seconds waited. Raises if `process` exits first."""
    started = time.monotonic()
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server process exited with code {process.returncode} before it was ready")
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"http://{host}:{port}{path} not ready after {timeout:.0f} s")
        connection = http.client.HTTPConnection(host, port, timeout=2)
        try:
            connection.request("GET", path)
            if connection.getresponse().status == 200:
                return time.monotonic() - started
        except (OSError, http.client.HTTPException):
            pass
        finally:
            connection.close()
        time.sleep(0.2)


@dataclass
class LoadResult:
    """Outcome of one load run: counts, wall time and per-request latencies in milliseconds."""

    requests: int
    errors: int
    seconds: float
    latencies_ms: np.ndarray
    statuses: dict[int, int] = field(default_factory=dict)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms.size else float("nan")

    def summary(self, items_per_request: int = 1) -> dict[str, float]:
        """p50/p99 latency, requests/s and items (cells) per second."""
        rate = self.requests / self.seconds if self.seconds else 0.0
        return {
            "requests": self.requests,
            "errors": self.errors,
            "p50_ms": round(self.percentile(50), 3),
            "p99_ms": round(self.percentile(99), 3),
            "requests_per_s": round(rate, 1),
            "items_per_s": round(rate * items_per_request, 1),
        }


def run_load(
    host: str,
    port: int,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    clients: int = 16,
    seconds: float = 10.0,
    method: str = "POST",
    timeout: float = 30.0,
) -> LoadResult:
    """Send `method path` with `body` from `clients` threads for `seconds`; a non-2xx answer or a failed
    connection counts as an error (the connection is then reopened)."""
    deadline = time.perf_counter() + seconds
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0

    def client() -> None:
        nonlocal errors
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
        mine: list[float] = []
        mine_statuses: dict[int, int] = {}
        failed = 0
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                connection.request(method, path, body=body, headers=headers or {})
                response = connection.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = http.client.HTTPConnection(host, port, timeout=timeout)
                status = 0
            mine.append((time.perf_counter() - started) * 1000)
            mine_statuses[status] = mine_statuses.get(status, 0) + 1
            failed += not 200 <= status < 300
        connection.close()
        with lock:
            latencies.extend(mine)
            errors += failed
            for status, count in mine_statuses.items():
                statuses[status] = statuses.get(status, 0) + count

    started = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return LoadResult(len(latencies), errors, elapsed, np.asarray(latencies), statuses)
