"""What a scdgm server is configured with: the model to serve, where to listen, limits and security.

One frozen dataclass shared by the CLI, the FastAPI app, uvicorn workers (through an environment variable
holding its JSON form) and Ray Serve replicas (pickled with the deployment).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from scdgm.errors import ScdgmError

SETTINGS_ENV = "SCDGM_SERVE_SETTINGS"
"""Environment variable through which `scdgm serve --workers N` hands the settings to its worker processes."""


@dataclass(frozen=True)
class ServeSettings:
    """Server configuration; `validate` checks it and returns a user-facing error for bad values."""

    model_uri: str
    tracking_uri: str | None = None
    cache_dir: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    token_file: str | None = None
    max_cells: int = 10_000
    max_body_mb: float = 64.0
    max_missing_fraction: float = 0.1
    allow_non_integer: bool = False
    cors_origins: tuple[str, ...] = ()
    torch_threads: int = 1
    access_log: bool = True
    ray: bool = False
    replicas: int = 1
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def validate(self) -> ServeSettings:
        """Raise ScdgmError naming the first bad option; returns self so it chains."""
        checks = [
            (bool(self.model_uri.strip()), "--model-uri must not be empty"),
            (0 < self.port < 65536, f"--port must be in 1..65535, got {self.port}"),
            (self.workers >= 1, f"--workers must be at least 1, got {self.workers}"),
            (self.max_cells >= 1, f"--max-cells must be at least 1, got {self.max_cells}"),
            (self.max_body_mb > 0, f"--max-body-mb must be positive, got {self.max_body_mb}"),
            (0.0 <= self.max_missing_fraction <= 1.0,
             f"--max-missing-fraction must be in [0, 1], got {self.max_missing_fraction}"),
            (self.torch_threads >= 1, f"--torch-threads must be at least 1, got {self.torch_threads}"),
            (self.replicas >= 1, f"--replicas must be at least 1, got {self.replicas}"),
            (self.replica_cpus > 0, f"--replica-cpus must be positive, got {self.replica_cpus}"),
            (self.replica_gpus >= 0, f"--replica-gpus must be non-negative, got {self.replica_gpus}"),
            (not (self.ray and self.workers > 1), "--workers applies to uvicorn; with --ray use --replicas"),
        ]
        for ok, message in checks:
            if not ok:
                raise ScdgmError(message)
        if self.token_file is not None:
            read_token(self.token_file)
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServeSettings:
        data = json.loads(text)
        data["cors_origins"] = tuple(data.get("cors_origins", ()))
        return cls(**data)

    @classmethod
    def from_environment(cls) -> ServeSettings:
        """The settings a parent `scdgm serve` left in SCDGM_SERVE_SETTINGS (for uvicorn worker processes)."""
        text = os.environ.get(SETTINGS_ENV)
        if not text:
            raise ScdgmError(f"{SETTINGS_ENV} is not set; start the server with `scdgm serve`")
        return cls.from_json(text)


def read_token(path: str) -> str:
    """The bearer token in `path` (surrounding whitespace stripped); a missing or empty file is a user error."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ScdgmError(f"--token-file {path}: cannot read it ({exc.strerror})") from None
    if not token:
        raise ScdgmError(f"--token-file {path}: the file is empty")
    if any(c.isspace() for c in token):
        raise ScdgmError(f"--token-file {path}: the token must be one word without spaces")
    return token
