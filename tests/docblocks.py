"""Fenced code blocks of the project's Markdown files, so that tests run the documentation as written."""
from __future__ import annotations

import re
from pathlib import Path

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def section(path: Path, heading: str) -> str:
    """The text under `heading` (a full Markdown heading line, e.g. '## Quickstart') up to the next heading of
    the same or a higher level."""
    text = path.read_text()
    start = text.index(heading + "\n") + len(heading) + 1
    level = len(heading) - len(heading.lstrip("#"))
    following = re.compile(rf"^#{{1,{level}}} ", re.M).search(text, start)
    return text[start:following.start() if following else len(text)]


def blocks(path: Path, heading: str, language: str | None = None) -> list[str]:
    """The code blocks under `heading`, optionally only those fenced with `language`."""
    return [body for lang, body in FENCE.findall(section(path, heading)) if language is None or lang == language]
