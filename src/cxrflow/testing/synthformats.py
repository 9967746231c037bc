"""Small synthetic collections in the CheXpert, MIMIC-CXR-JPG and generic CSV layouts, and DICOM files.

For tests, the demo and benchmarks: each writer lays out the files exactly as the format's reader
expects them as downloaded (see :mod:`cxrflow.data.formats`), with a planted, learnable signal per
finding (:func:`cxrflow.testing.synthstore.planted_image`) and a share of uncertain and unmentioned labels.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cxrflow.testing.synthstore import planted_image

#: (value written, label, state) draws for a CheXpert-style observation
_OBS = (("1.0", 0.25), ("0.0", 0.45), ("-1.0", 0.1), ("", 0.2))


def _mark(folder: Path) -> None:
    """Mark the collection synthetic, so that a store made from it says so (:mod:`cxrflow.data.synthetic`)."""
    from cxrflow.outputs import write_marker

    write_marker(folder, "synth", generator="cxrflow.testing.synthformats")


def _observation(rng: np.random.Generator) -> str:
    values, weights = zip(*_OBS)
    return str(rng.choice(values, p=weights))


def _image(path: Path, values: Sequence[str], size: int, rng: np.random.Generator) -> None:
    """A planted image: findings with value 1.0 (and half of the uncertain ones) brighten their cell."""
    positive = np.array([v == "1.0" or (v == "-1.0" and rng.random() < 0.5) for v in values], dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = planted_image(positive, size, rng)
    if path.suffix == ".dcm":
        write_dicom(path, img.astype(np.uint16) * 16, bits_stored=12)
    else:
        Image.fromarray(img).save(path)


def write_chexpert(
    root: str | os.PathLike,
    patients: int = 30,
    *,
    size: int = 48,
    seed: int = 0,
    valid_patients: int = 6,
    small: bool = True,
) -> Path:
    """``root/CheXpert-v1.0[-small]/{train.csv, valid.csv, train/, valid/}``; returns that folder."""
    from cxrflow.data.formats.chexpert import COLUMNS, VOCAB

    rng = np.random.default_rng(seed)
    folder = Path(root) / ("CheXpert-v1.0-small" if small else "CheXpert-v1.0")
    for name, first, count in (("train", 1, patients), ("valid", 64541, valid_patients)):
        rows = []
        for p in range(first, first + count):
            for study in range(1, 1 + int(rng.integers(1, 3))):
                for view, kind in ((1, "frontal"), (2, "lateral")):
                    if kind == "lateral" and rng.random() < 0.5:
                        continue
                    rel = f"{name}/patient{p:05d}/study{study}/view{view}_{kind}.jpg"
                    obs = [
                        _observation(rng) if name == "train" else str(rng.choice(["1.0", "0.0"])) for _ in VOCAB.names
                    ]
                    obs[0] = "1.0" if all(v in ("0.0", "") for v in obs[1:]) else ""
                    appa = str(rng.choice(["AP", "PA"])) if kind == "frontal" else ""
                    sex = str(rng.choice(["Male", "Female"]))
                    rows.append(
                        [f"{folder.name}/{rel}", sex, str(int(rng.integers(18, 90))), kind.capitalize(), appa, *obs]
                    )
                    _image(folder / rel, obs, size, rng)
        with open(folder / f"{name}.csv", "w", newline="") as f:
            csv.writer(f).writerows([list(COLUMNS), *rows])
    _mark(folder)
    return folder


def write_mimic(
    root: str | os.PathLike, subjects: int = 30, *, size: int = 48, seed: int = 0, gzipped: bool = False
) -> Path:
    """A MIMIC-CXR-JPG folder: the three CSVs (optionally .gz) and ``files/pXX/pSUBJECT/sSTUDY/*.jpg``."""
    import gzip

    from cxrflow.data.formats.chexpert import VOCAB
    from cxrflow.data.formats.mimic import PREFIX

    rng = np.random.default_rng(seed)
    root = Path(root)
    labels, meta, split = [], [], []
    study_id = 50000000
    for s in range(subjects):
        subject = 10000000 + s * 37
        which = "test" if s % 5 == 0 else "validate" if s % 7 == 1 else "train"
        for _ in range(int(rng.integers(1, 3))):
            study_id += int(rng.integers(1, 100))
            obs = [_observation(rng) for _ in VOCAB.names]
            labels.append([str(subject), str(study_id), *obs])
            for view in ("PA", "LATERAL") if rng.random() < 0.5 else ("AP",):
                dicom_id = f"{rng.integers(0, 2**63):016x}-{study_id}"
                meta.append(
                    [
                        dicom_id,
                        str(subject),
                        str(study_id),
                        "CHEST (PA AND LAT)",
                        view,
                        str(size),
                        str(size),
                        "21800101",
                        "120000.000",
                        "",
                        "",
                        "",
                    ]
                )
                split.append([dicom_id, str(study_id), str(subject), which])
                _image(
                    root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study_id}" / f"{dicom_id}.jpg",
                    obs,
                    size,
                    rng,
                )
    from cxrflow.data.formats.mimic import LABEL_HEADER, METADATA_HEADER, SPLIT_HEADER

    for kind, header, rows in (
        ("chexpert", LABEL_HEADER, labels),
        ("metadata", METADATA_HEADER, meta),
        ("split", SPLIT_HEADER, split),
    ):
        path = root / f"{PREFIX}{kind}.csv"
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([list(header), *rows])
        if gzipped:
            path.with_suffix(".csv.gz").write_bytes(gzip.compress(path.read_bytes()))
            path.unlink()
    _mark(root)
    return root


def write_generic(
    root: str | os.PathLike,
    patients: int = 30,
    *,
    size: int = 48,
    seed: int = 0,
    findings: Sequence[str] = ("Nodule", "Effusion", "Mass"),
    per_column: bool = True,
    split: bool = False,
    suffix: str = ".png",
) -> Path:
    """A ``labels.csv`` folder (see :mod:`cxrflow.data.formats.generic`) with images under ``images/``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    header = ["image", "patient_id", "age", "sex", "view"] + (list(findings) if per_column else ["labels"])
    header += ["split"] if split else []
    rows = []
    for p in range(1, patients + 1):
        which = "test" if p % 5 == 0 else "val" if p % 5 == 1 else "train"
        for k in range(int(rng.integers(1, 4))):
            rel = f"images/case{p:04d}_{k}{suffix}"
            obs = [_observation(rng) for _ in findings]
            if not per_column:
                obs = ["1.0" if v == "1.0" else "0.0" for v in obs]
            _image(root / rel, obs, size, rng)
            values = (
                [{"1.0": "1", "0.0": "0", "-1.0": "-1", "": ""}[v] for v in obs]
                if per_column
                else ["|".join(f for f, v in zip(findings, obs) if v == "1.0") or "No Finding"]
            )
            rows.append(
                [
                    rel,
                    f"H{p:05d}",
                    str(int(rng.integers(20, 90))),
                    str(rng.choice(["M", "F"])),
                    str(rng.choice(["PA", "AP"])),
                    *values,
                ]
                + ([which] if split else [])
            )
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    _mark(root)
    return root


def write_dicom(
    path: str | os.PathLike,
    pixels: np.ndarray,
    *,
    bits_stored: int = 16,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    spacing: tuple[float, float] | None = (0.143, 0.143),
    transfer_syntax: str = "explicit",
    with_pixels: bool = True,
) -> Path:
    """Write a single-frame radiograph DICOM file with pydicom.

    ``pixels``: uint16 (or uint8 with ``bits_stored=8``) HxW. ``transfer_syntax``: ``explicit``,
    ``implicit``, ``rle`` (pydicom's own encoder) or ``jpeg2000`` (lossless, pylibjpeg-openjpeg).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEG2000Lossless,
        RLELossless,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    path = Path(path)
    pixels = np.asarray(pixels)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if transfer_syntax == "implicit" else ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = "SYNTH"
    ds.PatientSex = "F"
    ds.PatientAge = "063Y"
    if with_pixels:
        eight = pixels.dtype == np.uint8
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 8 if eight else 16
        ds.BitsStored = 8 if eight else bits_stored
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.astype(np.uint8 if eight else np.uint16).tobytes()
    if slope is not None or intercept is not None:
        ds.RescaleSlope = slope if slope is not None else 1
        ds.RescaleIntercept = intercept if intercept is not None else 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if spacing is not None:
        ds.PixelSpacing = list(spacing)
    if with_pixels and transfer_syntax == "rle":
        ds.compress(RLELossless, pixels)
    elif with_pixels and transfer_syntax == "jpeg2000":
        ds.compress(JPEG2000Lossless, pixels, encoding_plugin="pylibjpeg")
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True, implicit_vr=transfer_syntax == "implicit", little_endian=True)
    return path
