"""The one atomic writer: files and folders are written beside their target and renamed into place, so a reader
(or a crash) never sees half an output and a failed write leaves the previous output untouched."""
from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from scdgm.errors import ScdgmError


def _one_line(exc: OSError) -> str:
    return exc.strerror or str(exc).splitlines()[0]


@contextmanager
def atomic_path(target: str | Path, *, directory: bool = False) -> Iterator[Path]:
    """Yield a hidden sibling path of `target` (a fresh empty folder when `directory`); when the block ends
    without error it replaces `target`, otherwise it is removed and `target` stays as it was."""
    target = Path(target)
    staging = target.with_name(f".{target.name}.{secrets.token_hex(6)}.partial{target.suffix}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if directory:
            staging.mkdir()
    except OSError as exc:
        raise ScdgmError(f"cannot write {target}: {_one_line(exc)}") from exc
    try:
        yield staging
        if target.is_dir() and not target.is_symlink():
            retired = staging.with_name(staging.name + ".old")
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except OSError as exc:
        raise ScdgmError(f"cannot write {target}: {_one_line(exc)}") from exc
    finally:
        if staging.is_dir() and not staging.is_symlink():
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.unlink(missing_ok=True)


def write_with(target: str | Path, writer: Callable[[Path], Any]) -> Path:
    """Call `writer(path)` on a temporary sibling of `target`, then rename it into place."""
    with atomic_path(target) as staging:
        writer(staging)
    return Path(target)


def write_text_atomic(target: str | Path, text: str) -> Path:
    """Write `text` to `target` atomically."""
    return write_with(target, lambda path: path.write_text(text))


def write_json_atomic(target: str | Path, document: Any) -> Path:
    """Write `document` as indented JSON (sorted keys, trailing newline) to `target` atomically."""
    return write_text_atomic(target, json.dumps(document, indent=2, sort_keys=True, default=str) + "\n")
