"""params.yaml loading and `--set key=value` overrides, shared by the CLI, DVC stages and the tuner."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from scdgm.errors import ScdgmError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = PROJECT_ROOT / "params.yaml"


def load_params(path: str | Path | None = None) -> dict[str, Any]:
    """Read params.yaml (the project's by default); a missing or malformed file is a user error."""
    path = Path(path) if path is not None else DEFAULT_PARAMS
    if not path.exists():
        return {}
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ScdgmError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(params, dict):
        raise ScdgmError(f"{path}: expected a mapping at the top level")
    return params


def parse_value(text: str) -> Any:
    """Parse an override value with YAML rules, so `20` is an int, `1e-3` a float and `[64,32]` a list."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            return value
    return value


def apply_overrides(config: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Return a copy of `config` with `key=value` (dotted keys for nesting) overrides applied."""
    result = copy.deepcopy(config)
    for item in overrides or []:
        if "=" not in item:
            raise ScdgmError(f"--set expects key=value, got {item!r}")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise ScdgmError(f"--set has an empty key in {item!r}")
        node = result
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ScdgmError(f"--set {key}: {part} is not a section")
        node[parts[-1]] = parse_value(raw)
    return result


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into dotted keys (for MLflow params and comparison tables)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
