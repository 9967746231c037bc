"""What every image decoder refuses before decoding, and how it says so: shared by Pillow's path
(:mod:`cxrflow.data.imaging`) and DICOM's (:mod:`cxrflow.data.formats.dicom`).

A file that is empty, truncated, corrupt or not an image raises :class:`ImageError` with the reason
(the ETL quarantines it and goes on). An image whose padded square would exceed :data:`MAX_PIXELS`
is refused from its header (:func:`check_pixel_budget`), before anything is allocated.

While an image is decoded, the decoding libraries' own messages (pydicom's warnings and log records,
a JPEG 2000 decoder's errors, Pillow's DecompressionBombWarning) are kept off the terminal
(:func:`library_messages`): an image that fails is one ImageError in cxrflow's words carrying the
library's reason; one that decodes drops them (the library coped, and cxrflow's own checks stand).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator

from cxrflow.errors import CxrflowError

#: Largest padded square side an image may have: its header is checked before decoding, so a tiny
#: file declaring huge dimensions is quarantined instead of exhausting memory. 16384 px is about
#: four times the largest side of any chest X-ray format in use (CR/DR detectors are <= 4300 px).
MAX_SIDE = 16384
MAX_PIXELS = MAX_SIDE * MAX_SIDE


class ImageError(CxrflowError):
    """An image that cannot be decoded (empty, truncated, corrupt, unsupported); carries the reason."""


def check_pixel_budget(width: int, height: int, budget: int = MAX_PIXELS) -> None:
    """ImageError when padding a ``width`` x ``height`` image to a square would exceed ``budget`` pixels.

    Checked from the header, before anything is decoded or allocated: a 1,000,000 x 1 PNG of 1 KB
    would otherwise ask for a 10^12-pixel square.
    """
    side = max(int(width), int(height))
    if width < 1 or height < 1 or side * side > budget:
        raise ImageError(
            f"image of {width}x{height} pixels would be {side}x{side} after padding to a square, over the "
            f"pixel budget of {budget:,} ({MAX_SIDE}x{MAX_SIDE}); not decoded"
        )


#: Top-level names of the libraries that decode images for cxrflow (their loggers and children).
DECODING_LIBRARIES = ("pydicom", "PIL", "openjpeg", "pylibjpeg", "libjpeg")


class _Collect(logging.Filter):
    """Takes the records of one thread (the decoding one) for itself: kept as text, not shown."""

    def __init__(self, thread: int, heard: list[str]) -> None:
        super().__init__()
        self.thread, self.heard = thread, heard

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread:
            return True
        with contextlib.suppress(Exception):
            self.heard.append(record.getMessage())
        return False


def _loggers() -> list[logging.Logger]:
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in DECODING_LIBRARIES]
    return [logging.getLogger(n) for n in {*DECODING_LIBRARIES, *names}]


def _said(heard: list[str], reason: str) -> str:
    """The library messages that add to ``reason``: distinct, one line each, at most two."""
    said: list[str] = []
    for text in heard:
        line = (text.strip().splitlines() or [""])[0].replace(" in file <no filename>", "").strip()
        if line and line not in reason and line not in said:
            said.append(line[:200])
    return "; ".join(said[:2])


@contextlib.contextmanager
def library_messages() -> Iterator[None]:
    """Decode an image inside this: the decoding libraries' warnings and log records of this thread are
    kept off the terminal; an ImageError raised inside carries those that add to its reason.

    Warnings are caught in the main thread only (``warnings.catch_warnings`` is not thread-safe); the
    ETL's decoding threads run in Spark's workers, whose output goes to Spark's log.
    """
    heard: list[str] = []
    collect = _Collect(threading.get_ident(), heard)
    loggers = _loggers()
    for logger in loggers:
        logger.addFilter(collect)
    main = threading.current_thread() is threading.main_thread()
    try:
        with warnings.catch_warnings(record=True) if main else contextlib.nullcontext() as caught:
            if main:
                warnings.simplefilter("always")
            try:
                yield
            finally:
                heard.extend(str(w.message) for w in caught or [] if str(w.message) not in heard)
    except ImageError as exc:
        extra = _said(heard, exc.message)
        if not extra:
            raise
        raise ImageError(f"{exc.message} (the decoder also said: {extra})", exc.path) from None
    finally:
        for logger in loggers:
            logger.removeFilter(collect)
