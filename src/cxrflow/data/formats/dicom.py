"""DICOM radiographs to 8-bit gray, the way hospital exports arrive.

:func:`decode_dicom` is used by :mod:`cxrflow.data.imaging` for every ``.dcm`` (or ``DICM``-tagged)
file, so the ETL, every format and ``predict`` accept DICOM wherever they accept an image. Rules,
in order (DICOM PS3.3 C.11):

1. pixels decoded by pydicom; compressed transfer syntaxes through its plugins (pylibjpeg with
   libjpeg / openjpeg for JPEG and JPEG 2000; RLE natively). A file without pixel data, or whose
   syntax no installed plugin decodes, or whose rescale, LUT or window values are unusable (text, a
   short LUT descriptor), raises :class:`~cxrflow.data.imagecheck.ImageError` with the reason
   (the ETL quarantines it). Multi-frame files: the first frame. Colour files: ITU-R 601 luma (``YBR_FULL``: its own Y plane);
   ``PALETTE COLOR`` files: the luma of each index's palette colour.
2. modality transform: a Modality LUT or ``RescaleSlope``/``RescaleIntercept`` (LUTs read by :func:`_lut`).
3. VOI transform to 0..255: a VOI LUT (scaled by its output bit depth) when present, else the first
   ``WindowCenter``/``WindowWidth`` with the standard's linear function
   ``((x - (c - 0.5)) / (w - 1) + 0.5)`` clipped to [0, 1] (``VOILUTFunction`` LINEAR_EXACT and
   SIGMOID by their own formulas); without either, 8-bit data as stored
   and deeper data from the image's own minimum..maximum (12/16-bit data is reduced to 8 bits only
   after this step).
4. ``MONOCHROME1`` (bright = air) inverted so that bright = dense, like ``MONOCHROME2``.
5. rounded to uint8.

For integer pixel data steps 2-5 are computed once per stored value that occurs (a table of at most
65,536 entries; the min..max of step 3 is then that of the occurring range, the same for the usual
monotonic rescale) and applied with one lookup per pixel.

``PixelSpacing`` (or ``ImagerPixelSpacing``) is returned with the pixels, in mm (row, column).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrflow.data.imagecheck import ImageError, check_pixel_budget, library_messages

DICOM_SUFFIXES = (".dcm", ".dicom")


@dataclass
class DicomImage:
    """An 8-bit gray radiograph decoded from DICOM, and what the header said about it."""

    gray: np.ndarray
    spacing: tuple[float, float] | None
    photometric: str
    bits_stored: int | None
    transfer_syntax: str


def is_dicom(data: bytes, where: str | None = None) -> bool:
    """A Part 10 file (``DICM`` at byte 128) or a file named ``*.dcm``."""
    return data[128:132] == b"DICM" or (where is not None and where.lower().endswith(DICOM_SUFFIXES))


def _error(message: str, where: str | None):
    return ImageError(message, where)


def _short(exc: BaseException) -> str:
    """The exception's text on one line (every plugin's reason when pydicom tried several)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def _first(value) -> float:
    """The first of a possibly multi-valued DICOM number; a header number that is not finite (NaN,
    inf: a damaged or hostile header) is a ValueError, never a factor applied to the pixels."""
    try:
        number = float(value[0])
    except TypeError:
        number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{number} is not a finite number")
    return number


def _lut(ds, item) -> tuple[int, np.ndarray, int]:
    """(first stored value mapped, entries, bits per entry) of a Modality or VOI LUT item (PS3.3 C.11.1.1).

    Read here rather than by pydicom's ``apply_voi_lut``/``apply_modality_lut``: those index an 8-bit
    LUT with uint8 (a 4096-entry table wraps around) and refuse a 12-bit Modality LUT.
    """
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536  # 0 means 2**16 entries
    if first >= 32768 and int(ds.get("PixelRepresentation", 0) or 0) == 1:
        first -= 65536  # a signed first value written as US
    data = item["LUTData"].value
    if isinstance(data, (bytes, bytearray)):
        little = getattr(ds, "original_encoding", (None, True))[1] is not False
        if bits <= 8 and len(data) in (entries, entries + 1):  # 8-bit entries packed one per byte
            table = np.frombuffer(data, np.uint8)[:entries]
        else:
            table = np.frombuffer(data[: len(data) // 2 * 2], "<u2" if little else ">u2")[:entries]
    else:
        table = np.atleast_1d(np.asarray(data))
    if table.size == 0:
        raise ValueError("the LUT has no entries")
    return first, table.astype(np.int64), bits


def _look_up(values: np.ndarray, first: int, table: np.ndarray) -> np.ndarray:
    """Values below the first mapped one take the first entry, those past the table the last."""
    index = np.rint(np.asarray(values, dtype=np.float64)).astype(np.int64) - first
    return table[np.clip(index, 0, len(table) - 1)]


def _modality(ds, stored: np.ndarray) -> np.ndarray:
    """Stored values -> modality values: the Modality LUT, else ``RescaleSlope``/``RescaleIntercept``."""
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
        first, table, _ = _lut(ds, ds.ModalityLUTSequence[0])
        return _look_up(stored, first, table)
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        slope = _first(ds.RescaleSlope) if ds.get("RescaleSlope") not in (None, "") else 1.0
        intercept = _first(ds.RescaleIntercept) if ds.get("RescaleIntercept") not in (None, "") else 0.0
        return np.asarray(stored, dtype=np.float64) * slope + intercept
    return stored


def _voi(ds, modality: np.ndarray) -> np.ndarray:
    """Modality-transformed values -> float on 0..1 by the VOI LUT, the window, or min..max."""
    values = np.asarray(modality, dtype=np.float64)
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        first, table, bits = _lut(ds, ds.VOILUTSequence[0])
        return np.clip(_look_up(values, first, table) / float(2**bits - 1), 0.0, 1.0)
    if ds.get("WindowCenter") not in (None, "") and ds.get("WindowWidth") not in (None, ""):  # empty = no window
        c, w = _first(ds.WindowCenter), max(_first(ds.WindowWidth), 1.0)
        function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper()
        if function == "SIGMOID":
            return 1.0 / (1.0 + np.exp(-4.0 * (values - c) / w))
        if function == "LINEAR_EXACT":
            return np.clip((values - c) / w + 0.5, 0.0, 1.0)
        if w > 1:
            return np.clip((values - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0)
        return (values > c - 0.5).astype(np.float64)
    if int(ds.get("BitsStored", 16)) <= 8 and values.min() >= 0 and values.max() <= 255:
        return values / 255.0  # an 8-bit export without a window: as stored
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values, dtype=np.float64)


@library_messages()
def decode_dicom(data: bytes, where: str | None = None) -> DicomImage:
    """Decode a DICOM file's bytes to an 8-bit gray image by the rules of the module docstring."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # any parser failure on user data is a reason to quarantine
        raise _error(f"not a readable DICOM file ({_short(exc)})", where) from None
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise _error("DICOM file without pixel data", where)
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None and ds.original_encoding[0] is not None and "PixelData" in ds:
        # a bare dataset without the Part 10 header (no preamble, no file meta): its pixel data are
        # native, in the encoding the dataset itself was read with
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit, little = ds.original_encoding
        syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        ds.file_meta = getattr(ds, "file_meta", None) or pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
    syntax_name = getattr(syntax, "name", str(syntax)) if syntax is not None else "unknown"
    _check_size(ds, where)
    samples = int(ds.get("SamplesPerPixel", 1))
    try:
        pixels, colour = _decode(ds, samples)
    except Exception as exc:  # missing plugin, broken codestream, inconsistent header
        raise _error(f"cannot decode DICOM pixel data (transfer syntax {syntax_name}): {_short(exc)}", where) from None
    if samples == 3:
        values = pixels.astype(np.float64)
        bits = int(ds.get("BitsStored", 8) or 8)
        if bits > 8:  # 16-bit colour: scaled to 0..255 like the 8-bit files, not clipped
            values *= 255.0 / float(2**bits - 1)
        if colour.startswith("YBR_FULL"):  # Y is the luma itself; through RGB it would be clipped there
            gray = values[..., 0]
        else:
            gray = (values[..., 0] * 299 + values[..., 1] * 587 + values[..., 2] * 114) / 1000.0
        return DicomImage(
            np.clip(np.rint(gray), 0, 255).astype(np.uint8),
            _spacing(ds),
            str(ds.get("PhotometricInterpretation", "")),
            ds.get("BitsStored"),
            syntax_name,
        )
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric == "PALETTE COLOR" and pixels.ndim == 2:
        return DicomImage(
            _palette_gray(ds, pixels, where), _spacing(ds), photometric, ds.get("BitsStored"), syntax_name
        )
    if pixels.ndim != 2:
        raise _error(f"unsupported DICOM pixel layout {pixels.shape} (expected one gray frame)", where)
    try:
        gray = _gray(ds, pixels, photometric)
    except (ValueError, TypeError, IndexError) as exc:  # a header value the transform cannot use
        raise _error(f"unusable DICOM rescale, LUT or window values in the header: {_short(exc)}", where) from None
    bits = ds.get("BitsStored")
    return DicomImage(gray, _spacing(ds), photometric, None if bits is None else int(bits), syntax_name)


def _decode(ds, samples: int) -> tuple[np.ndarray, str]:
    """The first frame's stored values and their colour space. ``YBR_FULL``/``YBR_FULL_422`` frames
    stay in YCbCr (pydicom's default conversion to RGB clips, and the luma taken back from the clipped
    RGB is not the file's Y); every other file is decoded as pydicom returns it."""
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if samples == 3 and photometric.startswith("YBR_FULL") and syntax is not None:
        from pydicom.pixels import get_decoder

        pixels, meta = get_decoder(syntax).as_array(ds, index=0, as_rgb=False)
        return pixels, str(meta.get("photometric_interpretation", photometric))
    pixels = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    return pixels, "RGB" if samples == 3 else photometric


def _check_size(ds, where: str | None) -> None:
    """The pixel budget of every image (:func:`cxrflow.data.imagecheck.check_pixel_budget`), from the header's
    Rows and Columns, before pydicom allocates or decompresses anything."""
    try:
        rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    except (TypeError, ValueError):
        return  # a malformed header: pydicom's own decode names the problem
    if rows > 0 and columns > 0:
        try:
            check_pixel_budget(columns, rows)
        except ImageError as exc:
            raise _error(exc.message, where) from None
    for width, height in codestream_sizes(ds):  # what the decoder will allocate, whatever the header says
        try:
            check_pixel_budget(width, height)
        except ImageError as exc:
            raise _error(
                f"compressed pixel data: the codestream says {width}x{height} (the header {columns}x{rows}); "
                f"{exc.message}",
                where,
            ) from None


_J2K_SIZ = b"\xff\x4f\xff\x51"  # SOC then SIZ: a JPEG 2000 codestream's image size
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}  # JPEG, JPEG-LS frames


def codestream_sizes(ds) -> list[tuple[int, int]]:
    """(width, height) of every JPEG 2000, JPEG or JPEG-LS frame header in encapsulated pixel data,
    read from the codestream's own SIZ / SOF marker (the header's Rows and Columns may lie)."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not getattr(syntax, "is_compressed", False) or "PixelData" not in ds:
        return []
    data = bytes(ds.PixelData)
    sizes = []
    at = data.find(_J2K_SIZ)
    while at >= 0 and at + 24 <= len(data):
        x, y, x0, y0 = (int.from_bytes(data[at + 8 + 4 * i : at + 12 + 4 * i], "big") for i in range(4))
        sizes.append((max(x - x0, 1), max(y - y0, 1)))
        at = data.find(_J2K_SIZ, at + 4)
    at = data.find(b"\xff\xd8\xff")  # JPEG / JPEG-LS: SOI, then the frame header among the first markers
    while 0 <= at and at + 9 <= len(data):
        if data[at] == 0xFF and data[at + 1] in _JPEG_SOF:
            sizes.append((int.from_bytes(data[at + 7 : at + 9], "big"), int.from_bytes(data[at + 5 : at + 7], "big")))
            at = data.find(b"\xff\xd8\xff", at + 2)
        elif data[at] == 0xFF and data[at + 1] in (0xD8, 0xFF):
            at += 1 if data[at + 1] == 0xFF else 2
        elif data[at] == 0xFF:
            at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")  # skip a marker segment
        else:
            at = data.find(b"\xff\xd8\xff", at + 1)
    return sizes


def _palette_gray(ds, indices: np.ndarray, where: str | None) -> np.ndarray:
    """PALETTE COLOR indices -> uint8 luma of the palette's colours (ITU-R 601, like colour files)."""
    from pydicom.pixels import apply_color_lut

    try:
        rgb = apply_color_lut(indices, ds).astype(np.float64)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    except Exception as exc:  # a missing or inconsistent palette in the header
        raise _error(f"cannot apply the DICOM colour palette: {_short(exc)}", where) from None
    rgb *= 255.0 / float(2**bits - 1)
    gray = (rgb[..., 0] * 299 + rgb[..., 1] * 587 + rgb[..., 2] * 114) / 1000.0
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)


def _gray(ds, pixels: np.ndarray, photometric: str) -> np.ndarray:
    """One gray frame's stored values -> uint8 by :func:`_to_gray`. Integer data: the transform as a
    table over the stored values that occur (<= 65,536 entries), then one lookup per pixel instead of
    several float passes over the image."""
    if not (np.issubdtype(pixels.dtype, np.integer) and pixels.dtype.itemsize <= 2):
        return _to_gray(ds, pixels, photometric)
    lo, hi = int(pixels.min()), int(pixels.max())
    table = _to_gray(ds, np.arange(lo, hi + 1).astype(pixels.dtype), photometric)
    return table[pixels.astype(np.int32) - lo] if lo < 0 else np.concatenate([np.zeros(lo, np.uint8), table])[pixels]


def _to_gray(ds, stored: np.ndarray, photometric: str) -> np.ndarray:
    """Stored values -> uint8: modality transform, VOI transform, MONOCHROME1 inverted, rounded."""
    scaled = _voi(ds, _modality(ds, stored))
    if not np.all(np.isfinite(scaled)):  # NaN/inf float pixels, or a rescale that overflowed
        raise ValueError("the transformed pixel values are not all finite")
    if photometric == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def _spacing(ds) -> tuple[float, float] | None:
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(key)
        if value is not None and len(value) == 2:
            try:
                rows, cols = float(value[0]), float(value[1])
            except (TypeError, ValueError):
                return None
            return (rows, cols) if all(math.isfinite(v) and v > 0 for v in (rows, cols)) else None
    return None


def read_dicom(path: str | Path) -> DicomImage:
    """Decode a DICOM file from disk (see :func:`decode_dicom`)."""
    return decode_dicom(Path(path).read_bytes(), str(path))


#: Per-image pixel spacing of a store's DICOM sources (a leading "_": not part of the pixel dataset).
SPACING_FILE = "_pixel_spacing.parquet"


@library_messages()
def header_spacing(path: str | Path) -> tuple[float, float] | None:
    """(row, column) pixel spacing in mm from a DICOM file's header (pixels not read); None without one."""
    import pydicom

    try:
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, force=True, specific_tags=["PixelSpacing", "ImagerPixelSpacing"]
        )
    except Exception:  # the image itself was decoded; a header that will not parse just has no spacing
        return None
    return _spacing(ds)


def spacing_row(image_id: str, path: str) -> list | None:
    """``[image_id, row mm, column mm]`` for a DICOM source (NaN without spacing); None for other files."""
    if path.lower().endswith((".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")):
        return None  # no extra file access for the usual image files
    if not path.lower().endswith(DICOM_SUFFIXES):
        with open(path, "rb") as f:
            if f.read(132)[128:132] != b"DICM":
                return None
    spacing = header_spacing(path) or (float("nan"), float("nan"))
    return [image_id, float(spacing[0]), float(spacing[1])]


def write_spacing(store: str | Path, rows: list[list]) -> dict | None:
    """Write ``STORE/_pixel_spacing.parquet`` (image_id, spacing_row_mm, spacing_col_mm); manifest entry."""
    if not rows:
        return None
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sorted(rows)
    table = pa.table(
        {
            "image_id": pa.array([r[0] for r in rows], pa.string()),
            "spacing_row_mm": pa.array([r[1] for r in rows], pa.float32()),
            "spacing_col_mm": pa.array([r[2] for r in rows], pa.float32()),
        }
    )
    pq.write_table(table, Path(store) / SPACING_FILE)
    known = [r[1] for r in rows if r[1] == r[1]]
    return {
        "file": SPACING_FILE,
        "dicom_images": len(rows),
        "with_spacing": len(known),
        "row_mm_range": [min(known), max(known)] if known else None,
    }


def looks_like_dicom(path: str | Path) -> bool:
    """A ``.dcm``/``.dicom`` file, or an existing file without a suffix that starts like DICOM."""
    name = os.path.basename(str(path)).lower()
    if name.endswith(DICOM_SUFFIXES):
        return True
    if "." in name or not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(132)[128:132] == b"DICM"


@library_messages()
def header_demographics(path: str | Path) -> tuple[int | None, str | None]:
    """(age in whole years, sex M/F) from ``PatientAge`` (``063Y``, ``006M``, ...) and ``PatientSex``."""
    import pydicom

    if not os.path.isfile(path):  # a folder or named pipe at the path: the ETL's decoder quarantines it
        return None, None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["PatientAge", "PatientSex"])
    except Exception:  # an unreadable header: demographics stay unknown, the image decides its own fate
        return None, None
    age = str(ds.get("PatientAge", "") or "").strip().upper()
    years = None
    if len(age) == 4 and age[:3].isdigit() and age[3] in "YMWD":
        years = int(age[:3]) if age[3] == "Y" else int(age[:3]) // {"M": 12, "W": 52, "D": 365}[age[3]]
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    return years, sex if sex in ("M", "F") else None
