"""Collections' readers, registered by name: each turns a downloaded folder into one :class:`Collection`.

A reader yields the common entries frame (the columns of
:func:`cxrflow.data.metadata.read_data_entry` that the ETL and ``explore`` use: ``image_id``,
``patient_id`` int64, ``age`` int16 (-1 unknown), ``sex`` (M/F/U), ``view``, ``follow_up`` int32,
then one uint8 column per finding, 1 = positive), its :class:`~cxrflow.data.labels.LabelVocabulary`,
the per-row label states when some labels are uncertain or not mentioned (see
:mod:`cxrflow.data.uncertain`), the official split when the collection has one, and the images found.
Nothing outside the readers names a collection's findings or files.

========  =======================================================  =============================
name      what it reads                                            detected by
========  =======================================================  =============================
nih       ChestX-ray14: ``Data_Entry_2017*.csv``, lists, images/  ``Data_Entry_2017*.csv``
chexpert  CheXpert-v1.0(-small): ``train.csv``, ``valid.csv``      ``train.csv`` with ``Path``
mimic     MIMIC-CXR-JPG 2.0.0: chexpert/metadata/split CSV(.gz)   ``mimic-cxr-2.0.0-*.csv[.gz]``
csv       the generic ``labels.csv`` (see :mod:`.generic`)         ``labels.csv``
========  =======================================================  =============================
"""

from __future__ import annotations

import fnmatch
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cxrflow.data.labels import LabelVocabulary
from cxrflow.errors import CxrflowError

VIEW_CHOICES = ("frontal", "all")
FRONTAL = ("PA", "AP")

#: format name -> (module, detection function name); modules are imported when used.
READERS: dict[str, str] = {
    "nih": "cxrflow.data.formats.nih",
    "chexpert": "cxrflow.data.formats.chexpert",
    "mimic": "cxrflow.data.formats.mimic",
    "csv": "cxrflow.data.formats.generic",
}
FORMAT_CHOICES = ("auto", *READERS)


@dataclass
class Collection:
    """One collection folder after its reader: metadata, label states, official split, images."""

    format: str
    root: Path
    vocab: LabelVocabulary
    entries: pd.DataFrame
    images: dict[str, str | Path]  # image id -> file
    missing: list[str]
    metadata_path: Path
    #: uint8 [N, K] states (1 known, 0 not mentioned, 2 uncertain) or None: every label known
    states: np.ndarray | None = None
    #: NIH-style official lists (train_val, test image ids) or None
    train_val: list[str] | None = None
    test: list[str] | None = None
    #: official val image ids, when the collection has its own validation split
    val: list[str] | None = None
    unlisted: list[str] = field(default_factory=list)
    bbox: pd.DataFrame | None = None
    images_checked: bool = True
    notes: list[str] = field(default_factory=list)
    #: the ``--views`` it was read with (the manifest records it, so the store can be made again)
    views: str = "frontal"

    def summary(self) -> dict:
        return {
            "format": self.format,
            "metadata_rows": int(len(self.entries)),
            "patients": int(self.entries["patient_id"].nunique()),
            "images_found": len(self.entries) - len(self.missing) if self.images_checked else None,
            "missing": len(self.missing) if self.images_checked else None,
        }


Reader = Callable[..., Collection]


def _module(name: str):
    if name not in READERS:
        raise CxrflowError(f"unknown --format {name!r}; choose one of {', '.join(FORMAT_CHOICES)}")
    return importlib.import_module(READERS[name])


def detect_format(data_dir: str | os.PathLike) -> str:
    """The one format whose files are in ``data_dir``; an error when none or several match."""
    root = Path(data_dir)
    if not root.is_dir():
        raise CxrflowError("not a folder (expected a chest X-ray collection folder)", root)
    found = [name for name in READERS if _module(name).detect(root)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise CxrflowError(
            "no known collection files here (Data_Entry_2017*.csv, CheXpert train.csv/valid.csv, "
            "mimic-cxr-2.0.0-*.csv, labels.csv); pass --format",
            root,
        )
    raise CxrflowError(f"the folder looks like several formats ({', '.join(found)}); pass --format", root)


def check_not_metadata_file(path: Path) -> None:
    """A collection's own metadata file given instead of its folder (``Data_Entry_2017.csv``, CheXpert's
    ``train.csv``) is one error naming the folder to give, not a generic labels CSV."""
    for name in READERS:
        reader = _module(name)
        patterns = getattr(reader, "METADATA_FILES", ())
        if any(fnmatch.fnmatch(path.name, p) for p in patterns) and reader.detect(path.parent):
            raise CxrflowError(
                f"this is the metadata file of a {name} collection, not a labels CSV (--format csv): give its "
                f"folder: --data {path.parent}",
                path,
            )


def say_left_out(notes: list[str] | None) -> None:
    """Print what reading a collection left out and why (its ``notes``), one ``left out:`` line each;
    explore, split and etl call it, and keep the same lines in their summary file."""
    for note in notes or []:
        print(f"left out: {note}")


def load_collection(
    data_dir: str | os.PathLike,
    format: str = "auto",
    *,
    views: str = "frontal",
    strict: bool = False,
    need_images: bool = True,
) -> Collection:
    """Read a collection folder with the named reader (``auto``: detected)."""
    if views not in VIEW_CHOICES:
        raise CxrflowError(f"--views must be one of {', '.join(VIEW_CHOICES)}, got {views!r}")
    path = Path(data_dir)
    if path.is_file() and format in ("auto", "csv"):
        check_not_metadata_file(path)
    if path.is_file():  # a CSV file named directly: the generic format, its folder the data folder
        if format not in ("auto", "csv"):
            raise CxrflowError(f"--data must be the collection's folder for --format {format}", path)
        collection = _module("csv").read(path.parent, views=views, need_images=need_images, file_name=path.name)
    else:
        name = detect_format(path) if format == "auto" else format
        collection = _module(name).read(path, views=views, need_images=need_images)
    collection.views = views
    if len(collection.entries) == 0:  # a header-only file, or --views frontal leaving nothing
        why = (
            "; ".join(collection.notes) + " (try --views all)"
            if collection.notes
            else "the file has a header but no rows"
        )
        raise CxrflowError(f"no images: {why}", collection.metadata_path)
    if strict and collection.missing:
        raise CxrflowError(
            f"{len(collection.missing)} of {len(collection.entries)} images are not on disk "
            f"(first: {collection.missing[0]!r}); drop --strict to skip them",
            collection.root,
        )
    return collection


def add_format_arguments(parser, *, views: bool = True) -> None:
    """``--format`` (and ``--views``) for explore, split and etl."""
    parser.add_argument(
        "--format",
        default="auto",
        choices=FORMAT_CHOICES,
        help="collection format (default: detected from the folder's files)",
    )
    if views:
        parser.add_argument(
            "--views",
            default="frontal",
            choices=VIEW_CHOICES,
            help="frontal (PA/AP only, where the format knows the view; default) or all",
        )


def store_label_keys(collection: Collection, records: list[dict], quarantined: set[str]) -> dict:
    """Manifest keys from the collection: ``format``, per-label ``label_counts`` over the written
    train rows and, when some labels are not known, ``uncertain_policies`` and ``pos_weight``
    (U-Ignore: known labels only; training recomputes it for its policy from ``label_counts``)."""
    from cxrflow.data.uncertain import POLICIES, label_counts, pos_weight

    train = [r for r in records if r["split"] == "train" and r["image_id"] not in quarantined]
    k = len(collection.vocab)
    labels = np.frombuffer(b"".join(r["labels"] for r in train), dtype=np.uint8).reshape(-1, k)
    states = None
    if collection.states is not None:
        states = np.frombuffer(b"".join(r["known"] for r in train), dtype=np.uint8).reshape(-1, k)
    counts = label_counts(labels, states, collection.vocab.names)
    keys: dict = {"format": collection.format, "views": collection.views, "label_counts": counts}
    if states is not None:
        keys["uncertain_policies"] = list(POLICIES)
        keys["pos_weight"] = pos_weight(counts, collection.vocab.names, "ignore")
    if collection.notes:
        keys["notes"] = list(collection.notes)
    return keys
