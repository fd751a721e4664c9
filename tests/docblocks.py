"""Fenced code blocks of the project's Markdown files, so that tests run the documentation as written."""
from __future__ import annotations

import re
from pathlib import Path

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def section(path: Path, heading: str) -> str:
    """The text under `heading` (a full Markdown heading line, e.g. '## Quickstart') up to the next heading of
    the same or a higher level; '#' lines inside code fences are code, not headings."""
    level = len(heading) - len(heading.lstrip("#"))
    lines, inside, fenced = [], False, False
    for line in path.read_text().splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        is_heading = not fenced and re.match(r"#+ ", line)
        if inside and is_heading and len(line) - len(line.lstrip("#")) <= level:
            break
        if inside:
            lines.append(line)
        inside = inside or line.rstrip("\n") == heading
    if not inside:
        raise ValueError(f"{path.name} has no heading {heading!r}")
    return "".join(lines)


def blocks(path: Path, heading: str, language: str | None = None) -> list[str]:
    """The code blocks under `heading`, optionally only those fenced with `language`."""
    return [body for lang, body in FENCE.findall(section(path, heading)) if language is None or lang == language]
