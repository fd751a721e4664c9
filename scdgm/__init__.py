"""scdgm: train, tune, track, explain and serve deep generative models of single-cell RNA-seq counts.

`scdgm/` itself is the floor every package stands on (errors, atomic file writing, model-directory format,
packaged defaults); `scdgm.models`, `scdgm.interpret`, `scdgm.pipelines` and `scdgm.serving` are imported on
first attribute access, so `import scdgm; scdgm.models.VAE(...)` works without loading torch for the floor.
"""
from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType

try:
    __version__ = version("scdgm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_SUBPACKAGES = ("models", "interpret", "pipelines", "serving")


def __getattr__(name: str) -> ModuleType:
    """Import a subpackage on first use (PEP 562), keeping `import scdgm` light and free of cycles."""
    if name in _SUBPACKAGES:
        return importlib.import_module(f"scdgm.{name}")
    raise AttributeError(f"module 'scdgm' has no attribute {name!r}")


__all__ = ["__version__", *_SUBPACKAGES]
