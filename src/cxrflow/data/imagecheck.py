"""What every image decoder refuses before decoding, and how it says so: shared by Pillow's path
(:mod:`cxrflow.data.imaging`) and DICOM's (:mod:`cxrflow.data.formats.dicom`).

A file that is empty, truncated, corrupt or not an image raises :class:`ImageError` with the reason
(the ETL quarantines it and goes on). An image whose padded square would exceed :data:`MAX_PIXELS`
is refused from its header (:func:`check_pixel_budget`), before anything is allocated.
"""

from __future__ import annotations

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
