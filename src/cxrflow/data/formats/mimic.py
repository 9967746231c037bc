"""MIMIC-CXR-JPG v2.0.0: ``mimic-cxr-2.0.0-{chexpert,metadata,split}.csv`` (gzipped or not).

One row per image (``dicom_id``) of the metadata file; labels are per study (``chexpert.csv``,
CheXpert's values: every image of a study gets them; a study without a labels row has every label
not mentioned); the official split (``train``/``validate``/``test``) is used as is. Images are
``files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg`` (or ``.dcm``). The files hold no age or sex (unknown in
the store). ``--views frontal`` keeps ``ViewPosition`` PA and AP.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cxrflow.data.formats import FRONTAL, Collection
from cxrflow.data.formats.chexpert import DERIVED, VOCAB
from cxrflow.data.formats.common import (
    Table,
    check_patient_splits,
    check_unique,
    entries_frame,
    locate_images,
    observations,
    read_table,
)
from cxrflow.data.uncertain import UNMENTIONED
from cxrflow.errors import CxrflowError

PREFIX = "mimic-cxr-2.0.0-"
#: The collection's own files a user may give as --data instead of its folder.
METADATA_FILES = (f"{PREFIX}*.csv", f"{PREFIX}*.csv.gz")
LABEL_HEADER = ("subject_id", "study_id", *sorted(VOCAB.names))
METADATA_HEADER = (
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
SPLIT_HEADER = ("dicom_id", "study_id", "subject_id", "split")
SPLIT_VALUES = {"train": "train", "validate": "val", "test": "test"}


def _find(root: Path, kind: str) -> Path:
    for name in (f"{PREFIX}{kind}.csv.gz", f"{PREFIX}{kind}.csv"):
        if (root / name).is_file():
            return root / name
    raise CxrflowError(f"no {PREFIX}{kind}.csv(.gz) in this folder", root)


def detect(root: Path) -> bool:
    return any(root.glob(f"{PREFIX}*.csv*"))


def _ints(table: Table, column: str) -> np.ndarray:
    text = table.frame[column]
    numbers = pd.to_numeric(text, errors="coerce")
    table.first(
        (numbers.isna() | (numbers < 0) | (numbers % 1 != 0)).to_numpy(),
        lambda r: f"{column!r} must be a whole number, got {text.iloc[r]!r}",
    )
    return numbers.to_numpy().astype(np.int64)


def _study_labels(path: Path) -> tuple[pd.Index, np.ndarray, np.ndarray]:
    table = read_table(path, ("subject_id", "study_id", *VOCAB.names))
    studies = pd.Series(_ints(table, "study_id"))
    check_unique(table, studies, "study")
    labels, states = observations(table, VOCAB.names, DERIVED)
    return pd.Index(studies), labels, states


def read(root: Path, *, views: str = "frontal", need_images: bool = True) -> Collection:
    meta = read_table(_find(root, "metadata"), ("dicom_id", "subject_id", "study_id", "ViewPosition"))
    ids = meta.frame["dicom_id"]
    meta.first((ids == "").to_numpy(), lambda r: "empty 'dicom_id'")
    check_unique(meta, ids, "image")
    subject, study = _ints(meta, "subject_id"), _ints(meta, "study_id")

    split_table = read_table(_find(root, "split"), ("dicom_id", "study_id", "subject_id", "split"))
    split_text = split_table.frame["split"]
    split_table.first(
        ~split_text.isin(SPLIT_VALUES).to_numpy(),
        lambda r: f"'split' must be train, validate or test, got {split_text.iloc[r]!r}",
    )
    check_unique(split_table, split_table.frame["dicom_id"], "image")
    check_patient_splits(split_table, _ints(split_table, "subject_id"), split_text.to_numpy(dtype=object))
    split_of = pd.Series(split_text.map(SPLIT_VALUES).to_numpy(), index=split_table.frame["dicom_id"].to_numpy())
    split = split_of.reindex(ids.to_numpy()).to_numpy(dtype=object)
    meta.first(
        pd.isna(split), lambda r: f"study {study[r]} (image {ids.iloc[r]!r}) has no entry in {split_table.path.name}"
    )

    studies, study_labels, study_states = _study_labels(_find(root, "chexpert"))
    at = studies.get_indexer(study)
    labels = np.where((at >= 0)[:, None], study_labels[at], 0).astype(np.uint8)
    states = np.where((at >= 0)[:, None], study_states[at], UNMENTIONED).astype(np.uint8)

    view = meta.frame["ViewPosition"].str.upper().to_numpy(dtype=object)
    keep = np.isin(view, FRONTAL) if views == "frontal" else np.ones(len(ids), dtype=bool)
    order = pd.Series(study).groupby(subject).rank(method="dense").to_numpy().astype(np.int32) - 1
    n = int(keep.sum())
    entries = entries_frame(
        ids[keep], subject[keep], np.full(n, -1), np.full(n, "U"), view[keep], order[keep], labels[keep], VOCAB
    )
    base = os.path.join(str(root), "files")
    jpg = {d: f"{base}/p{str(s)[:2]}/p{s}/s{t}/{d}.jpg" for d, s, t in zip(ids[keep], subject[keep], study[keep])}
    images, missing = locate_images(jpg, need_images)
    if missing:  # a DICOM export of the same layout
        dicom, missing = locate_images({d: jpg[d][: -len(".jpg")] + ".dcm" for d in missing}, need_images)
        images.update(dicom)
    kept_split = split[keep]
    kept_ids = entries["image_id"].to_numpy()
    dropped = int((~keep).sum())
    return Collection(
        format="mimic",
        root=root,
        vocab=VOCAB,
        entries=entries,
        images=images,
        missing=missing,
        metadata_path=meta.path,
        states=states[keep],
        train_val=kept_ids[kept_split != "test"].tolist(),
        test=kept_ids[kept_split == "test"].tolist(),
        val=kept_ids[kept_split == "val"].tolist(),
        images_checked=need_images,
        notes=[f"--views frontal: left out {dropped} images whose ViewPosition is not PA/AP"] if dropped else [],
    )
