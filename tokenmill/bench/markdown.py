"""Markdown for the benchmark scripts: tables, and sections of a shared docs file.

A section lives between `<!-- NAME:start -->` and `<!-- NAME:end -->`;
`write_marked_section` replaces that span (or appends the section when the
markers are absent) and leaves everything else in the file as it was, so that
several scripts can each own a section of `docs/benchmarks.md`.
"""
from __future__ import annotations

from pathlib import Path

DOCS_INTRO = """# Benchmarks

Measured numbers, each section written by the script named in it. Rerun the
script to refresh its section; sections are delimited by HTML comments so that
several benchmarks can share this file.
"""


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def section_markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_marked_section(path: Path, name: str, body: str) -> None:
    """Put `body` between the markers of section `name` in `path` (created with an intro if missing)."""
    start, end = section_markers(name)
    section = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else DOCS_INTRO
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
