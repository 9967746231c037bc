"""Steps the CSV-based readers share: reading a table with its line numbers, label values, paths.

Every problem in a user's file is a :class:`~cxrflow.errors.CxrflowError` naming the file and the
1-based line (the header is line 1).
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
import pandas as pd

from cxrflow.errors import CxrflowError
from cxrflow.labels import LabelVocabulary
from cxrflow.uncertain import KNOWN, UNCERTAIN, UNMENTIONED

#: Observation values of CheXpert-style label columns -> (label, state).
OBSERVATION_VALUES = {
    "1.0": (1, KNOWN), "1": (1, KNOWN),
    "0.0": (0, KNOWN), "0": (0, KNOWN),
    "-1.0": (0, UNCERTAIN), "-1": (0, UNCERTAIN),
    "": (0, UNMENTIONED),
}
SEX_VALUES = {"M": "M", "F": "F", "MALE": "M", "FEMALE": "F", "": "U", "U": "U", "UNKNOWN": "U", "O": "U"}


@dataclass
class Table:
    """One CSV file as strings (every column), with the file line of each row."""

    path: Path
    frame: pd.DataFrame
    lines: np.ndarray

    def line(self, row: int) -> int:
        return int(self.lines[row])

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


def read_table(path: str | os.PathLike, required: Sequence[str]) -> Table:
    """Every row of ``path`` (``.csv`` or ``.csv.gz``) as stripped strings; ``required`` columns checked."""
    path = Path(path)
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        with _open_text(path) as f:
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
    except FileNotFoundError:
        raise CxrflowError("file not found", path) from None
    except UnicodeDecodeError as exc:
        raise CxrflowError(f"not a UTF-8 text file ({exc.reason})", path) from None
    except (OSError, EOFError, csv.Error) as exc:
        raise CxrflowError(f"cannot read: {exc}", path) from None
    missing = [c for c in required if c not in header]
    if missing:
        raise CxrflowError(f"missing column {missing[0]!r}; the header must include: {', '.join(required)}", path, 1)
    dups = [h for h in header if header.count(h) > 1 and h]
    if dups:
        raise CxrflowError(f"column {dups[0]!r} appears twice in the header", path, 1)
    frame = pd.DataFrame(rows, columns=header, dtype=str) if rows else pd.DataFrame(columns=header, dtype=str)
    return Table(path, frame, np.asarray(lines, dtype=np.int64))


def observations(table: Table, columns: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, states) uint8 [N, K] from CheXpert-style columns: 1.0, 0.0, -1.0 or empty."""
    n = len(table.frame)
    labels = np.zeros((n, len(columns)), dtype=np.uint8)
    states = np.zeros((n, len(columns)), dtype=np.uint8)
    for j, col in enumerate(columns):
        values = table.frame[col]
        ok = values.isin(OBSERVATION_VALUES).to_numpy()
        table.first(~ok, lambda r, c=col, v=values: (
            f"unknown value {v.iloc[r]!r} in column {c!r} (expected 1.0 positive, 0.0 negative, "
            "-1.0 uncertain or empty for not mentioned)"))
        pairs = values.map(OBSERVATION_VALUES)
        labels[:, j] = [p[0] for p in pairs]
        states[:, j] = [p[1] for p in pairs]
    return labels, states


def image_path(root: Path, relative: str, table: Table, row: int) -> Path:
    """``root / relative``, refusing an absolute path or one that leaves ``root``."""
    if not relative:
        raise table.error(row, "empty image path")
    pure = PurePosixPath(relative.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or (pure.parts and ":" in pure.parts[0]):
        raise table.error(row, f"image path {relative!r} escapes the data folder; paths must be relative to it")
    path = root.joinpath(*pure.parts)
    real_root = os.path.realpath(root)
    if os.path.commonpath([os.path.realpath(path), real_root]) != real_root:
        raise table.error(row, f"image path {relative!r} escapes the data folder (through a link)")
    return path


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
    table.first(first_split != splits, lambda r: (
        f"patient {patients[r]} is in split {splits[r]!r} here but in {first_split[r]!r} on an earlier line; "
        "a patient must be in one split only"))


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
    table.first(~ok, lambda r: f"{column!r} must be M, F, Male, Female, Unknown or empty, got {table.frame[column].iloc[r]!r}")
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
    """The common entries frame (see :mod:`cxrflow.formats`)."""
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


def locate_images(paths: dict[str, Path], need_images: bool) -> tuple[dict[str, Path], list[str]]:
    """(images found, image ids missing on disk) for ``image_id -> path``."""
    if not need_images:
        return {}, []
    found, missing = {}, []
    for image_id, path in paths.items():
        if path.is_file():
            found[image_id] = path
        else:
            missing.append(image_id)
    return found, missing
