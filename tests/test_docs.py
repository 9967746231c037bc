"""README.md and docs/*.md render on GitHub: every table has its delimiter row, the same number of
cells in every row and a blank line after it (a line that follows a table without one becomes a row
of it), code fences are closed, and commands sit in fenced blocks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DELIMITER = re.compile(r"^\|?(\s*:?-+:?\s*\|)*\s*:?-+:?\s*\|?$")
#: a line that is a command: cxrflow with an option, a make target, a script, a torchrun launch
COMMAND = re.compile(r"^\s*(cxrflow [a-z-]+ .*--|make [a-z-]+\s*(#.*)?$|python \S+\.py|torchrun --)")


def cells(row: str) -> int:
    """Cells of a GitHub table row: split at pipes not escaped with a backslash."""
    return len(re.split(r"(?<!\\)\|", row.strip().strip("|")))


def unfenced_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks; fails on a fence left open."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        marker = re.match(r"^\s*(```|~~~)", line)
        if marker and (fence is None or marker.group(1) == fence):
            fence = marker.group(1) if fence is None else None
            continue
        if fence is None:
            out.append((number, line))
    assert fence is None, "a code fence is never closed"
    return out


def table_problems(text: str) -> list[str]:
    lines = unfenced_lines(text)
    problems = []
    i = 0
    while i < len(lines):
        if not lines[i][1].lstrip().startswith("|"):
            i += 1
            continue
        block = [lines[i]]
        while i + len(block) < len(lines) and lines[i + len(block)][1].lstrip().startswith("|"):
            block.append(lines[i + len(block)])
        start = block[0][0]
        if len(block) < 2 or not DELIMITER.match(block[1][1].strip()):
            problems.append(f"line {start}: table without a delimiter row (|---|---|) under its header")
        width = cells(block[0][1])
        problems += [f"line {n}: {cells(row)} cells, header has {width}" for n, row in block if cells(row) != width]
        after = i + len(block)
        if after < len(lines) and lines[after][1].strip() and lines[after][0] == block[-1][0] + 1:
            problems.append(f"line {lines[after][0]}: text right after a table becomes one of its rows")
        i = after
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_tables_render_and_commands_are_fenced(page):
    text = page.read_text(encoding="utf-8")
    problems = table_problems(text)
    problems += [
        f"line {n}: command outside a fenced block: {line.strip()}"
        for n, line in unfenced_lines(text)
        if COMMAND.match(line)
    ]
    assert not problems, f"{page.name}:\n" + "\n".join(problems)


def test_the_checks_catch_what_github_renders_badly():
    assert table_problems("| a | b |\n|---|---|\n| 1 | 2 |\n") == []
    assert table_problems("| a | b |\n| 1 | 2 |\n") == [
        "line 1: table without a delimiter row (|---|---|) under its header"
    ]
    assert table_problems("| a | b |\n|---|---|\n| 1 | 2 | 3 |\n") == ["line 3: 3 cells, header has 2"]
    assert table_problems("| a | b |\n|---|---|\n| 1 | 2 |\nnext paragraph\n") == [
        "line 4: text right after a table becomes one of its rows"
    ]
    assert table_problems("| a | `x\\|y` |\n|---|---|\n") == []
    assert table_problems("```\n| not a table\n```\n") == []
    assert [
        n
        for n, line in unfenced_lines("cxrflow train --store S\n```\ncxrflow etl --data D\n```\n")
        if COMMAND.match(line)
    ] == [1]
