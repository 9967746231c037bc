"""Image decoding and resizing: the one preprocessing path shared by the ETL and ``predict``.

Every image becomes 8-bit grayscale by one documented rule per mode:

=================  ==========================================================================
mode               rule
=================  ==========================================================================
``L``              as is (almost every image of the NIH release)
``1``              black/white to 0/255
``RGB``            ITU-R 601-2 luma: ``L = R*299/1000 + G*587/1000 + B*114/1000`` (Pillow's rule)
``RGBA``, ``LA``   alpha is dropped, then as ``RGB`` / ``L``. The release's few ``RGBA`` images
                   hold the gray value in R=G=B with an opaque alpha; compositing on a
                   background would only change pixels that are partly transparent, and an
                   X-ray's intensity is in its colour channels, not its alpha.
``P``              palette expanded to ``RGB``, then luma (transparency ignored, as above)
``CMYK``,          converted to ``RGB`` by Pillow, then luma
``YCbCr``, ...
``I;16*``          16-bit: ``value >> 8`` (0..65535 to 0..255, linear, no clipping; it is the
                   exact inverse of the usual 8-to-16-bit expansion ``v * 257``)
``I``              32-bit integer, which Pillow uses for some 16-bit files: treated as 16-bit,
                   values below 0 or above 65535 are clipped first
``F``              refused (floating-point scale unknown): :class:`ImageError`
=================  ==========================================================================

JPEG input is decoded straight to gray (the JPEG's own luma channel, the same ITU-R 601 weights)
and, when an output size is at most half the source's shorter side, with libjpeg's DCT scaling to
the smallest scale that keeps both sides at least that size (``Image.draft``), done per output size so that a size's pixels
never depend on which other sizes were asked for. EXIF orientation is not applied.

Non-square images are padded to a square with black (0), centred, then resized: the whole field
of view is kept and the aspect ratio is not distorted (chest X-ray collimation is dark, so the
border blends in). A square image is resized as is.

Resizing uses Pillow's Lanczos filter (antialiased) with ``reducing_gap=2.0``: exact Lanczos for
reductions up to 4x, a 2x box ``reduce()`` first beyond that, which is several times faster and
within a quarter of a gray level of plain Lanczos on chest X-rays (measured, see
``benchmarks/etl.py``). Pillow keeps freed image memory for reuse (:data:`PILLOW_BLOCKS`),
which makes decode and resize ~8% faster than with Pillow's default.

DICOM files (``.dcm`` or a ``DICM`` header) are windowed to 8-bit gray by
:mod:`cxrflow.data.formats.dicom` (modality and VOI transforms, MONOCHROME1 inverted) and then follow
the ``L`` rule.

A file that is empty, truncated, corrupt or not an image raises :class:`ImageError` with the
reason; the ETL quarantines it and goes on. So does anything that is not a regular file (a named
pipe, device or socket is never opened; symbolic links are followed only to regular files) and an
image whose padded square would exceed :data:`cxrflow.data.imagecheck.MAX_PIXELS` (read from its header, before decoding).
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from cxrflow.data.formats.dicom import decode_dicom, is_dicom
from cxrflow.data.imagecheck import ImageError, check_pixel_budget, library_messages
from cxrflow.safeio import IMAGE_BYTES, check_size

#: Pillow resampling filter and reducing gap used for every resize (see the module docstring).
RESAMPLE = Image.Resampling.LANCZOS
REDUCING_GAP = 2.0
#: Freed image blocks Pillow keeps for reuse (its default keeps none, so every decoded or resized
#: image is fresh memory from the system, page faults included: ~8% of an image's time at 1024 px,
#: measured). A block holds one image of up to 16 MB (a 1024 px gray image is 1 MB).
PILLOW_BLOCKS = 16
#: Largest side a store keeps (``etl --sizes``), so also the largest a checkpoint can be trained at.
MAX_STORE_SIZE = 4096


def _keep_pillow_blocks() -> None:
    """Raise Pillow's block cache to PILLOW_BLOCKS (never lower a larger setting of the caller's)."""
    if Image.core.get_blocks_max() < PILLOW_BLOCKS:
        Image.core.set_blocks_max(PILLOW_BLOCKS)


_keep_pillow_blocks()

_RGB_LIKE = frozenset({"RGB", "RGBA", "RGBX", "RGBa", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"})
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})


Source = str | os.PathLike | bytes | bytearray | memoryview


_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
)  # fmt: skip


def _not_regular(mode: int) -> str:
    return next((what for test, what in _FILE_KINDS if test(mode)), "not a regular file")


def _read_bytes(source: Source) -> tuple[bytes, str | None]:
    """The encoded bytes of ``source`` and its path (None for in-memory bytes).

    Only regular files are opened (symbolic links are followed to them): a named pipe, device or
    socket is refused from its ``stat`` without being opened, so it can neither hang nor be consumed.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), None
    path = Path(source)
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise ImageError(f"is {_not_regular(mode)}, not an image file", path)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # replaced between the stat and the open
                raise ImageError("is not a regular file, not an image file", path)
            check_size(os.fstat(f.fileno()).st_size, IMAGE_BYTES, path, "image file", ImageError)
            data = f.read(IMAGE_BYTES + 1)
    except FileNotFoundError:
        broken = os.path.islink(path)
        raise ImageError("broken symbolic link" if broken else "no such file", path) from None
    except OSError as exc:
        raise ImageError(f"cannot read: {exc.strerror or exc}", path) from None
    return data, str(path)


def _open(data: bytes, where: str | None) -> Image.Image:
    """A lazily-decoded Pillow image, or ImageError naming why the bytes are not one."""
    if len(data) == 0:
        raise ImageError("empty file (0 bytes)", where)
    if is_dicom(data, where):  # DICOM: windowed to 8-bit gray by cxrflow.data.formats.dicom, then as any L image
        dicom = decode_dicom(data, where)
        im = Image.fromarray(dicom.gray)
        im.info["pixel_spacing"] = dicom.spacing
        return im
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large to decode safely: {exc}", where) from None
    except Image.UnidentifiedImageError:
        raise ImageError("not a recognised image format (expected PNG, JPEG or another Pillow format)", where) from None
    except Exception as exc:  # any decoder failure on user data is a reason to quarantine
        raise ImageError(f"not a recognised image ({_describe(exc)})", where) from None
    try:
        check_pixel_budget(*im.size)
    except ImageError as exc:
        raise ImageError(exc.message, where) from None
    return im


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _to_gray(im: Image.Image, where: str | None) -> np.ndarray:
    """Decode ``im`` to a uint8 HxW array by the per-mode rule of the module docstring."""
    mode = im.mode
    if mode == "L":
        return np.asarray(im, dtype=np.uint8)
    if mode in _SIXTEEN_BIT:
        return (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)
    if mode == "I":
        return (np.clip(np.asarray(im, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
    if mode == "1":
        return np.asarray(im.convert("L"), dtype=np.uint8)
    if mode in ("LA", "La"):
        return np.asarray(im.convert("LA").getchannel("L"), dtype=np.uint8)
    if mode in _RGB_LIKE:
        if mode == "RGBa":
            im = im.convert("RGBA")
        return np.asarray(im.convert("RGB").convert("L"), dtype=np.uint8)
    raise ImageError(f"unsupported image mode {mode!r} (no rule to make it 8-bit gray)", where)


def _decode(im: Image.Image, where: str | None, draft_size: int | None = None) -> np.ndarray:
    """Decode an opened image to gray; JPEGs may use DCT scaling down to ``draft_size``."""
    _load(im, where, draft_size)
    return _to_gray(im, where)


def _load(im: Image.Image, where: str | None, draft_size: int | None = None) -> None:
    """Decode the pixels of an opened image, or ImageError naming why they cannot be."""
    try:
        if draft_size is not None and im.format in _JPEG_FORMATS:
            im.draft("L", (draft_size, draft_size))
        im.load()
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large to decode safely: {exc}", where) from None
    except Exception as exc:  # truncated data, bad CRC, broken zlib stream, ...
        raise ImageError(f"cannot decode: {_describe(exc)}", where) from None


@library_messages()
def load_gray(source: Source) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode a file path or encoded bytes to an 8-bit gray HxW array and (width, height).

    Raises :class:`ImageError` (with the reason) for an unreadable, empty, truncated, corrupt or
    unsupported image.
    """
    data, where = _read_bytes(source)
    im = _open(data, where)
    size = im.size
    return _decode(im, where), (int(size[0]), int(size[1]))


def pad_square(gray: np.ndarray) -> np.ndarray:
    """``gray`` centred on a black square canvas of side max(height, width); square input as is."""
    h, w = gray.shape
    if h == w:
        return gray
    side = max(h, w)
    out = np.zeros((side, side), dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    out[top : top + h, left : left + w] = gray
    return out


def resize_gray(gray: np.ndarray, size: int) -> np.ndarray:
    """Pad ``gray`` (uint8 HxW) to a centred black square, then antialiased-resize to ``size`` x ``size``."""
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 array, got {gray.dtype} with shape {gray.shape}")
    size = int(size)
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    return _resize_square(Image.fromarray(pad_square(gray)), size)


def _resize_square(im: Image.Image, size: int) -> np.ndarray:
    """The square ``L`` image ``im`` at ``size`` x ``size`` as a new uint8 array (a copy if it is that size)."""
    if im.size[0] != size:
        im = im.resize((size, size), RESAMPLE, reducing_gap=REDUCING_GAP)
    return np.asarray(im, dtype=np.uint8)  # Pillow hands numpy a fresh copy of its pixels


@library_messages()
def load_and_resize(source: Source, sizes: Iterable[int]) -> tuple[dict[int, np.ndarray], tuple[int, int]]:
    """Decode once and resize to every size: ({size: uint8 [size, size]}, (orig_width, orig_height)).

    A JPEG is decoded once per size with DCT scaling (see the module docstring); any other format
    is decoded once.
    """
    sizes = sorted({int(s) for s in sizes})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"sizes must be positive integers, got {sizes}")
    data, where = _read_bytes(source)
    im = _open(data, where)
    orig = (int(im.size[0]), int(im.size[1]))
    out: dict[int, np.ndarray] = {}
    if im.format in _JPEG_FORMATS:
        full: np.ndarray | None = None
        for s in sizes:
            if min(orig) // s >= 2:  # DCT scaling can skip at least half the resolution
                out[s] = resize_gray(_decode(_open(data, where), where, draft_size=s), s)
            else:
                if full is None:
                    full = _decode(_open(data, where), where)
                out[s] = resize_gray(full, s)
        return out, orig
    if im.mode == "L" and orig[0] == orig[1]:  # the release's usual image: resized as decoded
        _load(im, where)
        for s in sizes:
            out[s] = _resize_square(im, s)
        return out, orig
    gray = _decode(im, where)
    for s in sizes:
        out[s] = resize_gray(gray, s)
    return out, orig


def preprocess(source: Source, sizes: Iterable[int]) -> dict[int, np.ndarray]:
    """Decode ``source`` and resize it to every size: {size: uint8 array [size, size]}."""
    return load_and_resize(source, sizes)[0]
