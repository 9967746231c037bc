"""The NIH ChestX-ray14 metadata layer: the release's CSVs, split lists and image folders.

Reads the files exactly as users download them:

- ``Data_Entry_2017_v2020.csv`` / ``Data_Entry_2017.csv``: the last two headers
  (``OriginalImage[Width,Height]``, ``OriginalImagePixelSpacing[x,y]``) each span two CSV columns;
  the original file adds a trailing empty column; spacing is written ``0.143`` or
  ``0.14300000000000002``.
- ``BBox_List_2017.csv``: ``Image Index,Finding Label,Bbox [x,y,w,h],,,`` (the box spans four columns,
  the header ends in empty columns) and spells ``Infiltration`` as ``Infiltrate``.
- ``train_val_list.txt`` / ``test_list.txt``: one Image Index per line.
- images under ``images/`` or the Kaggle layout ``images_001/images/...``, indexed by file name.

Bad input raises :class:`~cxrflow.errors.CxrflowError` naming the file and the 1-based line (the header
is line 1). Parsing is vectorised (pandas' C parser with explicit dtypes, labels encoded once per
distinct ``Finding Labels`` value); when the fast path meets a problem, a row-by-row pass over the
file finds the exact line to report.
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxrflow.data.labels import NIH14, LabelVocabulary
from cxrflow.errors import CxrflowError

DATA_ENTRY_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
BBOX_NAME = "BBox_List_2017.csv"
TRAIN_VAL_NAME = "train_val_list.txt"
TEST_NAME = "test_list.txt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SEXES = ("M", "F")
VIEWS = ("PA", "AP")

_INT16_MAX = np.iinfo(np.int16).max
_INT32_MAX = np.iinfo(np.int32).max
_INT64_MIN, _INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)
#: Ages outside this range (414 rows of the real v2017 file) are unknown: the row is kept, counted
#: in ``entries.attrs["age_unknown"]``, left out of age statistics and encoded as unknown for a
#: fused model (:mod:`cxrflow.data.demographics`). The raw value stays in ``age`` (the store keeps what the
#: release says) unless the store's int16 cannot hold it (negative or beyond 32767): then AGE_UNKNOWN.
AGE_RANGE = (0, 120)
AGE_UNKNOWN = -1


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn the ways a user's text file can fail to read into one CxrflowError naming it."""
    try:
        yield
    except FileNotFoundError:
        raise CxrflowError("file not found", path) from None
    except UnicodeDecodeError as exc:
        raise CxrflowError(f"not a UTF-8 text file ({exc.reason})", path) from None
    except OSError as exc:
        raise CxrflowError(f"cannot read: {exc.strerror}", path) from None


@dataclass(frozen=True)
class _Column:
    """One logical header of a release CSV: its header text, the output names of the CSV columns it
    spans (one per column) and their kind ("str", "int" or "float")."""

    header: str
    names: tuple[str, ...]
    kind: str


DATA_ENTRY_COLUMNS = (
    _Column("Image Index", ("image_id",), "str"),
    _Column("Finding Labels", ("finding_labels",), "str"),
    _Column("Follow-up #", ("follow_up",), "int"),
    _Column("Patient ID", ("patient_id",), "int"),
    _Column("Patient Age", ("age",), "int"),
    _Column("Patient Gender", ("sex",), "str"),
    _Column("View Position", ("view",), "str"),
    _Column("OriginalImage[Width,Height]", ("orig_width", "orig_height"), "int"),
    _Column("OriginalImagePixelSpacing[x,y]", ("spacing_x", "spacing_y"), "float"),
)

BBOX_COLUMNS = (
    _Column("Image Index", ("image_id",), "str"),
    _Column("Finding Label", ("finding",), "str"),
    _Column("Bbox [x,y,w,h]", ("x", "y", "w", "h"), "float"),
)

_DTYPES = {"str": str, "int": "int64", "float": "float64"}
_CONVERT: dict[str, Callable[[str], object]] = {"str": str, "int": int, "float": float}


def _merge_bracketed(tokens: list[str]) -> list[tuple[str, int, int]]:
    """Header tokens -> (name, first column, span); ``A[x`` + ``y]`` become one name ``A[x,y]``."""
    merged: list[tuple[str, int, int]] = []
    i = 0
    while i < len(tokens):
        start, name = i, tokens[i].strip()
        while "[" in name and "]" not in name and i + 1 < len(tokens):
            i += 1
            name = name + "," + tokens[i].strip()
        merged.append((name, start, i - start + 1))
        i += 1
    return merged


class _Layout:
    """Where each wanted column sits in one CSV file, from its header and first data row."""

    def __init__(self, path: Path, columns: tuple[_Column, ...]):
        self.path = path
        if path.exists() and not path.is_file():  # a pipe or device would hang or never end
            raise CxrflowError("not a regular file (a folder, named pipe or device); expected a CSV file", path)
        with _reading(path), open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            first = next((row for row in reader if row), None)
        if not header:
            raise CxrflowError("empty file: expected a header line", path, 1)
        found = {name: (start, span) for name, start, span in _merge_bracketed(header) if name}
        self.positions: dict[str, int] = {}
        self.kinds: dict[str, str] = {}
        for col in columns:
            if col.header not in found:
                expected = ",".join(c.header for c in columns)
                raise CxrflowError(f"missing column {col.header!r}; the header must be: {expected}", path, 1)
            start, span = found[col.header]
            if span != len(col.names):
                raise CxrflowError(f"column {col.header!r} spans {span} columns, expected {len(col.names)}", path, 1)
            for k, name in enumerate(col.names):
                self.positions[name] = start + k
                self.kinds[name] = col.kind
        # the header may end in empty columns, and rows may carry a trailing empty column
        while header and not header[-1].strip():
            header = header[:-1]
        self.width = max(len(header), len(first) if first else 0)
        self.min_width = max(self.positions.values()) + 1


def _scan_rows(layout: _Layout) -> tuple[list[list[str]], np.ndarray]:
    """Every data row as strings plus its line number; raises on a wrong number of columns."""
    try:
        return _scan_rows_utf8(layout)
    except UnicodeDecodeError as exc:
        raise CxrflowError(f"not a UTF-8 text file ({exc.reason} at byte {exc.start})", layout.path) from None


def _scan_rows_utf8(layout: _Layout) -> tuple[list[list[str]], np.ndarray]:
    rows: list[list[str]] = []
    lines: list[int] = []
    with open(layout.path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        next(reader, None)
        line = reader.line_num
        for row in reader:
            start, line = line + 1, reader.line_num
            if not row:  # blank line: skipped, as pandas does
                continue
            n = len(row)
            if n < layout.min_width or n > layout.width:
                raise CxrflowError(f"malformed row: expected {layout.width} columns, found {n}", layout.path, start)
            extra = next((v for v in row[layout.min_width :] if v.strip()), None)
            if extra is not None:
                raise CxrflowError(
                    f"malformed row: unexpected value {extra!r} after the last column", layout.path, start
                )
            rows.append(row)
            lines.append(start)
    return rows, np.asarray(lines, dtype=np.int64)


def _plain_integers(path: Path, layout: _Layout) -> bool:
    """Whether every integer column holds plain integers only (pyarrow's strict int64 parse)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    ints = [str(pos) for name, pos in layout.positions.items() if layout.kinds[name] == "int"]
    if not ints:
        return True
    try:
        pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(skip_rows=1, column_names=[str(i) for i in range(layout.width)]),
            parse_options=pacsv.ParseOptions(ignore_empty_lines=True),
            convert_options=pacsv.ConvertOptions(include_columns=ints, column_types={c: pa.int64() for c in ints}),
        )
    except (pa.ArrowInvalid, OSError):
        return False
    return True


def _read_table(path: Path, columns: tuple[_Column, ...]) -> tuple[pd.DataFrame, Callable[[int], int]]:
    """The wanted columns, typed (str/int64/float64), and a function row index -> file line.

    Fast path: pandas' C parser with explicit dtypes. On any problem, a row-by-row pass finds the
    exact line of the first bad value and raises; the line numbers are only computed when needed.
    """
    layout = _Layout(path, columns)
    positions = layout.positions
    name_at = {pos: name for name, pos in positions.items()}
    frame: pd.DataFrame | None
    try:
        frame = pd.read_csv(
            path,
            header=None,
            skiprows=1,
            names=range(layout.width),
            dtype={pos: _DTYPES[layout.kinds.get(name_at.get(pos, ""), "str")] for pos in range(layout.width)},
            keep_default_na=False,
            na_values=[""],
            engine="c",
            encoding="utf-8",
        )
        unnamed = frame[[pos for pos in range(layout.width) if pos not in name_at]]
        frame = frame.rename(columns=name_at)[list(positions)]
        if frame.isna().to_numpy().any() or unnamed.notna().to_numpy().any():
            frame = None  # a missing, unexpected or NaN value: the slow path reports where
        elif any(not np.isfinite(frame[n].to_numpy()).all() for n in positions if layout.kinds[n] == "float"):
            frame = None
        elif not _plain_integers(path, layout):
            frame = None  # pandas reads "45.0" or "4.5e1" as 45: the slow path refuses them with their line
    except (pd.errors.ParserError, ValueError, OverflowError):
        frame = None

    lines_cache: list[np.ndarray] = []

    def line_of(index: int) -> int:
        if not lines_cache:
            lines_cache.append(_scan_rows(layout)[1])
        return int(lines_cache[0][index])

    if frame is not None:
        return frame, line_of

    # slow path: find and report the first bad value with its line
    rows, lines = _scan_rows(layout)
    data: dict[str, list] = {}
    for name, pos in positions.items():
        kind, convert, values = layout.kinds[name], _CONVERT[layout.kinds[name]], []
        header = next(c.header for c in columns if name in c.names)
        for row, line in zip(rows, lines):
            text = row[pos].strip() if pos < len(row) else ""
            if not text:
                raise CxrflowError(f"malformed row: empty {header!r}", path, int(line))
            try:
                value = convert(text) if kind != "str" else row[pos]
            except ValueError:
                raise CxrflowError(
                    f"malformed row: {header!r} must be {'an integer' if kind == 'int' else 'a number'}, got {text!r}",
                    path,
                    int(line),
                ) from None
            if kind == "int" and not _INT64_MIN <= value <= _INT64_MAX:
                raise CxrflowError(f"malformed row: {header!r} = {text} does not fit a 64-bit integer", path, int(line))
            if kind == "float" and not np.isfinite(value):
                raise CxrflowError(f"malformed row: {header!r} must be a finite number, got {text!r}", path, int(line))
            values.append(value)
        data[name] = values
    frame = pd.DataFrame({name: pd.Series(v, dtype=_DTYPES[layout.kinds[name]]) for name, v in data.items()})
    return frame, lambda index: int(lines[index])


def _line_of_row(path: Path, columns: tuple[_Column, ...], row: int) -> int:
    """File line of data row ``row`` (0-based), for errors found after parsing."""
    return int(_scan_rows(_Layout(path, columns))[1][row])


def _first(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if len(hits) else None


def _encode_labels(
    values: pd.Series, vocab: LabelVocabulary, path: Path, line_of: Callable[[int], int], what: str
) -> np.ndarray:
    """Multi-hot uint8 [N, K] from ``A|B`` strings, parsing each distinct value once."""
    codes, uniques = pd.factorize(values)
    table = np.zeros((len(uniques), len(vocab)), dtype=np.uint8)
    for u, text in enumerate(uniques):
        try:
            table[u] = vocab.encode(vocab.parse(text))
        except KeyError as exc:
            row = _first(codes == u)
            raise CxrflowError(
                f"unknown finding {exc.args[0]!r} in {what} {text!r} (known: {', '.join(vocab.names)}"
                + (f", {vocab.no_finding}" if vocab.no_finding else "")
                + ")",
                path,
                line_of(row),
            ) from None
    return table[codes]


def _check_range(frame: pd.DataFrame, name: str, header: str, low: int, high: int, path: Path, line_of) -> None:
    values = frame[name].to_numpy()
    row = _first((values < low) | (values > high))
    if row is not None:
        raise CxrflowError(f"malformed row: {header!r} = {values[row]} is outside {low}..{high}", path, line_of(row))


def _check_choice(frame: pd.DataFrame, name: str, header: str, allowed: tuple[str, ...], path: Path, line_of) -> None:
    row = _first(~frame[name].isin(allowed).to_numpy())
    if row is not None:
        raise CxrflowError(
            f"malformed row: {header!r} must be one of {'/'.join(allowed)}, got {frame[name].iloc[row]!r}",
            path,
            line_of(row),
        )


def read_data_entry(path: str | os.PathLike, vocab: LabelVocabulary = NIH14) -> pd.DataFrame:
    """Parse ``Data_Entry_2017[_v2020].csv`` into one row per image, in file order.

    Columns: ``image_id``, ``finding_labels`` (raw), ``follow_up`` int32, ``patient_id`` int64,
    ``age`` int16 (unknown outside :data:`AGE_RANGE`; :data:`AGE_UNKNOWN` where int16 cannot hold it), ``sex``, ``view``, ``orig_width``/``orig_height`` int32, ``spacing_x``/``spacing_y``
    float64, then one uint8 column per finding named ``vocab.names`` in order.
    """
    path = Path(path)
    try:
        frame, line_of = _read_table(path, DATA_ENTRY_COLUMNS)
    except CxrflowError as exc:
        if exc.message.startswith("empty file"):
            raise CxrflowError(
                "no images: the metadata file is empty (expected a header, then one row per image)", path
            ) from None
        raise
    if frame.empty:
        raise CxrflowError("no images: the metadata file has a header but no rows", path)
    _check_range(frame, "follow_up", "Follow-up #", 0, _INT32_MAX, path, line_of)
    _check_range(frame, "patient_id", "Patient ID", 0, np.iinfo(np.int64).max, path, line_of)
    ages = frame["age"].to_numpy()
    unknown_age = (ages < AGE_RANGE[0]) | (ages > AGE_RANGE[1])
    frame["age"] = np.where((ages < 0) | (ages > _INT16_MAX), AGE_UNKNOWN, ages)
    _check_range(frame, "orig_width", "OriginalImage[Width,Height]", 1, _INT32_MAX, path, line_of)
    _check_range(frame, "orig_height", "OriginalImage[Width,Height]", 1, _INT32_MAX, path, line_of)
    _check_choice(frame, "sex", "Patient Gender", SEXES, path, line_of)
    _check_choice(frame, "view", "View Position", VIEWS, path, line_of)
    dup = frame["image_id"].duplicated().to_numpy()
    row = _first(dup)
    if row is not None:
        image = frame["image_id"].iloc[row]
        first = _first((frame["image_id"] == image).to_numpy())
        raise CxrflowError(f"duplicate Image Index {image!r} (first on line {line_of(first)})", path, line_of(row))
    labels = _encode_labels(frame["finding_labels"], vocab, path, line_of, "Finding Labels")
    out = pd.DataFrame(
        {
            "image_id": frame["image_id"],
            "finding_labels": frame["finding_labels"],
            "follow_up": frame["follow_up"].astype(np.int32),
            "patient_id": frame["patient_id"].astype(np.int64),
            "age": frame["age"].astype(np.int16),
            "sex": frame["sex"],
            "view": frame["view"],
            "orig_width": frame["orig_width"].astype(np.int32),
            "orig_height": frame["orig_height"].astype(np.int32),
            "spacing_x": frame["spacing_x"].astype(np.float64),
            "spacing_y": frame["spacing_y"].astype(np.float64),
        }
    )
    label_frame = pd.DataFrame(labels, columns=list(vocab.names), index=out.index)
    entries = pd.concat([out, label_frame], axis=1)
    entries.attrs["age_unknown"] = int(unknown_age.sum())
    return entries


def label_matrix(entries: pd.DataFrame, vocab: LabelVocabulary = NIH14) -> np.ndarray:
    """The uint8 [N, K] label matrix of a :func:`read_data_entry` frame, in vocabulary order."""
    return entries[list(vocab.names)].to_numpy(dtype=np.uint8)


def read_bbox(path: str | os.PathLike, vocab: LabelVocabulary = NIH14) -> pd.DataFrame:
    """Parse ``BBox_List_2017.csv`` into ``image_id, finding, x, y, w, h`` (canonical finding names)."""
    path = Path(path)
    frame, line_of = _read_table(path, BBOX_COLUMNS)
    codes, uniques = pd.factorize(frame["finding"])
    canonical = []
    for u, name in enumerate(uniques):
        try:
            canonical.append(vocab.canonical(name))
        except KeyError:
            raise CxrflowError(
                f"unknown finding {name!r} in 'Finding Label' (known: {', '.join(vocab.names)})",
                path,
                line_of(_first(codes == u)),
            ) from None
    row = _first((frame["w"].to_numpy() < 0) | (frame["h"].to_numpy() < 0))
    if row is not None:
        raise CxrflowError("malformed row: negative box width or height", path, line_of(row))
    frame["finding"] = pd.Series(np.asarray(canonical, dtype=object)[codes], index=frame.index, dtype=str)
    return frame[["image_id", "finding", "x", "y", "w", "h"]]


def _read_list(path: Path) -> tuple[list[str], list[int]]:
    """Entries of a split list and their line numbers (blank lines skipped)."""
    with _reading(path), open(path, encoding="utf-8-sig") as f:
        text = f.read()
    names, lines = [], []
    for number, entry in enumerate(text.splitlines(), start=1):
        entry = entry.strip()
        if entry:
            names.append(entry)
            lines.append(number)
    return names, lines


def read_image_list(path: str | os.PathLike) -> list[str]:
    """Image Index entries of ``train_val_list.txt`` / ``test_list.txt``, one per non-blank line."""
    return _read_list(Path(path))[0]


def find_images(root: str | os.PathLike) -> dict[str, Path]:
    """Every image under ``root`` (recursive, .png/.jpg/.jpeg), keyed by file name.

    Handles ``images/`` and the Kaggle layout ``images_001/images/...``; follows symbolic links to
    folders once; skips hidden folders. A folder named like an image is found as that image (the
    ETL quarantines it as a folder) and not searched. Two entries with the same name are a user error.
    """
    root = Path(root)
    if not root.is_dir():
        raise CxrflowError("not a folder", root)
    found: dict[str, Path] = {}
    seen: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        named = [d for d in dirs if d.lower().endswith(IMAGE_SUFFIXES)]
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in named)
        for name in sorted(files) + named:
            if name.lower().endswith(IMAGE_SUFFIXES):
                path = Path(folder) / name
                if name in found:
                    raise CxrflowError(f"image file name {name!r} appears twice: {found[name]} and {path}", root)
                found[name] = path
    return found


@dataclass
class Release:
    """One NIH-format dataset folder: metadata, official split lists, images found on disk."""

    root: Path
    vocab: LabelVocabulary
    entries: pd.DataFrame
    train_val: list[str] | None
    test: list[str] | None
    images: dict[str, Path]
    missing: list[str]
    unlisted: list[str]
    bbox: pd.DataFrame | None
    data_entry_path: Path
    images_checked: bool = field(default=True)

    def summary(self) -> dict:
        """Counts for reports: rows, patients, lists, images found/missing/unlisted, boxes."""
        return {
            "metadata_rows": int(len(self.entries)),
            "patients": int(self.entries["patient_id"].nunique()),
            "train_val_list": None if self.train_val is None else len(self.train_val),
            "test_list": None if self.test is None else len(self.test),
            "images_found": len(self.entries) - len(self.missing) if self.images_checked else None,
            "missing": len(self.missing) if self.images_checked else None,
            "unlisted_on_disk": len(self.unlisted) if self.images_checked else None,
            "bbox_rows": None if self.bbox is None else int(len(self.bbox)),
        }


def find_data_entry(data_dir: str | os.PathLike) -> Path:
    """The metadata CSV of a release folder (the 2020 revision preferred)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise CxrflowError("not a folder (expected the NIH ChestX-ray14 release folder)", data_dir)
    for name in DATA_ENTRY_NAMES:
        if (data_dir / name).is_file():
            return data_dir / name
    raise CxrflowError(f"no {' or '.join(DATA_ENTRY_NAMES)} in this folder", data_dir)


def _check_lists(entries: pd.DataFrame, data_entry: Path, train_val: Path, test: Path) -> tuple[list[str], list[str]]:
    """Read both lists and check them against the metadata and each other."""
    known = pd.Index(entries["image_id"])
    patient_of = pd.Series(entries["patient_id"].to_numpy(), index=known)
    result = []
    for path in (train_val, test):
        names, lines = _read_list(path)
        series = pd.Series(names, dtype=str)
        row = _first(~series.isin(known).to_numpy())
        if row is not None:
            raise CxrflowError(f"{names[row]!r} is not in {data_entry.name}", path, lines[row])
        row = _first(series.duplicated().to_numpy())
        if row is not None:
            raise CxrflowError(f"{names[row]!r} is listed twice", path, lines[row])
        result.append((names, lines, series))
    (tv_names, _, tv), (te_names, te_lines, te) = result
    tv_patients = pd.Index(patient_of.loc[tv].unique())
    te_patient = patient_of.loc[te].to_numpy()
    row = _first(pd.Index(te_patient).isin(tv_patients))
    if row is not None:
        pid = int(te_patient[row])
        other = next(n for n in tv_names if patient_of[n] == pid)
        raise CxrflowError(
            f"patient {pid} ({te_names[row]!r}) also has images in {train_val.name} (e.g. {other!r}); "
            "a patient must be in one list only",
            test,
            te_lines[row],
        )
    listed = pd.Index(tv_names).append(pd.Index(te_names))
    row = _first(~known.isin(listed))
    if row is not None:
        n = int((~known.isin(listed)).sum())
        raise CxrflowError(
            f"{n} image(s) are in neither {train_val.name} nor {test.name}, first {known[row]!r}",
            data_entry,
            _line_of_row(data_entry, DATA_ENTRY_COLUMNS, row),
        )
    return tv_names, te_names


def load_release(
    data_dir: str | os.PathLike,
    vocab: LabelVocabulary = NIH14,
    strict: bool = False,
    need_images: bool = True,
) -> Release:
    """Load and cross-check a release folder.

    Official lists are used when both exist (one without the other is an error). Images in the
    metadata but absent on disk go to ``missing`` (an error when ``strict``); images on disk absent
    from the metadata go to ``unlisted``. ``need_images=False`` skips the disk scan.
    """
    root = Path(data_dir)
    data_entry = find_data_entry(root)
    entries = read_data_entry(data_entry, vocab)
    tv_path, te_path = root / TRAIN_VAL_NAME, root / TEST_NAME
    if tv_path.is_file() != te_path.is_file():
        present, absent = (tv_path, te_path) if tv_path.is_file() else (te_path, tv_path)
        raise CxrflowError(f"{present.name} is present but {absent.name} is missing; provide both or neither", root)
    train_val = test = None
    if tv_path.is_file():
        train_val, test = _check_lists(entries, data_entry, tv_path, te_path)
    bbox = None
    if (root / BBOX_NAME).is_file():
        bbox = read_bbox(root / BBOX_NAME, vocab)
        row = _first(~bbox["image_id"].isin(entries["image_id"]).to_numpy())
        if row is not None:
            raise CxrflowError(
                f"{bbox['image_id'].iloc[row]!r} is not in {data_entry.name}",
                root / BBOX_NAME,
                _line_of_row(root / BBOX_NAME, BBOX_COLUMNS, row),
            )
    images: dict[str, Path] = {}
    missing: list[str] = []
    unlisted: list[str] = []
    if need_images:
        images = find_images(root)
        on_disk = pd.Index(list(images))
        ids = entries["image_id"]
        missing = ids[~ids.isin(on_disk)].tolist()
        unlisted = sorted(on_disk[~on_disk.isin(ids)].tolist())
        if strict and missing:
            raise CxrflowError(
                f"{len(missing)} of {len(ids)} images in {data_entry.name} are not on disk (first: {missing[0]!r}); "
                "drop --strict to skip them",
                root,
            )
    return Release(
        root=root,
        vocab=vocab,
        entries=entries,
        train_val=train_val,
        test=test,
        images=images,
        missing=missing,
        unlisted=unlisted,
        bbox=bbox,
        data_entry_path=data_entry,
        images_checked=need_images,
    )
