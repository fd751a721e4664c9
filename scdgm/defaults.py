"""The packaged defaults (scdgm/resources/params.yaml): the one source that the library's dataclasses, the CLI and
every project's params.yaml agree with (tests/test_defaults.py fails when they drift)."""
from __future__ import annotations

import copy
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from scdgm.errors import ScdgmError

PARAMS_FILE = "params.yaml"


def packaged_params_text() -> str:
    """The packaged params.yaml, comments included (what `scdgm init` writes into a new project)."""
    return files("scdgm").joinpath("resources", PARAMS_FILE).read_text()


@cache
def _packaged() -> dict[str, Any]:
    return yaml.safe_load(packaged_params_text())


def default_params() -> dict[str, Any]:
    """A fresh copy of every packaged default, one section per stage."""
    return copy.deepcopy(_packaged())


def default_section(*keys: str) -> dict[str, Any]:
    """A copy of one (nested) section of the packaged defaults, e.g. `default_section("train", "vae")`."""
    node: Any = _packaged()
    for key in keys:
        node = node[key]
    return copy.deepcopy(node)


def read_params_file(path: str | Path) -> dict[str, Any]:
    """Read a params YAML file; a missing or malformed file is a user error."""
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ScdgmError(f"{path}: no such parameters file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScdgmError(f"{path}: cannot read it ({exc.__class__.__name__})") from None
    except yaml.YAMLError as exc:
        raise ScdgmError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(params, dict):
        raise ScdgmError(f"{path}: expected a mapping at the top level")
    return params


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` updated by `override`, nested mappings merged key by key (a copy; neither input changes)."""
    result = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result
