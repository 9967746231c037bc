"""Steps the CSV-based readers share: reading a table with its line numbers, label values, paths.

Every problem in a user's file is a :class:`~cxrflow.errors.CxrflowError` naming the file and the
1-based line (the header is line 1).
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cxrflow.data.labels import LabelVocabulary
from cxrflow.data.metadata import _reading as text_file_errors
from cxrflow.data.uncertain import KNOWN, UNCERTAIN, UNMENTIONED
from cxrflow.errors import CxrflowError

#: Observation values of CheXpert-style label columns -> (label, state).
OBSERVATION_VALUES = {
    "1.0": (1, KNOWN),
    "1": (1, KNOWN),
    "0.0": (0, KNOWN),
    "0": (0, KNOWN),
    "-1.0": (0, UNCERTAIN),
    "-1": (0, UNCERTAIN),
    "": (0, UNMENTIONED),
}
SEX_VALUES = {"M": "M", "F": "F", "MALE": "M", "FEMALE": "F", "": "U", "U": "U", "UNKNOWN": "U", "O": "U"}


class Table:
    """One CSV file as strings (every column, stripped), with the file line of each row (found by
    a row-by-row pass only when an error needs it)."""

    def __init__(self, path: Path, frame: pd.DataFrame, lines: np.ndarray | None = None):
        self.path, self.frame, self._lines = path, frame, lines

    def line(self, row: int) -> int:
        if self._lines is None:
            self._lines = _scan(self.path)[2]
        return int(self._lines[row])

    def error(self, row: int, problem: str) -> CxrflowError:
        return CxrflowError(problem, self.path, self.line(row))

    def first(self, mask: np.ndarray, problem) -> None:
        """Raise ``problem(row)`` at the first row where ``mask`` holds."""
        hits = np.flatnonzero(mask)
        if len(hits):
            raise self.error(int(hits[0]), problem(int(hits[0])))


def _open_text(path: Path):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


@contextlib.contextmanager
def _reading(path: Path):
    """The metadata layer's read errors, plus a broken gzip stream or CSV quoting."""
    with text_file_errors(path):
        try:
            yield
        except (gzip.BadGzipFile, EOFError, csv.Error) as exc:
            raise CxrflowError(f"cannot read: {exc}", path) from None


def _scan(path: Path) -> tuple[list[str], list[list[str]], np.ndarray]:
    """Header, rows and their lines, row by row (blank rows skipped); a wrong column count raises."""
    rows: list[list[str]] = []
    lines: list[int] = []
    with _reading(path), _open_text(path) as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if not header:
            raise CxrflowError("empty file: expected a header line", path, 1)
        line = reader.line_num
        for row in reader:
            start, line = line + 1, reader.line_num
            if not row or not any(v.strip() for v in row):
                continue
            if len(row) != len(header):
                raise CxrflowError(f"malformed row: expected {len(header)} columns, found {len(row)}", path, start)
            rows.append([v.strip() for v in row])
            lines.append(start)
    return header, rows, np.asarray(lines, dtype=np.int64)


def _fast(path: Path) -> pd.DataFrame | None:
    """The table through pandas' C parser, or None when it holds anything the slow pass must report."""
    try:
        with _reading(path):
            frame = pd.read_csv(
                path,
                dtype=str,
                keep_default_na=False,
                na_filter=True,
                na_values=[],
                skip_blank_lines=True,
                encoding="utf-8-sig",
                compression="infer",
                engine="c",
            )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError):
        return None
    if frame.isna().to_numpy().any() or any(str(c).startswith("Unnamed: ") for c in frame.columns):
        return None  # a short row, or an empty header name: the slow pass reports where
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame.apply(lambda col: col.str.strip()) if len(frame) else frame


def read_table(path: str | os.PathLike, required: Sequence[str]) -> Table:
    """Every row of ``path`` (``.csv`` or ``.csv.gz``) as stripped strings; ``required`` columns checked."""
    path = Path(path)
    frame = _fast(path)
    lines = None
    if (
        frame is None
        or frame.columns.duplicated().any()
        or any("." in c and c.rsplit(".", 1)[0] in frame.columns for c in frame.columns)
    ):
        header, rows, lines = _scan(path)
        frame = pd.DataFrame(rows, columns=header, dtype=str) if rows else pd.DataFrame(columns=header, dtype=str)
    header = list(frame.columns)
    missing = [c for c in required if c not in header]
    if missing:
        raise CxrflowError(f"missing column {missing[0]!r}; the header must include: {', '.join(required)}", path, 1)
    dups = [h for h in header if header.count(h) > 1 and h]
    if dups:
        raise CxrflowError(f"column {dups[0]!r} appears twice in the header", path, 1)
    return Table(path, frame, lines)


def observations(table: Table, columns: Sequence[str], derived: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(labels, states) uint8 [N, K] from CheXpert-style columns: 1.0, 0.0, -1.0 or empty. In the
    ``derived`` columns empty is a known 0: the labeler writes them itself, never from the report's words
    (CheXpert's ``No Finding``: 1.0 when no finding is positive or uncertain, else left empty)."""
    n = len(table.frame)
    labels = np.zeros((n, len(columns)), dtype=np.uint8)
    states = np.zeros((n, len(columns)), dtype=np.uint8)
    for j, col in enumerate(columns):
        values = table.frame[col]
        ok = values.isin(OBSERVATION_VALUES).to_numpy()
        table.first(
            ~ok,
            lambda r, c=col, v=values: (
                f"unknown value {v.iloc[r]!r} in column {c!r} (expected 1.0 positive, 0.0 negative, "
                "-1.0 uncertain or empty for not mentioned)"
            ),
        )
        positive = values.isin([v for v, (label, _) in OBSERVATION_VALUES.items() if label == 1]).to_numpy()
        uncertain = values.isin([v for v, (_, state) in OBSERVATION_VALUES.items() if state == UNCERTAIN]).to_numpy()
        labels[:, j] = positive
        blank = UNMENTIONED if col not in derived else KNOWN
        states[:, j] = np.where((values == "").to_numpy(), blank, np.where(uncertain, UNCERTAIN, KNOWN))
    return labels, states


def image_paths(root: Path, relative: pd.Series, table: Table) -> dict[str, str]:
    """``{relative: "root/relative"}`` (strings: a Path per row costs seconds), refusing an empty or absolute path or one with ``..``.

    The check is on the text (vectorised: the 223,414 rows of CheXpert's train.csv take a second);
    links inside the data folder are followed as they are, like the NIH layout's folders.
    """
    text = relative.str.replace("\\", "/", regex=False)
    table.first((text == "").to_numpy(), lambda r: "empty image path")
    escapes = text.str.startswith("/") | text.str.contains(r"(?:^|/)\.\.(?:/|$)") | text.str.match(r"^[A-Za-z]:")
    table.first(
        escapes.to_numpy(),
        lambda r: f"image path {relative.iloc[r]!r} escapes the data folder; paths must be relative to it",
    )
    base = str(root) + os.sep
    return dict(zip(relative, base + text))


def check_unique(table: Table, ids: pd.Series, what: str) -> None:
    dup = ids.duplicated().to_numpy()

    def problem(r: int) -> str:
        first = int(np.flatnonzero((ids == ids.iloc[r]).to_numpy())[0])
        return f"{what} {ids.iloc[r]!r} is listed twice (first on line {table.line(first)})"

    table.first(dup, problem)


def check_patient_splits(table: Table, patients: np.ndarray, splits: np.ndarray) -> None:
    """A patient's images must all be in one split of an official split file."""
    frame = pd.DataFrame({"p": patients, "s": splits})
    first_split = frame.groupby("p", sort=False)["s"].transform("first").to_numpy()
    table.first(
        first_split != splits,
        lambda r: (
            f"patient {patients[r]} is in split {splits[r]!r} here but in {first_split[r]!r} on an earlier line; "
            "a patient must be in one split only"
        ),
    )


def parse_age(table: Table, column: str | None) -> np.ndarray:
    """int16 ages (empty -> -1); an error for anything but a whole number in 0..150."""
    if column is None or column not in table.frame:
        return np.full(len(table.frame), -1, dtype=np.int16)
    text = table.frame[column]
    numbers = pd.to_numeric(text.where(text != "", "-1"), errors="coerce")
    bad = (numbers.isna() | (numbers % 1 != 0) | (numbers < -1) | (numbers > 150)).to_numpy()
    table.first(bad, lambda r: f"{column!r} must be a whole number of years (0-150) or empty, got {text.iloc[r]!r}")
    return numbers.to_numpy().astype(np.int16)


def parse_sex(table: Table, column: str | None) -> np.ndarray:
    """M/F/U from M, F, Male, Female, Unknown, O or empty (case-insensitive)."""
    if column is None or column not in table.frame:
        return np.full(len(table.frame), "U", dtype=object)
    upper = table.frame[column].str.upper()
    ok = upper.isin(SEX_VALUES).to_numpy()
    table.first(
        ~ok, lambda r: f"{column!r} must be M, F, Male, Female, Unknown or empty, got {table.frame[column].iloc[r]!r}"
    )
    return upper.map(SEX_VALUES).to_numpy(dtype=object)


def entries_frame(
    image_id: Sequence[str],
    patient_id: np.ndarray,
    age: np.ndarray,
    sex: np.ndarray,
    view: np.ndarray,
    follow_up: np.ndarray,
    labels: np.ndarray,
    vocab: LabelVocabulary,
) -> pd.DataFrame:
    """The common entries frame (see :mod:`cxrflow.data.formats`)."""
    frame = pd.DataFrame(
        {
            "image_id": pd.Series(list(image_id), dtype=str),
            "patient_id": np.asarray(patient_id, dtype=np.int64),
            "age": np.asarray(age, dtype=np.int16),
            "sex": pd.Series(list(sex), dtype=str),
            "view": pd.Series(list(view), dtype=str),
            "follow_up": np.asarray(follow_up, dtype=np.int32),
        }
    )
    label_frame = pd.DataFrame(np.asarray(labels, dtype=np.uint8), columns=list(vocab.names), index=frame.index)
    return pd.concat([frame, label_frame], axis=1)


def locate_images(paths: dict[str, str | Path], need_images: bool) -> tuple[dict[str, str | Path], list[str]]:
    """(images found, image ids missing on disk) for ``image_id -> path``.

    Whatever is at the path counts as found, a folder, pipe or broken link too: the ETL's decoder
    quarantines it with what it is, where "missing" would hide it.
    """
    if not need_images:
        return {}, []
    found, missing = {}, []
    for image_id, path in paths.items():
        if os.path.lexists(path):
            found[image_id] = path
        else:
            missing.append(image_id)
    return found, missing
