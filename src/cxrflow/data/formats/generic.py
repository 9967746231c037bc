"""The generic format (``--format csv``): one ``labels.csv`` in the data folder (or ``--data`` naming
any CSV file: its folder is the data folder), the way to bring any other collection.

Columns (header names; order free):

==============  =========================================================================
``image``       required: image file path relative to the data folder (PNG, JPEG or DICOM
                ``.dcm``); also the image id. Absolute paths and ``..`` are refused.
``patient_id``  required: integers, or any text (then numbered 1, 2, ... in sorted order)
``labels``      either this: finding names separated by ``|`` (empty or ``No Finding``, in
                any case, = none); the vocabulary is the sorted set of names seen, every
                label known; two spellings of a name that differ only in case are an error
*finding*       or one column per finding (every column not named here), in file order:
                ``1`` positive, ``0`` negative, ``-1`` uncertain, empty not mentioned
``age``         optional: whole years, empty = unknown (then a DICOM's ``PatientAge``)
``sex``         optional: M/F (Male/Female), empty = unknown (then a DICOM's ``PatientSex``)
``view``        optional: PA, AP, LATERAL, ...; with ``--views frontal`` only PA/AP rows are
                kept when the column is present
``split``       optional: train/val/test for every row (a patient in one split only;
                ``validate``, ``valid`` and ``validation`` mean val); without it
                patients are split 70/10/20
==============  =========================================================================

Column names are case-insensitive and other usual spellings are accepted (:data:`ALIASES`:
``path``/``filename`` for ``image``, ``patient``/``subject_id`` for ``patient_id``, ``findings``
for ``labels``, ``gender`` for ``sex``, ``view_position`` for ``view``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrflow.data.formats import FRONTAL, Collection
from cxrflow.data.formats.common import (
    check_patient_splits,
    check_unique,
    entries_frame,
    image_paths,
    locate_images,
    observations,
    parse_age,
    parse_sex,
    read_table,
)
from cxrflow.data.labels import LabelVocabulary
from cxrflow.data.uncertain import KNOWN
from cxrflow.errors import CxrflowError

FILE_NAME = "labels.csv"
REQUIRED = ("image", "patient_id")
OPTIONAL = ("labels", "age", "sex", "view", "split")
#: Other names collections give the validation split (MIMIC's ``validate``, CheXpert's ``valid``).
VAL_SPELLINGS = {"validate": "val", "valid": "val", "validation": "val"}
SPLITS = ("train", "val", "test")
NO_FINDING = "No Finding"


#: other spellings accepted for each column (case-insensitive)
ALIASES = {
    "image": ("path", "image_path", "file", "filename", "image_id", "image index"),
    "patient_id": ("patient", "subject_id", "patientid", "patient id"),
    "labels": ("findings", "finding_labels", "finding labels"),
    "age": ("patient_age", "patientage", "patient age"),
    "sex": ("gender", "patient_sex", "patientsex", "patient gender"),
    "view": ("view_position", "viewposition", "view position"),
    "split": ("subset", "fold"),
}


def detect(root: Path) -> bool:
    return (root / FILE_NAME).is_file()


def _canonical_columns(table) -> None:
    """Rename accepted spellings to the canonical column names (finding columns keep theirs)."""
    renames = {}
    for column in table.frame.columns:
        low = column.strip().lower()
        for name, others in ALIASES.items():
            if low == name or low in others:
                renames[column] = name
    if len(set(renames.values())) != len(renames):
        twice = next(n for n in renames.values() if list(renames.values()).count(n) > 1)
        raise CxrflowError(
            f"two columns mean {twice!r}: {', '.join(c for c, n in renames.items() if n == twice)}", table.path, 1
        )
    table.frame = table.frame.rename(columns=renames)
    for name in REQUIRED:
        if name not in table.frame.columns:
            raise CxrflowError(f"missing column {name!r} (or {', '.join(ALIASES[name])})", table.path, 1)


def _patients(table) -> np.ndarray:
    text = table.frame["patient_id"]
    table.first((text == "").to_numpy(), lambda r: "empty 'patient_id'")
    numbers = pd.to_numeric(text, errors="coerce")
    if not numbers.isna().any() and (numbers % 1 == 0).all() and (numbers >= 0).all():
        return numbers.to_numpy().astype(np.int64)
    codes = {p: i + 1 for i, p in enumerate(sorted(text.unique()))}
    return text.map(codes).to_numpy().astype(np.int64)


def _normalise_labels(text: str) -> str:
    """``A | b|no finding`` -> ``A|b|No Finding``: parts stripped, the no-finding token in any case."""
    parts = [p.strip() for p in text.split("|") if p.strip()]
    return "|".join(NO_FINDING if p.lower() == NO_FINDING.lower() else p for p in parts)


def _pipe_labels(table) -> tuple[LabelVocabulary, np.ndarray]:
    values = table.frame["labels"].map(_normalise_labels)
    names = sorted({p for v in values for p in v.split("|") if p and p != NO_FINDING})
    spelled = {}
    for name in names:  # "Nodule" and "nodule" would be two findings, each with half the positives
        if spelled.setdefault(name.lower(), name) != name:
            other = spelled[name.lower()]
            table.first(
                values.str.split("|").map(lambda parts, n=name: n in parts).to_numpy(),
                lambda r, n=name, o=other: f"finding {n!r} is also written {o!r}; spell each finding one way",
            )
    vocab = LabelVocabulary(tuple(names), no_finding=NO_FINDING)
    codes, uniques = pd.factorize(values)
    rows = np.zeros((len(uniques), len(names)), dtype=np.uint8)
    for u, text in enumerate(uniques):
        try:
            rows[u] = vocab.encode(vocab.parse(text))
        except KeyError:  # the only name not in the vocabulary is the no-finding token
            table.first(codes == u, lambda r, text=text: f"'labels' {text!r} combines {NO_FINDING!r} with findings")
    return vocab, rows[codes]


def _from_dicom_headers(ids: pd.Series, paths: dict, age: np.ndarray, sex: np.ndarray, keep: np.ndarray) -> None:
    """Fill unknown age and sex (in place) from DICOM sources' ``PatientAge``/``PatientSex``."""
    from cxrflow.data.formats.dicom import header_demographics, looks_like_dicom

    for i in np.flatnonzero(keep & ((age < 0) | (sex == "U"))):
        path = paths[ids.iloc[i]]
        if not looks_like_dicom(path):
            continue
        years, patient_sex = header_demographics(path)
        if age[i] < 0 and years is not None:
            age[i] = years
        if sex[i] == "U" and patient_sex is not None:
            sex[i] = patient_sex


def read(root: Path, *, views: str = "frontal", need_images: bool = True, file_name: str = FILE_NAME) -> Collection:
    table = read_table(root / file_name, ())
    _canonical_columns(table)
    columns = list(table.frame.columns)
    finding_columns = [c for c in columns if c not in REQUIRED + OPTIONAL and c]
    if "labels" in columns and finding_columns:
        raise table.error(0, f"both a 'labels' column and finding columns ({finding_columns[0]!r}, ...): use one way")
    if "labels" not in columns and not finding_columns:
        raise CxrflowError("missing column 'labels' (or one column per finding)", table.path, 1)
    states = None
    if "labels" in columns:
        vocab, labels = _pipe_labels(table)
    else:
        vocab = LabelVocabulary(tuple(finding_columns), no_finding=None)
        labels, states = observations(table, finding_columns)
        if (states == KNOWN).all():
            states = None
    ids = table.frame["image"]
    check_unique(table, ids, "image")
    paths = image_paths(root, ids, table)
    patients = _patients(table)
    view = (
        table.frame["view"].str.upper().to_numpy(dtype=object) if "view" in columns else np.full(len(ids), "", object)
    )
    keep = np.isin(view, FRONTAL) if views == "frontal" and "view" in columns else np.ones(len(ids), dtype=bool)
    train_val = test = val = None
    if "split" in columns:
        split = table.frame["split"].str.strip().str.lower().replace(VAL_SPELLINGS).to_numpy(dtype=object)
        table.first(
            ~np.isin(split, SPLITS),
            lambda r: f"'split' must be train, val or test, got {table.frame['split'].iloc[r]!r}",
        )
        check_patient_splits(table, patients, split)
        kept_ids, kept_split = ids.to_numpy()[keep], split[keep]
        train_val = kept_ids[kept_split != "test"].tolist()
        test = kept_ids[kept_split == "test"].tolist()
        val = kept_ids[kept_split == "val"].tolist() if (kept_split == "val").any() else None
    age, sex = parse_age(table, "age"), parse_sex(table, "sex")
    _from_dicom_headers(ids, paths, age, sex, keep)
    entries = entries_frame(
        ids[keep],
        patients[keep],
        age[keep],
        sex[keep],
        view[keep],
        np.zeros(int(keep.sum()), np.int32),
        labels[keep],
        vocab,
    )
    images, missing = locate_images({i: paths[i] for i in entries["image_id"]}, need_images)
    dropped = int((~keep).sum())
    return Collection(
        format="csv",
        root=root,
        vocab=vocab,
        entries=entries,
        images=images,
        missing=missing,
        metadata_path=table.path,
        states=None if states is None else states[keep],
        train_val=train_val,
        test=test,
        val=val,
        images_checked=need_images,
        notes=[f"--views frontal: left out {dropped} rows whose view is not PA/AP"] if dropped else [],
    )
