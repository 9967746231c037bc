"""CheXpert v1.0 (and the "-small" copy): ``train.csv`` and ``valid.csv`` as downloaded.

``Path`` starts with the folder's own name (``CheXpert-v1.0-small/train/patient00001/study1/
view1_frontal.jpg``); point ``--data`` at that folder or at the one that contains it. The image id is the path below it
(``train/patient00001/study1/view1_frontal.jpg``), the patient the ``patientNNNNN`` component, the
follow-up the ``studyN`` number. Observation columns hold 1.0, 0.0, -1.0 (uncertain) or nothing
(not mentioned): the store keeps them as label states (:mod:`cxrflow.data.uncertain`). ``train.csv``
is train/val (patients split by ``--val-fraction``), ``valid.csv`` the test split.
``--views frontal`` keeps ``Frontal`` rows with ``AP/PA`` = AP or PA.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxrflow.data.formats import Collection
from cxrflow.data.formats.common import (
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
#: Observations the CheXpert labeler derives: ``No Finding`` is 1.0 or empty, never 0.0 or -1.0, in
#: train.csv (and MIMIC-CXR-JPG's chexpert.csv); empty there says a finding was mentioned, a known 0.
#: Read as "not mentioned" it had no known negative at all: pos_weight 0, a head that never trained.
DERIVED = ("No Finding",)
TRAIN_NAME, VALID_NAME = "train.csv", "valid.csv"
#: The collection's own files a user may give as --data instead of its folder.
METADATA_FILES = (TRAIN_NAME, VALID_NAME)
COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *VOCAB.names)


def _folder(root: Path) -> Path | None:
    """The folder holding train.csv: ``root`` itself, or its one ``CheXpert-v1.0*`` subfolder."""
    for folder in [root, *sorted(root.glob("CheXpert-v1.0*"))]:
        if (folder / TRAIN_NAME).is_file():
            with open(folder / TRAIN_NAME, encoding="utf-8-sig", errors="replace") as f:
                if f.readline().startswith("Path,"):
                    return folder
    return None


def detect(root: Path) -> bool:
    return _folder(root) is not None


def _ids(table, root: Path) -> tuple[list[str], dict[str, Path], np.ndarray, np.ndarray]:
    """Image ids, their files, patient numbers and study numbers from the ``Path`` column."""
    text = table.frame["Path"].str.replace("\\", "/", regex=False)
    # "CheXpert-v1.0-small/train/..." is relative to the folder's parent (whatever it was renamed to)
    first = text.str.split("/", n=1).str[0]
    strip = (first == root.name) | first.str.startswith("CheXpert-v1.0")
    relative = text.where(~strip, text.str.split("/", n=1).str[1].fillna(""))
    paths = image_paths(root, relative, table)
    patient = relative.str.extract(r"(?:^|/)patient(\d+)(?:/|$)", expand=False)
    table.first(patient.isna().to_numpy(), lambda r: f"no patientNNNNN folder in Path {table.frame['Path'].iloc[r]!r}")
    study = relative.str.extract(r"(?:^|/)study(\d+)(?:/|$)", expand=False).fillna("0")
    return relative.tolist(), paths, patient.astype(np.int64).to_numpy(), study.astype(np.int32).to_numpy()


def _views(table) -> tuple[np.ndarray, np.ndarray]:
    """(view per row: AP/PA/LL/RL or LATERAL, frontal mask)."""
    fl, appa = table.frame["Frontal/Lateral"], table.frame["AP/PA"]
    table.first(
        ~fl.isin(["Frontal", "Lateral"]).to_numpy(),
        lambda r: f"'Frontal/Lateral' must be Frontal or Lateral, got {fl.iloc[r]!r}",
    )
    view = np.where(appa != "", appa, np.where(fl == "Lateral", "LATERAL", "")).astype(object)
    frontal = (fl == "Frontal").to_numpy() & np.isin(view, ("PA", "AP"))
    return view, frontal


def _left_out_note(parts: list) -> str:
    """What ``--views frontal`` left out and why: lateral rows, and rows marked Frontal whose view is not AP/PA."""
    lateral = sum(int((np.asarray(p[7]) == "LATERAL").sum()) for p in parts)
    odd = [v for p in parts for v, f in zip(p[7], p[8]) if not f and v != "LATERAL"]
    counts = sorted(pd.Series(odd, dtype=object).value_counts().items())
    views = ", ".join(f"{n} {v or 'without a view'}" for v, n in counts)
    text = f"--views frontal: left out {lateral + len(odd)} rows: {lateral} lateral"
    return text + (f", {len(odd)} marked Frontal whose AP/PA view is not AP or PA ({views})" if odd else "")


def _read_one(root: Path, name: str):
    table = read_table(root / name, COLUMNS)
    ids, paths, patients, studies = _ids(table, root)
    labels, states = observations(table, VOCAB.names, DERIVED)
    view, frontal = _views(table)
    age, sex = parse_age(table, "Age"), parse_sex(table, "Sex")
    return table, ids, paths, patients, studies, labels, states, view, frontal, age, sex


def read(root: Path, *, views: str = "frontal", need_images: bool = True) -> Collection:
    root = _folder(root) or root  # the folder that contains CheXpert-v1.0-small/ works too
    parts = [_read_one(root, TRAIN_NAME)]
    if (root / VALID_NAME).is_file():
        parts.append(_read_one(root, VALID_NAME))
    keep = [p[8] if views == "frontal" else np.ones(len(p[1]), dtype=bool) for p in parts]
    # an image listed twice (within or across the two files) and a patient in both are errors
    for table, ids, *_rest in parts:
        check_unique(table, pd.Series(ids, dtype=str), "image")
    if len(parts) == 2:
        (train, train_ids, _, train_patients, *_), (valid, valid_ids, _, valid_patients, *_) = parts
        again = pd.Index(train_ids).get_indexer(valid_ids)
        valid.first(
            again >= 0,
            lambda r: f"image {valid_ids[r]!r} is also listed in {TRAIN_NAME} line {train.line(int(again[r]))}",
        )
        valid.first(
            np.isin(valid_patients, train_patients),
            lambda r: f"patient {valid_patients[r]} is also in {TRAIN_NAME}; a patient must be in one split only",
        )

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
    notes = [_left_out_note(parts)] if dropped and views == "frontal" else []
    return Collection(
        format="chexpert",
        root=root,
        vocab=VOCAB,
        entries=entries,
        images=images,
        missing=missing,
        metadata_path=root / TRAIN_NAME,
        states=cat(6),
        train_val=train_val,
        test=test,
        images_checked=need_images,
        notes=notes,
    )
