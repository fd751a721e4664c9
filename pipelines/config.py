"""Parameters of a run: the packaged defaults, then the project's params.yaml, then a `--params` file, then
`--set key=value` overrides; shared by the CLI, DVC stages and the tuner."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from scdgm.defaults import PARAMS_FILE, default_params, merge, read_params_file
from scdgm.errors import ScdgmError
from scdgm.project import project_dir


def load_params(path: str | Path | None = None) -> dict[str, Any]:
    """Every parameter of a run: packaged defaults updated by the project's params.yaml (when present) and by the
    file `path` (when given; a relative path is taken from the working directory, as the shell does)."""
    params = default_params()
    project_file = project_dir() / PARAMS_FILE
    if project_file.is_file():
        params = layer(params, read_params_file(project_file))
    if path is not None and Path(path).resolve() != project_file:
        params = layer(params, read_params_file(path))
    return params


def layer(params: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`params` updated by `override` key by key, except that a search space (`tune.spaces.<model>`) given in
    `override` replaces the one below it whole: a space lists every hyperparameter searched."""
    merged = merge(params, override)
    spaces = (override.get("tune") or {}).get("spaces")
    if isinstance(spaces, dict):
        for kind, space in spaces.items():
            merged["tune"]["spaces"][kind] = copy.deepcopy(space)
    return merged


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
