"""CheXpert v1.0 (and the "-small" copy): ``train.csv`` and ``valid.csv`` as downloaded.

``Path`` starts with the folder's own name (``CheXpert-v1.0-small/train/patient00001/study1/
view1_frontal.jpg``); point ``--data`` at that folder. The image id is the path below it
(``train/patient00001/study1/view1_frontal.jpg``), the patient the ``patientNNNNN`` component, the
follow-up the ``studyN`` number. Observation columns hold 1.0, 0.0, -1.0 (uncertain) or nothing
(not mentioned): the store keeps them as label states (:mod:`cxrflow.uncertain`). ``train.csv``
is train/val (patients split by ``--val-fraction``), ``valid.csv`` the test split.
``--views frontal`` keeps ``Frontal`` rows with ``AP/PA`` = AP or PA.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from cxrflow.formats import Collection
from cxrflow.formats.common import (
    check_unique,
    entries_frame,
    image_path,
    locate_images,
    observations,
    parse_age,
    parse_sex,
    read_table,
)
from cxrflow.labels import LabelVocabulary

VOCAB = LabelVocabulary(
    names=(
        "No Finding",
        "Enlarged Cardiomediastinum",
        "Cardiomegaly",
        "Lung Opacity",
        "Lung Lesion",
        "Edema",
        "Consolidation",
        "Pneumonia",
        "Atelectasis",
        "Pneumothorax",
        "Pleural Effusion",
        "Pleural Other",
        "Fracture",
        "Support Devices",
    ),
    no_finding=None,  # "No Finding" is an observation of its own here
)
TRAIN_NAME, VALID_NAME = "train.csv", "valid.csv"
COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *VOCAB.names)
_PATIENT = re.compile(r"^patient(\d+)$")
_STUDY = re.compile(r"^study(\d+)$")


def detect(root: Path) -> bool:
    if not (root / TRAIN_NAME).is_file():
        return False
    with open(root / TRAIN_NAME, encoding="utf-8-sig", errors="replace") as f:
        return f.readline().startswith("Path,")


def _ids(table, root: Path) -> tuple[list[str], dict[str, Path], np.ndarray, np.ndarray]:
    """Image ids, their files, patient numbers and study numbers from the ``Path`` column."""
    ids, paths = [], {}
    patients = np.zeros(len(table.frame), dtype=np.int64)
    studies = np.zeros(len(table.frame), dtype=np.int32)
    for row, text in enumerate(table.frame["Path"]):
        parts = text.replace("\\", "/").split("/")
        if parts and parts[0] == root.name:  # "CheXpert-v1.0-small/train/..." is relative to the parent
            parts = parts[1:]
        relative = "/".join(parts)
        path = image_path(root, relative, table, row)
        patient = next((m for m in map(_PATIENT.match, parts) if m), None)
        study = next((m for m in map(_STUDY.match, parts) if m), None)
        if patient is None:
            raise table.error(row, f"no patientNNNNN folder in Path {text!r}")
        patients[row] = int(patient.group(1))
        studies[row] = int(study.group(1)) if study else 0
        ids.append(relative)
        paths[relative] = path
    return ids, paths, patients, studies


def _views(table) -> tuple[np.ndarray, np.ndarray]:
    """(view per row: AP/PA/LL/RL or LATERAL, frontal mask)."""
    fl, appa = table.frame["Frontal/Lateral"], table.frame["AP/PA"]
    table.first(~fl.isin(["Frontal", "Lateral"]).to_numpy(),
                lambda r: f"'Frontal/Lateral' must be Frontal or Lateral, got {fl.iloc[r]!r}")
    view = np.where(appa != "", appa, np.where(fl == "Lateral", "LATERAL", "")).astype(object)
    frontal = (fl == "Frontal").to_numpy() & np.isin(view, ("PA", "AP"))
    return view, frontal


def _read_one(root: Path, name: str):
    table = read_table(root / name, COLUMNS)
    ids, paths, patients, studies = _ids(table, root)
    labels, states = observations(table, VOCAB.names)
    nf = table.frame["No Finding"]
    table.first((nf == "-1.0").to_numpy() | (nf == "-1").to_numpy(),
                lambda r: "'No Finding' is never uncertain in CheXpert (1.0 or empty), got -1.0")
    view, frontal = _views(table)
    age, sex = parse_age(table, "Age"), parse_sex(table, "Sex")
    return table, ids, paths, patients, studies, labels, states, view, frontal, age, sex


def read(root: Path, *, views: str = "frontal", need_images: bool = True) -> Collection:
    parts = [_read_one(root, TRAIN_NAME)]
    if (root / VALID_NAME).is_file():
        parts.append(_read_one(root, VALID_NAME))
    keep = [p[8] if views == "frontal" else np.ones(len(p[1]), dtype=bool) for p in parts]
    # an image listed twice (within or across the two files) and a patient in both are errors
    seen: dict[str, tuple[str, int]] = {}
    train_patients = set(parts[0][3].tolist())
    for i, (table, ids, *_rest) in enumerate(parts):
        check_unique(table, pd.Series(ids, dtype=str), "image")
        for row, image in enumerate(ids):
            if image in seen:
                raise table.error(row, f"image {image!r} is also listed in {seen[image][0]} line {seen[image][1]}")
        seen.update({image: (table.path.name, table.line(row)) for row, image in enumerate(ids)})
        if i == 1:
            both = np.flatnonzero(np.isin(parts[1][3], list(train_patients)))
            if len(both):
                raise table.error(int(both[0]), f"patient {parts[1][3][both[0]]} is also in {TRAIN_NAME}; "
                                                "a patient must be in one split only")

    def cat(k: int) -> np.ndarray:
        return np.concatenate([np.asarray(p[k])[m] for p, m in zip(parts, keep)])

    ids = [image for p, m in zip(parts, keep) for image, kept in zip(p[1], m) if kept]
    entries = entries_frame(ids, cat(3), cat(9), cat(10), cat(7), cat(4), cat(5), VOCAB)
    all_paths = {k: v for p in parts for k, v in p[2].items()}
    images, missing = locate_images({i: all_paths[i] for i in ids}, need_images)
    train_val = test = None
    if len(parts) == 2:
        n_train = int(keep[0].sum())
        train_val, test = ids[:n_train], ids[n_train:]
    dropped = sum(int((~m).sum()) for m in keep)
    notes = [f"--views frontal: left out {dropped} lateral or other-view rows"] if dropped else []
    return Collection(
        format="chexpert", root=root, vocab=VOCAB, entries=entries, images=images, missing=missing,
        metadata_path=root / TRAIN_NAME, states=cat(6), train_val=train_val, test=test,
        images_checked=need_images, notes=notes,
    )
