"""Fenced code blocks of the project's Markdown files, so that tests run the documentation as written."""
from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

OPENING = re.compile(r"^(\s*)```(\w*)\s*$")
HEADING = re.compile(r"#+ ")


@dataclass(frozen=True)
class Block:
    """One fenced block: the heading it sits under (the nearest one), its language and its dedented body."""

    heading: str
    language: str
    body: str
    line: int


def all_blocks(path: Path) -> Iterator[Block]:
    """Every fenced block of `path` in order, indented ones (inside list items) included."""
    heading, fence, language, start, lines = "", None, "", 0, []
    for number, line in enumerate(path.read_text().splitlines(keepends=True), 1):
        if fence is None:
            opening = OPENING.match(line)
            if opening:
                fence, language, start, lines = opening.group(1), opening.group(2), number, []
            elif HEADING.match(line):
                heading = line.strip()
        elif line.strip() == "```":
            yield Block(heading, language, textwrap.dedent("".join(lines)), start)
            fence = None
        else:
            lines.append(line)


def section(path: Path, heading: str) -> str:
    """The text under `heading` (a full Markdown heading line, e.g. '## Quickstart') up to the next heading of
    the same or a higher level; '#' lines inside code fences are code, not headings."""
    level = len(heading) - len(heading.lstrip("#"))
    lines, inside, fenced = [], False, False
    for line in path.read_text().splitlines(keepends=True):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        is_heading = not fenced and HEADING.match(line)
        if inside and is_heading and len(line) - len(line.lstrip("#")) <= level:
            break
        if inside:
            lines.append(line)
        inside = inside or line.rstrip("\n") == heading
    if not inside:
        raise ValueError(f"{path.name} has no heading {heading!r}")
    return "".join(lines)


def blocks(path: Path, heading: str, language: str | None = None) -> list[str]:
    """The code blocks under `heading` (and its subsections), optionally only those fenced with `language`."""
    inside = section(path, heading)
    found, fence, lang, lines = [], False, "", []
    for line in inside.splitlines(keepends=True):
        opening = OPENING.match(line)
        if not fence and opening:
            fence, lang, lines = True, opening.group(2), []
        elif fence and line.strip() == "```":
            fence = False
            if language is None or lang == language:
                found.append(textwrap.dedent("".join(lines)))
        elif fence:
            lines.append(line)
    return found
