"""Patient-level train/val/test split, as the paper does it.

With the official lists: test = every image of ``test_list.txt``; the patients of
``train_val_list.txt`` go to train/val, ``val_fraction`` of them to val. Without lists: all patients
70/10/20 to train/val/test. Patients are sorted before a seeded shuffle, so the split depends only
on the seed and the set of patients, not on the row order. No patient is ever in two splits.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cxrflow import csvsafe
from cxrflow.atomic import atomic_path
from cxrflow.data.formats import Collection
from cxrflow.errors import CxrflowError

MODE_OFFICIAL = "official-lists"
MODE_PATIENTS = "patients-70-10-20"
MODE_CSV = "split-csv"
SPLIT_NAMES = ("train", "val", "test")


def _shuffled_patients(patients: np.ndarray, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.sort(patients))


def _count(fraction: float, n: int, keep_others: int) -> int:
    """round(fraction * n), but at least 1 when the fraction is positive and there are enough patients."""
    k = int(round(fraction * n))
    if fraction > 0 and k == 0 and n > keep_others:
        k = 1
    return min(k, max(n - keep_others, 0))


def assign_splits(
    entries: pd.DataFrame,
    train_val: list[str] | None,
    test: list[str] | None,
    val_fraction: float = 0.3,
    seed: int = 0,
) -> pd.DataFrame:
    """``image_id, patient_id, split`` for every row of ``entries`` (same order).

    ``frame.attrs["mode"]`` is ``"official-lists"`` or ``"patients-70-10-20"`` (when both lists are
    None); ``frame.attrs["val_fraction"]`` and ``["seed"]`` record the parameters.
    """
    if not 0 <= val_fraction < 1:
        raise CxrflowError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if (train_val is None) != (test is None):
        raise CxrflowError("give both official lists (train_val and test) or neither")
    ids = entries["image_id"]
    patient = entries["patient_id"].to_numpy(dtype=np.int64)
    split = np.empty(len(entries), dtype=object)
    if train_val is not None:
        mode = MODE_OFFICIAL
        in_test = ids.isin(test).to_numpy()
        in_tv = ids.isin(train_val).to_numpy()
        if (in_test & in_tv).any():
            raise CxrflowError(f"image {ids[in_test & in_tv].iloc[0]!r} is in both official lists")
        if not (in_test | in_tv).all():
            raise CxrflowError(f"image {ids[~(in_test | in_tv)].iloc[0]!r} is in neither official list")
        listed = len(set(train_val)) + len(set(test))
        if listed != len(entries):
            raise CxrflowError(f"the official lists name {listed} images, the metadata has {len(entries)}")
        both = np.intersect1d(patient[in_test], patient[in_tv])
        if len(both):
            raise CxrflowError(f"patient {int(both[0])} has images in both official lists")
        tv_patients = _shuffled_patients(np.unique(patient[in_tv]), seed)
        n_val = _count(val_fraction, len(tv_patients), keep_others=1)
        val_patients = tv_patients[:n_val]
        split[in_test] = "test"
        split[in_tv] = np.where(np.isin(patient[in_tv], val_patients), "val", "train")
    else:
        mode = MODE_PATIENTS
        patients = _shuffled_patients(np.unique(patient), seed)
        n_test = _count(0.2, len(patients), keep_others=2)
        n_val = _count(0.1, len(patients), keep_others=n_test + 1)
        names = ["test"] * n_test + ["val"] * n_val + ["train"] * (len(patients) - n_test - n_val)
        split[:] = pd.Series(names, index=patients).reindex(patient).to_numpy()
    frame = pd.DataFrame({"image_id": ids.to_numpy(), "patient_id": patient, "split": split.astype(str)})
    frame.attrs.update({"mode": mode, "val_fraction": float(val_fraction), "seed": int(seed)})
    return frame


def read_split_csv(path: str | os.PathLike, entries: pd.DataFrame) -> pd.DataFrame:
    """The assignment a split file (``cxrflow split --out``) gives the rows of ``entries``, in the
    same shape as :func:`assign_splits` (``frame.attrs["mode"] == "split-csv"``).

    Refused, in one line each: an unreadable file, a split other than train/val/test, an image
    listed twice, images of the metadata the file does not assign, images it names that the
    metadata does not have, and a patient (by the metadata's patient ids) in two splits.
    """
    path = Path(path)
    if path.exists() and not path.is_file():  # a pipe or device would hang the ETL before it starts
        raise CxrflowError("not a regular file (a folder, named pipe or device); expected a split CSV file", path)
    try:
        table = csvsafe.read_frame(path, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise CxrflowError("no such split file", path) from None
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise CxrflowError(f"unreadable split file: {str(exc).splitlines()[0]}", path) from None
    missing_cols = [c for c in ("image_id", "split") if c not in table.columns]
    if missing_cols:
        raise CxrflowError(
            f"split file needs columns image_id,split (as 'cxrflow split' writes); missing {missing_cols}", path
        )
    bad = ~table["split"].isin(SPLIT_NAMES)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise CxrflowError(
            f"line {row + 2}: split {table['split'].iloc[row]!r} is not one of {', '.join(SPLIT_NAMES)}", path
        )
    dup = table["image_id"].duplicated()
    if dup.any():
        raise CxrflowError(f"image {table['image_id'][dup].iloc[0]!r} is listed more than once", path)
    assigned = dict(zip(table["image_id"], table["split"]))
    ids = entries["image_id"].astype(str)
    unassigned = ids[~ids.isin(assigned)]
    if len(unassigned):
        raise CxrflowError(
            f"{len(unassigned)} image(s) of the metadata have no split in this file (first {unassigned.iloc[0]!r}); "
            "write it again with 'cxrflow split' for this release",
            path,
        )
    extra = sorted(set(assigned) - set(ids))
    if extra:
        raise CxrflowError(
            f"{len(extra)} image(s) in this file are not in the metadata (first {extra[0]!r}); is it another release's split?",
            path,
        )
    split = ids.map(assigned).to_numpy().astype(str)
    patient = entries["patient_id"].to_numpy(dtype=np.int64)
    per_patient = pd.DataFrame({"p": patient, "s": split}).groupby("p")["s"].nunique()
    leaks = per_patient[per_patient > 1]
    if len(leaks):
        p = int(leaks.index[0])
        names = sorted(set(split[patient == p]))
        raise CxrflowError(
            f"patient {p} has images in {' and '.join(names)} ({len(leaks)} patient(s) in more than one split); "
            "a patient must stay in one split",
            path,
        )
    frame = pd.DataFrame({"image_id": ids.to_numpy(), "patient_id": patient, "split": split})
    frame.attrs.update({"mode": MODE_CSV, "split_csv": str(path.absolute())})
    return frame


def assign_collection_splits(collection: Collection, val_fraction: float, seed: int) -> pd.DataFrame:
    """``image_id, patient_id, split`` for every row: the official split when there is one.

    With an official validation split (MIMIC's ``validate``, a CSV's ``val``) it is used as is and
    ``val_fraction`` does not apply.
    """
    if collection.val is None:
        return assign_splits(collection.entries, collection.train_val, collection.test, val_fraction, seed)
    frame = assign_splits(collection.entries, collection.train_val, collection.test, 0.0, seed)
    frame.loc[frame["image_id"].isin(collection.val).to_numpy(), "split"] = "val"
    frame.attrs["mode"] = "official-split"
    return frame


def split_counts(frame: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Images and patients per split: ``{"train": {"images": n, "patients": n}, ...}``."""
    out = {}
    for name in SPLIT_NAMES:
        part = frame[frame["split"] == name]
        out[name] = {"images": int(len(part)), "patients": int(part["patient_id"].nunique())}
    return out


def _is_split_csv(path: Path) -> bool:
    """Whether ``path`` starts with the header :func:`write_split_csv` writes."""
    try:
        with open(path, "rb") as f:
            return f.read(64).split(b"\n")[0].strip() == b"image_id,patient_id,split"
    except OSError:
        return False


def write_split_csv(frame: pd.DataFrame, path: str | os.PathLike, overwrite: bool = False) -> None:
    """Write ``image_id,patient_id,split`` to a temporary file, then rename it into place.

    The output's lock is held throughout: a second split on the same file stops naming the first.
    """
    from cxrflow.outputs import OutputLock

    path = Path(path)
    if path.is_dir():
        raise CxrflowError("is a folder; --out must name a CSV file (e.g. split.csv)", path)
    if not path.parent.is_dir():
        raise CxrflowError("folder of the output file does not exist", path.parent)
    with OutputLock(path, "split"):
        if path.exists() and not overwrite:
            raise CxrflowError("output exists; pass --overwrite to replace it", path)
        if path.exists() and not _is_split_csv(path):
            raise CxrflowError(
                "is not a cxrflow split CSV (no image_id,patient_id,split header); refusing to replace it", path
            )
        with atomic_path(path) as tmp:
            csvsafe.write_frame(frame[["image_id", "patient_id", "split"]], tmp, index=False)
