"""The one CSV writer of cxrflow: every cell that a spreadsheet would run as a formula is written as text.

A run folder, image or finding named ``=2+5+cmd|' /C calc'!A0`` would otherwise land in ``table.csv``,
``split.csv`` or ``boxes.csv`` as a live formula (CSV injection). Following OWASP, a text cell that
starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading single quote, which
a spreadsheet shows as text. A cell that already starts with a quote gets one more, so that
:func:`unprotect` (used where cxrflow reads its own CSVs back, e.g. ``etl --split-csv``) restores
every value exactly. Numbers, and text that is a plain number (``-0.05``), are written as they are.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from typing import Any

from cxrflow.safeio import CSV_BYTES, open_regular

#: First characters that make a spreadsheet read a cell as a formula, and the quote that escapes them.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")

_NUMBER = re.compile(r"-?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|-?(inf|nan)", re.IGNORECASE)


def protect(value: Any) -> Any:
    """``value`` made safe for a spreadsheet: a string starting like a formula (or a quote) gets a quote."""
    if isinstance(value, str) and value.startswith(FORMULA_START) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def unprotect(value: Any) -> Any:
    """The value :func:`protect` was given: one leading quote of a string removed."""
    if isinstance(value, str) and value.startswith("'"):
        return value[1:]
    return value


def _breaks_rows(value: Any) -> bool:
    """A carriage return, which the csv module leaves unquoted when lines end in ``\\n``, starts a row."""
    return isinstance(value, str) and "\r" in value


class _SafeWriter:
    """``csv.writer`` whose rows pass through :func:`protect`; a row holding a carriage return is quoted."""

    def __init__(self, f: Any, **kwargs: Any):
        self._writer = csv.writer(f, **kwargs)
        self._quoted = csv.writer(f, **{**kwargs, "quoting": csv.QUOTE_ALL})

    def writerow(self, row: Iterable[Any]) -> Any:
        cells = [protect(v) for v in row]
        return (self._quoted if any(map(_breaks_rows, cells)) else self._writer).writerow(cells)

    def writerows(self, rows: Iterable[Iterable[Any]]) -> None:
        for row in rows:
            self.writerow(row)


def writer(f: Any, **kwargs: Any) -> _SafeWriter:
    """A ``csv.writer`` (same arguments) that writes formula-like text cells as text."""
    return _SafeWriter(f, **kwargs)


def _is_text(column: Any) -> bool:
    return column.dtype == object or str(column.dtype) in ("string", "str")


def protect_frame(frame: Any) -> Any:
    """A copy of a pandas DataFrame with every text cell passed through :func:`protect`."""
    out = frame.copy()
    for column in out.columns:
        if _is_text(out[column]):
            out[column] = out[column].map(protect)
    return out


def write_frame(frame: Any, path: Any, **kwargs: Any) -> None:
    """``frame.to_csv(path, **kwargs)`` with formula-like text cells written as text (quoted when one
    holds a carriage return, so it stays one cell)."""
    safe = protect_frame(frame)
    if any(safe[c].map(_breaks_rows).any() for c in safe.columns if _is_text(safe[c])):
        kwargs.setdefault("quoting", csv.QUOTE_NONNUMERIC)
    safe.to_csv(path, **kwargs)


def read_frame(path: Any, **kwargs: Any) -> Any:
    """``pandas.read_csv(path, **kwargs)`` of a CSV cxrflow wrote: text cells as they were before :func:`protect`.

    Only a regular file under :data:`cxrflow.safeio.CSV_BYTES` is read (else :class:`~cxrflow.safeio.UnreadableFile`).
    """
    import pandas as pd

    with open_regular(path, "CSV file", CSV_BYTES) as f:
        frame = pd.read_csv(f, **kwargs)
    for column in frame.columns:
        if _is_text(frame[column]):
            frame[column] = frame[column].map(unprotect)
    return frame
